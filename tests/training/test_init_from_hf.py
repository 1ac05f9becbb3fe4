"""`train.init_from` on a Hugging Face directory: continued pretraining straight from HF weights.

A tiny random Llama is created with transformers inside the test (with the package's tokenizer
saved beside it). A run whose model section is the converter's reading of that config
(``hf_to_run_config``) trains 2 steps from it with a learning rate of 1e-12, so the weights it
saves are the HF weights up to 1e-12 per step: its logits must equal transformers' (fp32, 1e-4).
The same run at tensor_parallel_size=2 (2 ranks) is refused before any file is written: the HF
weights are read whole, so convert them first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from train_utils import run_train
from transformers import AutoModelForCausalLM
from utils import free_port, tiny_hf_llama

from megatron_ext.config import dump_config


def test_init_from_an_hf_directory(tmp_path: Path, megatron_single_process) -> None:
    from megatron_ext.convert import hf_to_run_config

    hf = tiny_hf_llama(tmp_path)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(dump_config(hf_to_run_config(hf)))
    base = ["--config", str(run_yaml), "--no-progress", "--set", f"train.init_from={hf}",
            "--set", "train.steps=2", "--set", "train.lr=1e-12", "--set", "train.warmup_steps=0",
            "--set", "train.weight_decay=0.0", "--set", "data.max_documents=2",
            "--set", "data.seq_length=64", "--set", "train.eval_batches=1"]
    proc = run_train([*base, "--set", f"train.out_dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"continued pretraining from {hf}" in proc.stdout

    from megatron_ext.inference import load_model

    tokens = torch.randint(0, 4000, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(tokens).logits
    got = load_model(tmp_path / "run", device="cpu").logits(tokens)
    assert (got - want).abs().max().item() <= 1e-4

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    refused = run_train([*base, "--set", f"train.out_dir={tmp_path / 'tp2'}",
                         "--set", "parallel.tensor_parallel_size=2"], launcher=torchrun)
    assert refused.returncode != 0
    assert "read directly at tensor_parallel_size=1 only" in refused.stdout + refused.stderr
    assert not (tmp_path / "tp2").exists()
