"""A checkpoint saved at tensor-parallel size 2 exports exactly like the TP=1 one.

An HF Llama (GQA) is converted to a TP=1 megatron_ext checkpoint; two gloo ranks build the
model at TP=2, load it (split on import: Megatron reshards the fused QKV per query group, the
SwiGLU halves, row- and vocab-parallel weights) and save it again at TP=2. Compared: the HF
export of the TP=2 checkpoint (merged on export by the slice reader) with the HF source and
with the export of the TP=1 checkpoint, tensor by tensor, bit-exactly (only copies happen).
"""

from __future__ import annotations

import pytest
import torch
from helpers import hf_tensors, make_hf
from megatron.core import parallel_state as ps
from utils import run_distributed

from megatron_ext.checkpoint import load_megatron_checkpoint, save_megatron_checkpoint
from megatron_ext.config import load_config
from megatron_ext.convert import hf_to_mcore, mcore_to_hf
from megatron_ext.specs import build_gpt_model

pytestmark = pytest.mark.distributed


def _reshard_worker(rank, group, *, src: str, dst: str) -> None:
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    cfg = load_config(f"{src}/config.yaml")
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=cfg.model.vocab_size, tp=2,
                            perform_initialization=False)
    load_megatron_checkpoint(model, src)
    save_megatron_checkpoint(model, dst, config=cfg)
    ps.destroy_model_parallel()


def test_tp2_source_equals_tp1(tmp_path):
    src = make_hf(tmp_path, "llama", num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False)
    tp1 = hf_to_mcore(src, tmp_path / "tp1", show_progress=False)
    run_distributed(_reshard_worker, 2, tmp_path, src=str(tp1), dst=str(tmp_path / "tp2"))
    from megatron_ext.checkpoint import read_checkpoint_info

    assert read_checkpoint_info(tmp_path / "tp2")["tensor_parallel_size"] == 2
    a = hf_tensors(mcore_to_hf(tp1, tmp_path / "hf1", show_progress=False))
    b = hf_tensors(mcore_to_hf(tmp_path / "tp2", tmp_path / "hf2", show_progress=False,
                               family="llama"))
    ref = hf_tensors(src)
    assert sorted(a) == sorted(b) == sorted(ref)
    for name in ref:
        assert torch.equal(a[name], ref[name]) and torch.equal(b[name], ref[name]), name
