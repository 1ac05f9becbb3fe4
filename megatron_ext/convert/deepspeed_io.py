"""DeepSpeed ZeRO 0-3 checkpoints -> HF, consolidated on the CPU.

A DeepSpeed checkpoint directory (`<dir>/<tag>/mp_rank_00_model_states.pt` and, for ZeRO >= 1,
`*_optim_states.pt` partitions) is consolidated into full fp32 tensors by DeepSpeed's own
`zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` (ZeRO 1-3 read the fp32 master
partitions; ZeRO 0 the module weights). Its `torch.load` calls run with `weights_only=True`
(DeepSpeed's pickled config objects are allow-listed by type), so no code in the checkpoint
runs. The names are those of our GPTModel, and the export is `api.export_tensors`.

A megatron_ext training checkpoint `step_N/` already holds `model/` (the consolidated weights);
`ds_to_hf` uses it directly when present.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_ext.config import load_config
from megatron_ext.convert.errors import ConversionError

__all__ = ["ds_to_hf", "zero_state_dict"]


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make DeepSpeed's torch.load calls weights_only=True, allow-listing its config types."""
    import deepspeed.utils.zero_to_fp32 as z2f

    safe = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        safe.append(LossScaler)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum
        safe.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address
        safe.append(fragment_address)
    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("mmap", None)
        with torch.serialization.safe_globals(safe):
            return original(*args, **kwargs)

    z2f.torch.load = load
    try:
        yield
    finally:
        z2f.torch.load = original


def zero_state_dict(engine_dir: str | os.PathLike, tag: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a DeepSpeed checkpoint (any ZeRO stage), on the CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise ConversionError(f"DeepSpeed checkpoint directory {engine_dir} does not exist")
    if tag is None:
        tags = [p.name for p in engine_dir.iterdir()
                if p.is_dir() and any(p.glob("*model_states.pt"))]
        if (engine_dir / "latest").is_file():
            tag = (engine_dir / "latest").read_text().strip()
        elif len(tags) == 1:
            tag = tags[0]
        else:
            raise ConversionError(f"{engine_dir}: tags {sorted(tags)}; pass --tag")
    try:
        with _weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=tag)
    except Exception as e:
        raise ConversionError(f"{engine_dir}/{tag}: DeepSpeed checkpoint could not be "
                              f"consolidated: {type(e).__name__}: {e}") from e
    return {k.removeprefix("module."): v for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def ds_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, config: str | None = None,
             tag: str | None = None, family: str | None = None, dtype: str | None = None,
             show_progress: bool = True) -> Path:
    """Export a DeepSpeed checkpoint (or a megatron_ext training step directory) as HF.

    Args:
        src: a training checkpoint `step_N/` (with `model/` and `engine/`), or a DeepSpeed
            checkpoint directory (with `--config` naming the run YAML).
        dst: new HF directory.
        config: run YAML when `src` has none beside it.
        tag: DeepSpeed tag (default `latest` or the only one).
    """
    from megatron_ext.checkpoint import MARKER
    from megatron_ext.convert.api import _DTYPES, export_tensors, mcore_to_hf
    from megatron_ext.convert.hf_config import choose_family

    src = Path(src)
    if (src / "model" / MARKER).is_file() and config is None:
        return mcore_to_hf(src / "model", dst, family=family, dtype=dtype,
                           show_progress=show_progress)
    # A training step directory is a DeepSpeed checkpoint directory whose tag is "engine"
    # (the trainer saves with save_checkpoint(step_N, tag="engine")).
    in_step = (src / "engine").is_dir()
    cfg_file = Path(config) if config else next(
        (p for p in (src / "config.yaml", src.parent / "config.yaml") if p.is_file()), None)
    if cfg_file is None:
        raise ConversionError(f"{src}: no config.yaml; pass --config RUN.yaml")
    cfg = load_config(cfg_file)
    state = zero_state_dict(src, "engine" if in_step and tag is None else tag)
    fam = choose_family(cfg.model, cfg.attention, family)
    torch_dtype = _DTYPES[dtype or "float32"]
    if cfg.model.vocab_size is None:
        emb = state.get("embedding.word_embeddings.weight")
        if emb is None:
            raise ConversionError(f"{src}: no embedding.word_embeddings.weight in the state")
        cfg.model.vocab_size = emb.shape[0]
    return export_tensors(cfg, state.__getitem__, set(state), Path(dst).absolute(),
                          family=fam, extra={}, dtype=torch_dtype,
                          show_progress=show_progress)
