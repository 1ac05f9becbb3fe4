"""``load_model`` on a Hugging Face directory: converted on the fly, same logits as transformers.

A tiny random Llama (GQA) is created with transformers inside the test and saved as safetensors
with the package's tokenizer; ``load_model(hf_dir)`` must give the logits transformers gives on
the same tokens (fp32, 1e-4: the two run the same maths in a different order), and ``--set``
overrides (here DCA, training-free) must reach the converted model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_ext.data.tokenizer import load_tokenizer, to_hf_tokenizer
from megatron_ext.inference import load_model


def _hf_llama(tmp: Path) -> Path:
    tok = load_tokenizer(None)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    out = tmp / "hf_llama"
    model.save_pretrained(out, safe_serialization=True)
    to_hf_tokenizer(tok).save_pretrained(out)
    return out


def test_load_model_converts_an_hf_directory(tmp_path: Path, megatron_single_process) -> None:
    hf_dir = _hf_llama(tmp_path)
    tokens = torch.randint(0, 4000, (1, 40))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(tokens).logits
    m = load_model(hf_dir, device="cpu")
    got = m.logits(tokens)
    assert (got - want).abs().max().item() <= 1e-4
    dca = load_model(hf_dir, {"attention.variant": "dca",
                              "attention.dca": {"chunk_size": 12, "local_size": 4}}, device="cpu")
    assert (dca.logits(tokens) - want).abs().max().item() > 1e-3  # the override took effect
