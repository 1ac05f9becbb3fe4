"""Our CoCA / DCA / hybrid models exported with bundled modelling code, run by transformers.

Compared: logits of our GPTModel (random weights, saved as a megatron_ext checkpoint) with the
logits transformers computes from the export (`trust_remote_code=True`), 40 tokens: longer than
the DCA chunk length C = 8 (so intra, successive and inter passes and the Qwen temperature at
L > L_o all occur), the window (8) and the chunk (16). Tolerance 1e-4 max-abs (fp32 on both
sides, different operation orders; observed ~5e-6). Then the export converts back and out
again bit-exactly with an equal config. A DCA model also exports as plain Qwen2 / Llama plus
`dual_chunk_attention_config`, which imports back as the same DCA config.
"""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, hf_config, hf_logits, hf_tensors, our_logits, read_json

from megatron_ext.checkpoint import save_megatron_checkpoint
from megatron_ext.config import (
    AttentionConfig,
    DCAConfig,
    HybridConfig,
    ModelConfig,
    RopeScalingConfig,
    RunConfig,
)
from megatron_ext.convert import hf_to_mcore, hf_to_run_config, mcore_to_hf
from megatron_ext.specs import build_gpt_model

DCA = DCAConfig(chunk_size=12, local_size=4, original_max_position_embeddings=16)
ATTN = {
    "coca_slack": AttentionConfig(variant="coca"),
    "coca_strict_yarn": AttentionConfig(
        variant="coca", coca_form="strict",
        rope_scaling=RopeScalingConfig(type="yarn", factor=4.0,
                                       original_max_position_embeddings=16)),
    "dca": AttentionConfig(variant="dca", dca=DCA),
    "hybrid": AttentionConfig(variant="hybrid", hybrid=HybridConfig(
        preset="custom", layer_types=["rope_swa", "nope_full", "rope_chunked"], window=8,
        chunk=16, temperature_tuning=True, floor_scale=8)),
}


def _saved(tmp_path, attn, **model_kw):
    mc = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=48, vocab_size=VOCAB, init_method_std=0.2, **model_kw)
    torch.manual_seed(0)
    model = build_gpt_model(mc, attn, vocab_size=VOCAB).eval()
    ckpt = save_megatron_checkpoint(model, tmp_path / "ours", config=RunConfig(model=mc,
                                                                              attention=attn))
    return model, ckpt


@pytest.mark.parametrize("case", list(ATTN))
def test_bundled_export_matches(case, tmp_path, megatron_single_process):
    model, ckpt = _saved(tmp_path, ATTN[case])
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    out = mcore_to_hf(ckpt, tmp_path / "hf", family="megatron_ext", show_progress=False)
    cfg = read_json(out / "config.json")
    assert cfg["auto_map"]["AutoModelForCausalLM"].endswith("MegatronExtForCausalLM")
    ref = hf_logits(out, tokens, trust_remote_code=True)
    assert (our_logits(model, tokens) - ref).abs().max().item() <= 1e-4
    back = mcore_to_hf(hf_to_mcore(out, tmp_path / "again", show_progress=False),
                       tmp_path / "hf2", show_progress=False)
    a, b = hf_tensors(out), hf_tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert hf_config(back) == hf_config(out)


@pytest.mark.parametrize("qkv_bias,family", [(True, "qwen2"), (False, "llama")])
def test_dca_plain_export(qkv_bias, family, tmp_path, megatron_single_process):
    """DCA -> plain family + dual_chunk_attention_config (what vLLM reads) -> DCA again."""
    model, ckpt = _saved(tmp_path, ATTN["dca"], add_qkv_bias=qkv_bias)
    out = mcore_to_hf(ckpt, tmp_path / "plain", show_progress=False)
    cfg = read_json(out / "config.json")
    assert cfg["model_type"] == family
    assert cfg["dual_chunk_attention_config"] == {
        "chunk_size": 12, "local_size": 4, "original_max_position_embeddings": 16}
    again = hf_to_run_config(out)
    assert again.attention.variant == "dca" and again.attention.dca == DCA
    # transformers' own Qwen2 / Llama ignore the DCA key; with one chunk (S <= C = 8) DCA is
    # plain causal RoPE, so the plain model must agree there.
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    assert (our_logits(model, tokens) - hf_logits(out, tokens)).abs().max().item() <= 1e-4
