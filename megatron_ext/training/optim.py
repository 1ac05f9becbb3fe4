"""The plain (non-DeepSpeed) optimizer path: AdamW, exact gradient finishing, clipping, fp32
master weights for bf16 models.

`PlainEngine` and `megatron_ext.training.engine.DeepSpeedEngine` share one small surface that
the loop uses: `module`, `backward(loss, last)`, `finish_step(step) -> grad_norm`, `lr`,
`save(dir)`, `load(dir)`. Gradients are finished the way Megatron's `finalize_model_grads`
does (see `_sync_grads`); the loss handed to `backward` is already scaled so that the sum over
the data x context parallel ranks, divided by their number, is the gradient of the global mean
token loss (see loop.py).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.config import TrainConfig
from megatron_ext.training.schedule import lr_at


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm is NaN or infinite."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def tp_partial_grad_params(model: torch.nn.Module) -> tuple[list, list]:
    """Parameters whose gradients tensor-parallel ranks only hold in part.

    Returns (summed, averaged): q/k layernorm weights see only this rank's heads, so their
    gradients are summed over the TP group; parameters Megatron marks
    `average_gradients_across_tp_domain` are averaged over it.
    """
    summed, averaged = [], []
    for name, p in model.named_parameters():
        if getattr(p, "average_gradients_across_tp_domain", False):
            averaged.append(p)
        elif "q_layernorm" in name or "k_layernorm" in name:
            summed.append(p)
    return summed, averaged


def grad_norm(params: list[torch.nn.Parameter], tp_group) -> float:
    """Global L2 norm of the gradients: TP-sharded params summed over the TP group, others once.

    Call after the gradients are finished (identical across data-parallel ranks).
    """
    sharded = torch.zeros((), dtype=torch.float64)
    shared = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            shared += sq
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    return math.sqrt((sharded + shared).item())


class PlainEngine:
    """AdamW on a Megatron GPTModel, data x context x tensor parallel, without DeepSpeed."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, *, dp_cp_group, tp_group
                 ) -> None:
        if cfg.dtype == "fp16":
            raise ValueError("train.dtype='fp16' needs dynamic loss scaling, which only the "
                             "DeepSpeed path has: set deepspeed.enabled=true, or use bf16/fp32")
        self.module = model
        self.runner = model  # what the loop calls forward on
        self.cfg = cfg
        self.dp_cp_group, self.tp_group = dp_cp_group, tp_group
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters: list[torch.Tensor] | None = None
        groups = param_groups(model, cfg.weight_decay)
        if cfg.dtype == "bf16":  # fp32 master weights; the model keeps bf16 copies
            self.masters = [p.detach().float().clone() for p in self.params]
            index = {id(p): i for i, p in enumerate(self.params)}
            groups = [{**g, "params": [self.masters[index[id(p)]] for p in g["params"]]}
                      for g in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.lr = lr_at(0, cfg)
        """The learning rate the last `finish_step` used."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def _sync_grads(self) -> None:
        summed, averaged = tp_partial_grad_params(self.module)
        tp = dist.get_world_size(self.tp_group)
        if tp > 1:
            for p in summed + averaged:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.tp_group)  # SUM; gloo has no AVG
            for p in averaged:
                if p.grad is not None:
                    p.grad /= tp
        n = dist.get_world_size(self.dp_cp_group)
        if n > 1:  # data x context parallel ranks: the mean of the scaled losses' gradients
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.dp_cp_group)
                    p.grad /= n

    def finish_step(self, step: int) -> float:
        """Finish gradients, check them, clip, step AdamW at lr_at(step); returns the norm.

        Raises:
            NonFiniteError: the gradient norm is NaN or infinite (no parameter is changed).
        """
        self._sync_grads()
        norm = grad_norm(self.params, self.tp_group)
        if not math.isfinite(norm):
            raise NonFiniteError(f"gradient norm is {norm} at step {step}")
        scale = 1.0
        if self.cfg.grad_clip and norm > self.cfg.grad_clip:
            scale = self.cfg.grad_clip / (norm + 1e-6)
        self.lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if self.masters is not None:
            for p, m in zip(self.params, self.masters):
                m.grad = None if p.grad is None else p.grad.float() * scale
        elif scale != 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
        if self.masters is not None:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
        return norm

    def gathered(self):
        """Parameters are always whole here (the DeepSpeed path gathers ZeRO-3 shards)."""
        return contextlib.nullcontext()

    def save(self, directory: Path, rank: int) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "masters": self.masters}
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(state, directory / f"optim_rank{rank:05d}.pt")

    def load(self, directory: Path, rank: int) -> None:
        path = directory / f"optim_rank{rank:05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint was written by another "
                                    "world layout or by the DeepSpeed path")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.masters is not None:
            with torch.no_grad():
                for m, saved, p in zip(self.masters, state["masters"], self.params):
                    m.copy_(saved)
                    p.copy_(saved)


__all__ = ["NonFiniteError", "PlainEngine", "grad_norm", "param_groups",
           "tp_partial_grad_params"]
