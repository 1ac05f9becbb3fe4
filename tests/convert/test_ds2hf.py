"""DeepSpeed ZeRO-2 checkpoint of a real 2-rank CPU training run -> Hugging Face.

Two gloo ranks train the tiny RoPE model for 2 steps with ``deepspeed.enabled=true`` and
``zero_stage=2`` (optimizer states partitioned over the ranks) and save a training checkpoint.
``ds_to_hf`` then exports it two ways: from the ZeRO partitions themselves (DeepSpeed's own
zero-to-fp32 consolidation, run YAML given), and from the step's consolidated ``model/``
weights. Both exports must hold the same tensors bit for bit, and transformers' logits of the
export must equal our model's logits from the same checkpoint (fp32, 1e-4: the same maths in
another order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from utils import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _train(rank: int, group, out: str) -> None:
    import os

    os.environ.setdefault("LOCAL_RANK", str(rank))
    from megatron_ext.config import load_config
    from megatron_ext.training.loop import train

    cfg = load_config("configs/run/tiny.yaml", [
        "parallel.context_parallel_size=1", "data.max_documents=2", "data.seq_length=64",
        "train.steps=2", "train.micro_batch_size=2", "train.eval_batches=1",
        "train.warmup_steps=1", "deepspeed.enabled=true", "deepspeed.zero_stage=2",
        f"train.out_dir={out}"])
    train(cfg, progress=False)


def test_zero2_checkpoint_exports_and_matches(tmp_path: Path, megatron_single_process) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_ext.convert.deepspeed_io import ds_to_hf
    from megatron_ext.inference import load_model

    run = tmp_path / "run"
    run_distributed(_train, 2, tmp_path, timeout=600, out=str(run))
    step = (run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())
    assert (step / "engine").is_dir()
    via_zero = ds_to_hf(step, tmp_path / "hf_zero", config=str(step / "config.yaml"),
                        show_progress=False)
    via_model = ds_to_hf(step, tmp_path / "hf_model", show_progress=False)

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = tensors(via_zero), tensors(via_model)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.randint(0, 4000, (1, 48), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(via_zero, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(tokens).logits
    got = load_model(run, device="cpu").logits(tokens)
    assert (got - want).abs().max().item() <= 1e-4
