"""HF families <-> megatron_ext: logits parity and bit-exact round trips.

For each family a tiny random HF model is created with transformers inside the test (no
download). Compared:
- logits of the HF model (eager attention, fp32) with logits of our GPTModel loaded from the
  same directory, on the same 40 tokens: longer than every window (8) and chunk (16), and past
  the Llama-4 temperature floor (8), so the long-context fields are exercised. Tolerance 1e-4
  max-abs: both sides compute in fp32 with different operation orders (fused QKV, other
  reductions); observed differences are ~1e-5.
- HF -> megatron_ext checkpoint -> HF: every tensor bit-identical (transforms are
  concatenations and permutations) and the config (to_dict) equal key by key.
"""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, hf_config, hf_logits, hf_tensors, make_hf, our_logits, our_model

from megatron_ext.convert import hf_to_mcore, mcore_to_hf

CASES = {
    "llama": ("llama", {}),
    "llama_yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 16,
                                                 "rope_theta": 10000.0}}),
    "llama_linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                   "rope_theta": 500000.0}}),
    # Llama-3.1 scaling; L0 = 64 so that the 40 test tokens cross all three wavelength bands
    "llama_llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                                                   "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64,
                                                   "rope_theta": 500000.0}}),
    "qwen2": ("qwen2", {}),
    "smollm3": ("smollm3", {"no_rope_layers": [1, 0, 1, 0]}),
    "llama4_text": ("llama4_text", {"moe_layers": [], "intermediate_size_mlp": 48,
                                    "attention_chunk_size": 16, "floor_scale": 8,
                                    "head_dim": 8}),
    "cohere2": ("cohere2", {"sliding_window": 8, "logit_scale": 0.25, "head_dim": 8}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_round_trip(case, tmp_path, megatron_single_process):
    family, kw = CASES[case]
    src = make_hf(tmp_path, family, **kw)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    model, cfg = our_model(src)
    ours, ref = our_logits(model, tokens), hf_logits(src, tokens)
    assert ours.shape == ref.shape == (2, 40, VOCAB)
    assert (ours - ref).abs().max().item() <= 1e-4

    ckpt = hf_to_mcore(src, tmp_path / "mcore", show_progress=False)
    back = mcore_to_hf(ckpt, tmp_path / "back", show_progress=False)
    a, b = hf_tensors(src), hf_tensors(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert hf_config(back) == hf_config(src)
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        assert (back / name).is_file()


def test_long_context_fields_reach_our_config(tmp_path, megatron_single_process):
    """The polarity traps: HF no_rope_layers 1 = RoPE; Cohere2 full layers are NoPE."""
    from megatron_ext.convert import hf_to_run_config

    src = make_hf(tmp_path, "llama4_text", **CASES["llama4_text"][1])
    hy = hf_to_run_config(src).attention.hybrid
    assert hy.layer_types == ["rope_chunked", "rope_chunked", "rope_chunked", "nope_full"]
    assert (hy.chunk, hy.temperature_tuning, hy.floor_scale, hy.attn_scale) == (16, True, 8, 0.1)
    src = make_hf(tmp_path, "smollm3", no_rope_layers=[1, 0, 1, 0])
    assert hf_to_run_config(src).attention.hybrid.layer_types == [
        "rope_full", "nope_full", "rope_full", "nope_full"]
    src = make_hf(tmp_path, "cohere2", sliding_window=8, head_dim=8)
    cfg = hf_to_run_config(src)
    assert cfg.attention.hybrid.layer_types == ["rope_swa"] * 3 + ["nope_full"]
    assert cfg.attention.hybrid.window == 8 and cfg.model.parallel_block
