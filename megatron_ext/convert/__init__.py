"""Checkpoint conversion: Hugging Face <-> megatron_ext (Megatron dist checkpoints) <- DeepSpeed.

`python -m megatron_ext.convert hf2mcore|mcore2hf|ds2hf --src ... --dst ...`; the maths, the
support matrix and a worked example are in docs/conversion.md.

For the trainer and the inference loader:
- `hf_to_run_config(hf_dir)`: the RunConfig (model / attention sections) of an HF model;
- `load_hf_into(model, hf_dir)`: stream HF weights into a GPTModel built from it (TP = 1);
- `hf_to_mcore(hf_dir, ckpt_dir)`: a checkpoint any tensor-parallel size can load;
- `hf_inference_loader(hf_dir, ...)`: what `megatron_ext.inference.load_model` runs on an HF
  directory.
"""

from __future__ import annotations

from megatron_ext.convert.api import (
    hf_to_mcore,
    hf_to_run_config,
    load_hf_into,
    mcore_to_hf,
    read_hf_spec,
)
from megatron_ext.convert.errors import ConversionError
from megatron_ext.convert.hf_config import FAMILIES, choose_family
from megatron_ext.convert.inference_hook import hf_inference_loader

__all__ = ["FAMILIES", "ConversionError", "choose_family", "hf_to_mcore", "hf_to_run_config",
           "hf_inference_loader", "load_hf_into", "mcore_to_hf", "read_hf_spec"]
