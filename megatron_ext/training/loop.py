"""The training loop: config -> preflight -> Megatron parallel state -> data -> model ->
(plain or DeepSpeed) engine -> steps with checkpoints, evaluation and metrics.

Order matters for safety: every check that can refuse the run (config, out_dir, init_from
checkpoint and its compatibility, vocabulary, weights fitting the model) happens before the
run writes its first file, so a refused run leaves `train.out_dir` as it was.

Loss normalisation. A step's loss is the mean token loss over every micro-batch of every
data-parallel rank. The token count is known before any forward (labels != -100), so each
micro-batch's summed token loss is scaled by (ranks in the data x context group) / (global token
count) before its own backward; the engines average gradients over that group, which gives
the gradient of the global mean however the tokens are split by accumulation, data and context
parallelism (the test compares CP=2 and ZeRO 1-3 against single-process runs).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_ext.checkpoint import CheckpointError
from megatron_ext.config import ConfigError, RunConfig, dump_config, load_config
from megatron_ext.dist import device as compute_device
from megatron_ext.dist import is_main, print0
from megatron_ext.training import checkpointing as ckpt
from megatron_ext.training.batches import BatchStream, truncate
from megatron_ext.training.optim import NonFiniteError
from megatron_ext.training.preflight import check_config, check_out_dir, check_vocab, cp_multiple
from megatron_ext.training.schedule import seq_length_at


class TrainingStoppedError(RuntimeError):
    """The run stopped on a non-finite loss or gradient; the message says where to restart."""


def _rank0(fn, *args, **kwargs):
    """fn on rank 0, its result (or its ConfigError / CheckpointError) on every rank."""
    box: list[Any] = [None, None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = fn(*args, **kwargs)
        except Exception as e:  # every rank must leave the broadcast below
            error, box[1] = e, (type(e).__name__, str(e))
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        kind, message = box[1]
        cls = {"CheckpointError": CheckpointError, "ConfigError": ConfigError}.get(kind)
        raise (cls or RuntimeError)(message if cls else f"rank 0 failed: {kind}: {message}")
    return box[0]


def micro_loss(model, batch: dict, *, mask_documents: bool, cp: tuple | None,
               device: torch.device, seq_len: int | None = None
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
    tokens, labels = tokens.to(device), labels.to(device)
    positions = None if positions is None else positions.to(device)
    doc_ids = None if doc_ids is None else doc_ids.to(device)
    mask = labels != IGNORE_INDEX
    per_token = gpt_forward(model, tokens, positions=positions, doc_ids=doc_ids, cp_layout=lay,
                            labels=labels.masked_fill(~mask, 0), seq_len=seq_len)
    return (per_token.float() * mask).sum(), mask.sum()


def run_layout(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """What a checkpoint needs to resume exactly: world, parallel sizes, engine, batch shape."""
    tp, cp = cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size
    return {"world_size": world_size, "tensor_parallel_size": tp, "context_parallel_size": cp,
            "data_parallel_size": world_size // (tp * cp), "deepspeed": cfg.deepspeed.enabled,
            "zero_stage": cfg.deepspeed.zero_stage if cfg.deepspeed.enabled else None,
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum_steps": cfg.train.grad_accum_steps}


def _count_tokens(batches: list[dict]) -> int:
    from megatron_ext.data.packing import IGNORE_INDEX

    return int(sum((b["labels"] != IGNORE_INDEX).sum().item() for b in batches))


def _hf_directory(path: str | os.PathLike) -> Path | None:
    """The path when it is a Hugging Face model directory (config.json, no checkpoint marker)."""
    from megatron_ext.checkpoint import MARKER

    p = Path(path)
    return p if (p / "config.json").is_file() and not (p / MARKER).exists() else None


def _init_checks(cfg: RunConfig, *, resume: bool, overwrite: bool) -> tuple[str, Path | None,
                                                                               list[str]]:
    """Checks before Megatron state exists: config, out_dir, init_from. Writes nothing."""
    check_config(cfg, dist.get_world_size())
    mode = _rank0(check_out_dir, cfg.train.out_dir, resume=resume, overwrite=overwrite)
    source, notes = None, []
    if cfg.train.init_from and mode != "resume":
        from megatron_ext.training.continued import check_switch

        hf = _hf_directory(cfg.train.init_from)
        if hf is not None:  # a Hugging Face model: its config read by the converter
            from megatron_ext.convert import hf_to_run_config

            if cfg.parallel.tensor_parallel_size != 1:
                raise ConfigError(
                    f"train.init_from={cfg.train.init_from!r} is a Hugging Face directory, read "
                    "directly at tensor_parallel_size=1 only; convert it first (python -m "
                    "megatron_ext.convert hf2mcore) to start at "
                    f"parallel.tensor_parallel_size={cfg.parallel.tensor_parallel_size}")
            source, saved = hf, hf_to_run_config(hf)
        else:
            source = _rank0(ckpt.resolve_checkpoint, cfg.train.init_from)
            _rank0(ckpt.verify_checkpoint, source)
            saved = load_config(source / "config.yaml")
        notes = check_switch(saved, cfg, cfg.train.init_from)
    if mode == "resume":  # the checkpoint is verified before anything is written
        source = _rank0(ckpt.resolve_checkpoint, cfg.train.out_dir)
        manifest = _rank0(ckpt.verify_checkpoint, source)
        ckpt.check_layout(manifest, run_layout(cfg, dist.get_world_size()), source)
        if manifest["step"] >= cfg.train.steps:
            raise ConfigError(f"--resume: the checkpoint {source.name} is at step "
                              f"{manifest['step']} and train.steps={cfg.train.steps}; raise "
                              "train.steps to train further")
        saved = load_config(Path(cfg.train.out_dir) / "config.yaml")
        fixed = ("model", "attention", "parallel", "data", "deepspeed")
        diff = [s for s in fixed if getattr(saved, s) != getattr(cfg, s)]
        if diff:
            raise ConfigError(f"--resume: the {', '.join(diff)} section(s) differ from "
                              f"{cfg.train.out_dir}/config.yaml; a resumed run keeps them (only "
                              "the train section may change, e.g. train.steps)")
    return mode, source, notes


def train(cfg: RunConfig, *, progress: bool = True, resume: bool = False,
          overwrite: bool = False) -> dict[str, Any]:
    """Run the configured training (collective over the default process group).

    Args:
        cfg: the run config.
        progress: rich progress bar on rank 0 (else one log line per `train.log_interval`).
        resume: continue `train.out_dir` from its latest checkpoint.
        overwrite: replace a non-empty `train.out_dir`.

    Returns:
        {'train_loss', 'eval_loss', 'losses' (this run's per-step losses), 'checkpoint'} on
        every rank.

    Raises:
        ConfigError: a refused config (nothing written).
        CheckpointError: a missing, corrupt or unfitting checkpoint (nothing written).
        TrainingStoppedError: non-finite loss or gradient; the last good checkpoint is intact.
    """
    from megatron.core import parallel_state as ps

    mode, source, notes = _init_checks(cfg, resume=resume, overwrite=overwrite)
    tp, cp_size = cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp_size)
    try:
        return _train(cfg, mode, source, notes, progress=progress)
    finally:
        ps.destroy_model_parallel()


def _build_model(cfg: RunConfig, vocab: int, device: torch.device):
    from megatron_ext.specs import build_gpt_model
    from megatron_ext.training.loss import enable_chunked_loss
    from megatron_ext.training.recompute import apply_activation_checkpointing

    torch.manual_seed(cfg.train.seed)
    on_cpu = device.type == "cpu"
    if not on_cpu:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(cfg.train.seed)
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=vocab,
                            tp=cfg.parallel.tensor_parallel_size,
                            cp=cfg.parallel.context_parallel_size,
                            cp_algorithm=cfg.parallel.cp_algorithm, dtype=cfg.train.dtype,
                            use_cpu_initialization=on_cpu)
    model.to(device)
    if cfg.train.loss_chunk_size:
        enable_chunked_loss(model, cfg.train.loss_chunk_size)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    return model


def _prepare_out_dir(cfg: RunConfig, mode: str, rows: list, config_text: str) -> Path:
    from megatron_ext.training.observe import write_json

    out = Path(cfg.train.out_dir)
    if is_main():
        if mode == "overwrite":
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.yaml.tmp"
        tmp.write_text(config_text, encoding="utf-8")
        tmp.replace(out / "config.yaml")
        write_json(out / "world.json", rows)
    dist.barrier()
    return out


def _train(cfg: RunConfig, mode: str, source: Path | None, notes: list[str], *,
           progress: bool) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    from megatron_ext.checkpoint import load_megatron_checkpoint
    from megatron_ext.data.dataset import build_datasets, tokenizer_vocab_size
    from megatron_ext.metrics import MetricsWriter
    from megatron_ext.training.observe import (
        flops_per_token,
        layout_table,
        peak_flops,
        world_layout,
    )

    t = cfg.train
    device = compute_device()
    tp_group = ps.get_tensor_model_parallel_group()
    dp_group = ps.get_data_parallel_group()
    dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    n_dp_cp = dist.get_world_size(dp_cp_group)
    cp_size = cfg.parallel.context_parallel_size
    cp = (cfg.parallel.cp_layout, cp_size, ps.get_context_parallel_rank()) if cp_size > 1 \
        else None

    vocab = check_vocab(cfg, tokenizer_vocab_size(cfg.data))  # before tokenising anything
    data = build_datasets(cfg.data, seed=t.seed, progress=progress and is_main())
    model = _build_model(cfg, vocab, device)
    if source is not None and mode != "resume":  # continued pretraining: weights only
        if _hf_directory(source) is not None:
            from megatron_ext.convert import load_hf_into

            load_hf_into(model, source)  # converted on the fly, tensor by tensor
        else:
            load_megatron_checkpoint(model, source / "model")
    rows = world_layout()

    # ---- nothing was written before this line
    config_text = dump_config(cfg)
    out = _prepare_out_dir(cfg, mode, rows, config_text)
    if is_main():
        from rich.console import Console

        Console().print(layout_table(rows))
    n_params = sum(p.numel() for p in model.parameters())
    tp = cfg.parallel.tensor_parallel_size
    how = f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}" if cfg.deepspeed.enabled else \
        "plain AdamW"
    print0(f"world {dist.get_world_size()}: tensor parallel {tp} x context parallel {cp_size} "
           f"({cfg.parallel.cp_layout}, {cfg.parallel.cp_algorithm}) x data parallel {dp_size}; "
           f"{how}, {t.dtype} on {device.type}")
    print0(f"packed {len(data.train)} train / {len(data.eval)} held-out sequences of "
           f"{cfg.data.seq_length} tokens (vocab {vocab}); GPTModel {n_params:,} parameters "
           "per rank")
    if source is not None and mode != "resume":
        print0(f"continued pretraining from {source}: " + ("; ".join(notes) or "same settings"))

    if cfg.deepspeed.enabled:
        from megatron_ext.training.engine import DeepSpeedEngine

        engine = DeepSpeedEngine(model, cfg, tp_group=tp_group, out_dir=out)
    else:
        from megatron_ext.training.optim import PlainEngine

        engine = PlainEngine(model, t, dp_cp_group=dp_cp_group, tp_group=tp_group)
    model = engine.runner  # the module, or the DeepSpeed engine wrapping it
    stream = BatchStream(data.train, t.micro_batch_size, seed=t.seed, dp_rank=dp_rank,
                         dp_size=dp_size)
    layout = run_layout(cfg, dist.get_world_size())
    root = out / "checkpoints"
    start = 0
    if mode == "resume":
        where = source  # verified in _init_checks
        state = ckpt.load_checkpoint(where, engine=engine, layout=layout,
                                     deepspeed=cfg.deepspeed.enabled, verified=True)
        start = int(state["step"])
        stream.restore(state["data"])
        ckpt.restore_rng(state["rng"])
        print0(f"resumed from {where} at step {start}")
    writer = MetricsWriter(out, enabled=is_main(), resume_step=start if mode == "resume"
                           else None)
    mask_docs = cfg.attention.mask_documents
    mult = cp_multiple(cfg)
    peak = peak_flops(t.peak_tflops, device)

    def evaluate() -> float:
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        eval_stream = BatchStream(data.eval, t.micro_batch_size, seed=t.seed, dp_rank=dp_rank,
                                  dp_size=dp_size)
        with torch.no_grad():
            for _ in range(t.eval_batches):
                s, n = micro_loss(model, next(eval_stream), mask_documents=mask_docs, cp=cp,
                                  device=device)
                tot += torch.stack([s.double().cpu(), n.double().cpu()])
        dist.all_reduce(tot, group=dp_cp_group)
        model.train()
        return (tot[0] / tot[1]).item()

    losses: list[float] = []
    train_loss = eval_loss = float("nan")
    last_saved = source if mode == "resume" else None
    model.train()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("train"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"),
               TextColumn("{task.fields[tps]:,.0f} tok/s"), TextColumn("{task.fields[mfu]}"),
               TimeElapsedColumn())
    t_run = time.perf_counter()
    try:
        with Progress(*columns, disable=not (progress and is_main())) as bar:
            task = bar.add_task("train", total=t.steps, completed=start, loss=float("nan"),
                                tps=0.0, mfu="")
            for step in range(start, t.steps):
                t0 = time.perf_counter()
                length = seq_length_at(step, t, cfg.data.seq_length, mult)
                micro = [truncate(next(stream), length) for _ in range(t.grad_accum_steps)]
                count = torch.tensor([float(_count_tokens(micro))], dtype=torch.float64)
                dist.all_reduce(count, group=dp_group)
                scale = n_dp_cp / max(count.item(), 1.0)
                tot = torch.zeros(1, dtype=torch.float64)
                for i, batch in enumerate(micro):
                    s, _ = micro_loss(model, batch, mask_documents=mask_docs, cp=cp,
                                      device=device)
                    tot += s.detach().double().cpu()
                    engine.backward(s * scale, last=i == len(micro) - 1)
                dist.all_reduce(tot, group=dp_cp_group)
                train_loss = tot.item() / max(count.item(), 1.0)
                if not math.isfinite(train_loss):
                    raise NonFiniteError(f"loss is {train_loss} at step {step}")
                gnorm = engine.finish_step(step)
                lr = engine.lr
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                tokens = t.grad_accum_steps * t.micro_batch_size * length * dp_size
                tps = tokens / dt
                record = {"loss": train_loss, "lr": lr, "grad_norm": gnorm,
                          "tokens_per_s": tps, "seq_length": length}
                mfu = ""
                if peak is not None:
                    fl = flops_per_token(cfg.model, n_params * tp, length)
                    record["mfu"] = fl * tps / (peak * dist.get_world_size())
                    mfu = f"MFU {100 * record['mfu']:.1f}%"
                losses.append(train_loss)
                done = step + 1
                if t.eval_interval and done % t.eval_interval == 0 or done == t.steps:
                    eval_loss = evaluate()
                    record["eval_loss"] = eval_loss
                writer.log(step, **record)
                bar.update(task, advance=1, loss=train_loss, tps=tps, mfu=mfu)
                if not progress and (step % t.log_interval == 0 or done == t.steps):
                    print0(f"step {step:5d}  loss {train_loss:.4f}  lr {lr:.2e}  grad_norm "
                           f"{gnorm:.3f}  {tps:,.0f} tok/s {mfu}".rstrip())
                if t.save_interval and done % t.save_interval == 0 or done == t.steps:
                    last_saved = ckpt.save_checkpoint(
                        root, done, engine=engine,
                        rank_state={"step": done, "data": stream.state(),
                                    "rng": ckpt.capture_rng()},
                        config_text=config_text, layout=layout, keep=t.keep_checkpoints)
    except NonFiniteError as e:
        writer.close()
        where = f"the last good checkpoint is {last_saved}" if last_saved else \
            "no checkpoint was saved before it"
        raise TrainingStoppedError(f"training stopped: {e} (non-finite values; lower train.lr, "
                              f"check the data or use fp32); {where}") from e
    elapsed = time.perf_counter() - t_run
    print0(f"done: {t.steps - start} steps in {elapsed:.1f} s, final train loss "
           f"{train_loss:.4f}, held-out loss {eval_loss:.4f} "
           f"(ppl {math.exp(min(eval_loss, 50)):.2f})")
    plot = writer.plot(["loss", "eval_loss"], "loss.png", title=f"{cfg.attention.variant} GPT")
    writer.close()
    print0(f"run directory {out}: config.yaml, world.json, metrics.jsonl, tensorboard/"
           f"{', ' + plot.name if plot else ''}"
           f"{', deepspeed.json' if cfg.deepspeed.enabled else ''}; checkpoint {last_saved}")
    with contextlib.suppress(Exception):
        dist.barrier()
    return {"train_loss": train_loss, "eval_loss": eval_loss, "losses": losses,
            "checkpoint": str(last_saved)}


__all__ = ["TrainingStoppedError", "micro_loss", "train"]
