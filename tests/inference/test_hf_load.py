"""``load_model`` on a Hugging Face directory: converted on the fly, same logits as transformers.

A tiny random Llama (GQA) is created with transformers inside the test and saved as safetensors
with the package's tokenizer; ``load_model(hf_dir)`` must give the logits transformers gives on
the same tokens (fp32, 1e-4: the two run the same maths in a different order), and ``--set``
overrides (here DCA, training-free) must reach the converted model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from utils import tiny_hf_llama

from megatron_ext.inference import load_model


def test_load_model_converts_an_hf_directory(tmp_path: Path, megatron_single_process) -> None:
    hf_dir = tiny_hf_llama(tmp_path)
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
