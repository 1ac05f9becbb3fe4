"""The one error type of the conversion package."""

from __future__ import annotations


class ConversionError(ValueError):
    """A source that cannot be converted: unknown or unexpressible config field, unmapped or
    unused tensor, corrupt / truncated / mismatched file. The message names the field, tensor
    or file and says what would be valid."""


__all__ = ["ConversionError"]
