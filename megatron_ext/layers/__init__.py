"""Megatron-core modules built on megatron_ext.ops (sbhd layout is converted here)."""
