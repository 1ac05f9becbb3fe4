"""Inference memory is O(S): no tensor grows like S x S, and caches grow as documented.

Every tensor any op produces during a chunked prefill of S tokens plus two decode steps is
recorded (a ``TorchDispatchMode`` sees every aten call); the largest must stay far below S^2
and at most double (plus a small slack for fixed-size tiles) when S doubles, for each method:
causal RoPE, DCA, CoCA, a hybrid with sliding-window layers and LongHeads (whose chunk scores
are bounded per step). Cache sizes are exact numbers: a full cache holds 2 * Hkv * D * 4 bytes
per position and layer (+ 8 for the position), a ring cache is independent of S.
"""

from __future__ import annotations

import pytest
import torch
from inference_tiny import METHODS, VOCAB, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ext.inference.cache import FullCache, RingCache


class _LargestTensor(TorchDispatchMode):
    """Records the largest element count of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest(m, S: int) -> int:
    ids = torch.randint(0, VOCAB, (S,)).tolist()
    with _LargestTensor() as rec:
        m.generate([ids], max_new_tokens=3, prefill_chunk_size=64, stop_tokens=[])
    return rec.largest


@pytest.mark.parametrize("method", ["rope", "dca", "coca", "hybrid-swa", "longheads"])
def test_no_tensor_grows_quadratically(megatron_single_process, method: str):
    m = tiny_model([*METHODS[method], "model.num_layers=2"])
    small, big = _largest(m, 512), _largest(m, 1024)
    assert big < 1024 * 1024 / 8
    assert big <= 2 * small + 64 * 1024, (small, big)


def test_cache_sizes(megatron_single_process):
    """Full caches grow with the planned length; sliding-window rings do not."""
    m = tiny_model(METHODS["hybrid-swa"])  # layers 1-3: window 5, layer 4: NoPE full
    per_pos = 2 * 2 * 16 * 4 + 8  # K and V of 2 KV heads x 16 dims in fp32, plus the position
    for S in (100, 200):
        caches = m.session([S]).caches
        kinds = [type(c) for c in caches]
        assert kinds == [RingCache, RingCache, RingCache, FullCache]
        assert [c.nbytes() for c in caches] == [5 * per_pos] * 3 + [S * per_pos]
