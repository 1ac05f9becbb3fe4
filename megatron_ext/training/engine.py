"""The DeepSpeed path: the DeepSpeed JSON generated from the run config, an mpu adapter that
hands Megatron's parallel groups to DeepSpeed, and `DeepSpeedEngine`, the loop's view of
`deepspeed.initialize`'s engine.

Groups. DeepSpeed asks its `mpu` for the data-parallel group (gradient averaging, ZeRO
partitioning) and the model-parallel group (global gradient norm). `MegatronMPU` answers with
Megatron's data-parallel group *including the context-parallel ranks* (as Megatron's own
distributed optimizer does: CP ranks hold the same parameters and see different tokens), and
with the tensor-parallel group as the model-parallel one (no pipeline parallelism here).
megatron-core 0.16 no longer has the `get_model_parallel_*` names DeepSpeed calls, which is
why `megatron.core.parallel_state` cannot be passed directly.

Numerics. fp32 on CPU; bf16 runs the model in bf16 with DeepSpeed's fp32 master weights; fp16
adds DeepSpeed's dynamic loss scaling (and is refused on CPU). The learning rate follows
`schedule.lr_at` through a `LambdaLR` that DeepSpeed steps and checkpoints. The optimizer is
torch's AdamW (no C++ build); ZeRO 1-3 partition its state over the data x context group. With
`deepspeed.offload_optimizer: cpu` it is DeepSpeed's `DeepSpeedCPUAdam` (AdamW mode), which
DeepSpeed requires for ZeRO-Offload and compiles on first use.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_ext.config import RunConfig
from megatron_ext.training.optim import (
    NonFiniteError,
    grad_norm,
    param_groups,
    tp_partial_grad_params,
)
from megatron_ext.training.schedule import lr_at


class MegatronMPU:
    """megatron-core 0.16 `parallel_state` in the shape DeepSpeed's `mpu` argument expects."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self._ps = ps

    # data parallel = data x context parallel ranks (they share parameters)
    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank(with_context_parallel=True)

    # model parallel = tensor parallel (pipeline size 1)
    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def deepspeed_config(cfg: RunConfig, dp_cp_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run (saved as out_dir/deepspeed.json).

    `train_batch_size` counts micro-batches over the data x context group, as DeepSpeed
    requires (context-parallel ranks process shards of the same sequences).
    """
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage:
        zero.update(reduce_bucket_size=ds.reduce_bucket_size,
                    allgather_bucket_size=ds.reduce_bucket_size,
                    overlap_comm=ds.overlap_comm, contiguous_gradients=True)
    if ds.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_cp_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": t.dtype == "fp16", "loss_scale": 0,
                 "initial_scale_power": ds.initial_scale_power,
                 "loss_scale_window": ds.loss_scale_window, "hysteresis": 2,
                 "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _register_tp_grad_hooks(model: torch.nn.Module, tp_group) -> None:
    """Sum (or average) the partial gradients of TP-split norms as autograd produces them.

    DeepSpeed reduces gradients over the data-parallel group inside backward, so the
    tensor-parallel fix-up of `optim.tp_partial_grad_params` happens in tensor hooks.
    """
    tp = dist.get_world_size(tp_group)
    if tp == 1:
        return
    summed, averaged = tp_partial_grad_params(model)

    def hook(divide: bool):
        def fn(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            dist.all_reduce(grad, group=tp_group)
            return grad / tp if divide else grad
        return fn

    for p in summed:
        p.register_hook(hook(False))
    for p in averaged:
        p.register_hook(hook(True))


class DeepSpeedEngine:
    """`deepspeed.initialize` on a Megatron GPTModel, with the loop's step surface."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, *, tp_group,
                 out_dir: Path | None) -> None:
        import deepspeed

        if cfg.train.dtype == "fp16" and not torch.cuda.is_available():
            raise ValueError("train.dtype='fp16' needs a CUDA device (DeepSpeed's dynamic loss "
                             "scaling); on CPU use fp32")
        mpu = MegatronMPU()
        self.ds_config = deepspeed_config(cfg, mpu.get_data_parallel_world_size())
        if out_dir is not None and dist.get_rank() == 0:
            tmp = out_dir / "deepspeed.json.tmp"
            tmp.write_text(json.dumps(self.ds_config, indent=1) + "\n")
            os.replace(tmp, out_dir / "deepspeed.json")
        _register_tp_grad_hooks(model, tp_group)
        self.cfg, self.tp_group = cfg.train, tp_group
        self.stage = cfg.deepspeed.zero_stage
        base_lr = cfg.train.lr
        groups = param_groups(model, cfg.train.weight_decay)
        betas = (cfg.train.beta1, cfg.train.beta2)
        if cfg.deepspeed.offload_optimizer == "cpu":  # optimizer state and step on the host
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=base_lr, betas=betas, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=betas)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: lr_at(step, cfg.train) / base_lr)

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            mpu=mpu, dist_init_required=False)
        if self.stage == 3:  # the chunked loss reads output weights outside their module
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            module = self.engine.module
            weights = [module.shared_embedding_or_output_weight()] \
                if module.share_embeddings_and_output_weights else [module.output_layer.weight]
            for w in weights:
                register_external_parameter(module, w)
        self.module = self.engine.module
        self.runner = self.engine  # forward through the engine: ZeRO tracks micro-steps there
        self._lr = lr_at(0, cfg.train)
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    @property
    def lr(self) -> float:
        """The learning rate the last `finish_step` used."""
        return self._lr

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last:
            self.engine.step()  # DeepSpeed counts micro-steps; no update before the boundary

    def finish_step(self, step: int) -> float:
        """Step DeepSpeed at the accumulation boundary; returns the global gradient norm.

        Raises:
            NonFiniteError: the gradient norm is NaN or infinite. With ZeRO 0 this is found
                before the update; with ZeRO 1-3 DeepSpeed computes the norm inside its step,
                so the parameters may already be changed (checkpoints on disk are not).
        """
        norm = None
        self._lr = self.scheduler.get_last_lr()[0]  # what this step uses
        if self.stage == 0:  # gradients are already averaged over the data x context group
            norm = grad_norm(self.params, self.tp_group)
            if not math.isfinite(norm) and self.cfg.dtype != "fp16":
                raise NonFiniteError(f"gradient norm is {norm} at step {step}")
        self.engine.step()
        if norm is None:
            norm = float(self.engine.get_global_grad_norm())
        if not math.isfinite(norm) and self.cfg.dtype != "fp16":  # fp16: DeepSpeed skips
            raise NonFiniteError(f"gradient norm is {norm} at step {step}")
        return norm

    def save(self, directory: Path, rank: int) -> None:
        """DeepSpeed's own files (module, optimizer partitions, scheduler) into `directory`."""
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name,
                                    save_latest=False)

    def load(self, directory: Path, rank: int) -> None:
        path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                              load_module_strict=True,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {directory}")

    def gathered(self):
        """Context in which every parameter is whole on every rank (ZeRO-3 gathers them)."""
        import contextlib

        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()),
                                                 modifier_rank=None)


__all__ = ["DeepSpeedEngine", "MegatronMPU", "deepspeed_config"]
