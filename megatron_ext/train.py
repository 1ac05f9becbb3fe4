"""Train a Megatron-core GPT on packed documents: `python -m megatron_ext.train --config RUN.yaml`.

Pipeline: config -> launcher-agnostic distributed init -> Megatron parallel state -> tokenizer
and packed batches (document boundaries kept) -> GPTModel with megatron_ext attention ->
AdamW with warm-up + cosine -> held-out evaluation. Rank 0 writes the resolved config,
tensorboard scalars, metrics.jsonl and a loss plot to `train.out_dir`.

Works under torchrun, the deepspeed launcher, srun and mpirun (see megatron_ext/dist.py), or as
a single process. Data parallel over the ranks left after tensor parallelism.

Not yet here (see the README's status table): context parallelism, the DeepSpeed engine and
checkpoints; a config asking for them is refused rather than ignored.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_ext.config import (
    RunConfig,
    TrainConfig,
    add_config_args,
    config_from_args,
    dump_config,
)
from megatron_ext.dist import destroy_distributed, init_distributed, is_main, print0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * frac))


def _refuse_unimplemented(cfg: RunConfig) -> None:
    if cfg.deepspeed.enabled:
        raise NotImplementedError("deepspeed.enabled=true: the DeepSpeed engine path is not "
                                  "implemented yet; use false")


def _batches(packed, cfg: RunConfig, dp_rank: int, dp_size: int) -> Iterator[dict]:
    from megatron_ext.data.packing import iterate_batches

    epoch = 0
    while True:
        n = 0
        for batch in iterate_batches(packed, cfg.train.micro_batch_size, seed=cfg.train.seed,
                                     rank=dp_rank, world_size=dp_size, epoch=epoch):
            n += 1
            yield batch
        if n == 0:
            raise ValueError(
                f"{len(packed)} packed sequences cannot fill one micro-batch of "
                f"{cfg.train.micro_batch_size} on each of {dp_size} data-parallel ranks; lower "
                "train.micro_batch_size or data.seq_length, or use more documents")
        epoch += 1


def _loss(model, batch: dict, mask_documents: bool, cp: tuple[str, int, int] | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token loss and token count of one micro-batch (this CP rank's shard of it)."""
    from megatron_ext.data.packing import IGNORE_INDEX
    from megatron_ext.layers.forward import gpt_forward

    lay = None
    if cp is not None:  # (layout, cp size, cp rank): keep this rank's tokens
        from megatron_ext.parallel.batch import cp_shard_batch

        layout, cp_size, cp_rank = cp
        local, lay = cp_shard_batch(batch, layout=layout, world_size=cp_size, rank=cp_rank,
                                    mask_documents=mask_documents)
        tokens, labels, positions, doc_ids = local["tokens"], local["labels"], \
            local["positions"], None  # positions -1 on padding slots
    else:
        tokens, labels = batch["tokens"], batch["labels"]
        if mask_documents:
            positions, doc_ids = batch["positions"], batch["doc_ids"]
        else:  # one stream per row: positions count from the row start, across documents
            positions, doc_ids = None, None
    mask = labels != IGNORE_INDEX
    per_token = gpt_forward(model, tokens, positions=positions, doc_ids=doc_ids, cp_layout=lay,
                            labels=labels.masked_fill(~mask, 0))
    return (per_token.float() * mask).sum(), mask.sum()


def _sync_grads(model, dp_group, tp_group, dp_size: int) -> None:
    """Finish the gradients the way Megatron's finalize_model_grads does (without its DDP).

    - TP: q/k layernorm weights (qk_layernorm) see only this rank's heads, so their gradients
      are summed over the TP group; params marked `average_gradients_across_tp_domain` are
      averaged over it.
    - DP x CP: each rank's loss is its tokens' summed loss x dp_size / global token count, so
      summing over the data-and-context-parallel group and dividing by dp_size gives the
      gradient of the global mean.
    """
    tp_sum, tp_avg = [], []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if getattr(p, "average_gradients_across_tp_domain", False):
            tp_avg.append(p.grad)
        elif "q_layernorm" in name or "k_layernorm" in name:
            tp_sum.append(p.grad)
    tp = dist.get_world_size(tp_group)
    if tp > 1:
        for g in tp_sum + tp_avg:
            dist.all_reduce(g, group=tp_group)  # SUM; gloo has no AVG
        for g in tp_avg:
            g /= tp
    if dist.get_world_size(dp_group) > 1:  # data x context parallel ranks
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= dp_size


def _grad_norm_sq(params: list[torch.nn.Parameter], tp_group) -> torch.Tensor:
    """Squared global grad norm: TP-sharded params summed over the TP group, others once."""
    sharded = torch.zeros((), dtype=torch.float64)
    shared = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            shared += sq
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    return sharded + shared


def train(cfg: RunConfig, *, progress: bool = True) -> dict[str, float]:
    """Run the configured training; returns final {'train_loss', 'eval_loss'} on every rank."""
    from megatron.core import parallel_state as ps
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from megatron_ext.data.dataset import build_datasets
    from megatron_ext.metrics import MetricsWriter
    from megatron_ext.specs import build_gpt_model

    _refuse_unimplemented(cfg)
    tp = cfg.parallel.tensor_parallel_size
    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"world size {world} is not divisible by tensor_parallel_size={tp}")
    cp_size = cfg.parallel.context_parallel_size
    if world % (tp * cp_size):
        raise ValueError(f"world size {world} is not divisible by tensor_parallel_size={tp} x "
                         f"context_parallel_size={cp_size}")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp_size)
    tp_group = ps.get_tensor_model_parallel_group()
    # gradients and token counts are summed over data AND context parallel ranks
    dp_group = ps.get_data_parallel_group(with_context_parallel=True)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    cp = None
    if cp_size > 1:
        cp = (cfg.parallel.cp_layout, cp_size, ps.get_context_parallel_rank())
    print0(f"world {world}: tensor parallel {tp} x context parallel {cp_size} "
           f"({cfg.parallel.cp_layout}, {cfg.parallel.cp_algorithm}) x data parallel {dp_size}")

    torch.manual_seed(cfg.train.seed)
    data = build_datasets(cfg.data, seed=cfg.train.seed, progress=progress and is_main())
    print0(f"packed {len(data.train)} train / {len(data.eval)} held-out sequences of "
           f"{cfg.data.seq_length} tokens (vocab {data.vocab_size})")
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=data.vocab_size, tp=tp,
                            cp=cp_size, cp_algorithm=cfg.parallel.cp_algorithm,
                            dtype=cfg.train.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"GPTModel: {n_params:,} parameters per rank")

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.train.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))

    writer = MetricsWriter(cfg.train.out_dir, enabled=is_main())
    if is_main():
        dump_config(cfg, writer.out_dir / "config.yaml")
    batches = _batches(data.train, cfg, dp_rank, dp_size)
    mask_docs = cfg.attention.mask_documents

    def evaluate() -> float:
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i, batch in enumerate(_batches(data.eval, cfg, dp_rank, dp_size)):
                if i >= cfg.train.eval_batches:
                    break
                s, n = _loss(model, batch, mask_docs, cp)
                tot += torch.stack([s.double(), n.double()])
        dist.all_reduce(tot, group=dp_group)
        model.train()
        return (tot[0] / tot[1]).item()

    columns = (TextColumn("train"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn())
    train_loss = float("nan")
    eval_loss = float("nan")
    t0 = time.perf_counter()
    with Progress(*columns, disable=not (progress and is_main())) as bar:
        task = bar.add_task("train", total=cfg.train.steps, loss=float("nan"))
        for step in range(cfg.train.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.train)
            tot = torch.zeros(2, dtype=torch.float64)
            sums = []
            for _ in range(cfg.train.grad_accum_steps):
                s, n = _loss(model, next(batches), mask_docs, cp)
                sums.append(s)
                tot += torch.stack([s.detach().double(), n.double()])
            # normalise by the global token count of the step (exact under DP and accumulation)
            dist.all_reduce(tot, group=dp_group)
            (torch.stack(sums).sum() * (dp_size / tot[1].float())).backward()
            _sync_grads(model, dp_group, tp_group, dp_size)
            gnorm = _grad_norm_sq(params, tp_group).sqrt().item()
            if cfg.train.grad_clip and gnorm > cfg.train.grad_clip:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(cfg.train.grad_clip / (gnorm + 1e-6))
            opt.step()
            opt.zero_grad(set_to_none=True)
            train_loss = (tot[0] / tot[1]).item()
            bar.update(task, advance=1, loss=train_loss)
            if step % cfg.train.log_interval == 0 or step == cfg.train.steps - 1:
                writer.log(step, train_loss=train_loss, lr=lr_at(step, cfg.train),
                           grad_norm=gnorm)
                if not progress:
                    print0(f"step {step:5d}  loss {train_loss:.4f}  grad_norm {gnorm:.3f}")
            if cfg.train.eval_interval and (step + 1) % cfg.train.eval_interval == 0:
                eval_loss = evaluate()
                writer.log(step, eval_loss=eval_loss)
    eval_loss = evaluate()
    writer.log(cfg.train.steps - 1, eval_loss=eval_loss)
    elapsed = time.perf_counter() - t0
    tokens = cfg.train.steps * cfg.train.grad_accum_steps * cfg.train.micro_batch_size * \
        cfg.data.seq_length * dp_size
    print0(f"done: {cfg.train.steps} steps in {elapsed:.1f} s ({tokens / elapsed:,.0f} tok/s), "
           f"final train loss {train_loss:.4f}, held-out loss {eval_loss:.4f} "
           f"(ppl {math.exp(min(eval_loss, 50)):.1f})")
    plot = writer.plot(["train_loss", "eval_loss"], "loss.png", title="tiny GPT")
    if plot is not None:
        print0(f"wrote {writer.out_dir}/config.yaml, metrics.jsonl, tensorboard/, {plot.name}")
    writer.close()
    ps.destroy_model_parallel()
    return {"train_loss": train_loss, "eval_loss": eval_loss}


_KNOWN_HARMLESS_WARNINGS = (
    r"Transformer Engine and Apex are not installed",  # local (non-TE) Megatron modules
    r"Apex is not installed",
    r"full scope is deprecated",  # megatron-core 0.16 default cuda_graph_scope
)


def _quiet_known_warnings() -> None:
    for pattern in _KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> None:
    _quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the environment is what counts")
    parser.add_argument("--no-progress", action="store_true", help="log lines, no progress bars")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    init_distributed(cfg.parallel.backend)
    try:
        train(cfg, progress=not args.no_progress)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
