"""Run tasks at lengths on one model and collect the results (the body of the eval CLI).

Prompts of every task and length are generated first (pure and fast), then the model answers
them one by one under a progress bar; perplexity passes share the bar. The result is a plain
dict, JSON-ready: per task and length the mean score, per-depth means for passkey and needles
(the heat-map data), the wall time, and every sample's prediction.
"""

from __future__ import annotations

import os
import platform
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from megatron_ext.eval import perplexity as ppl_mod
from megatron_ext.eval.model import EvalModel
from megatron_ext.eval.samples import LengthError, Sample
from megatron_ext.eval.scoring import score_sample
from megatron_ext.eval.tasks import generate_task

__all__ = ["hardware_info", "run_eval", "score_samples"]


def hardware_info() -> dict:
    """CPU / GPU model, thread count and library versions of this process."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def score_samples(model: EvalModel, samples: Sequence[Sample], advance=None) -> list[dict]:
    """Greedy answers of `model` to `samples`, decoded and scored; one record per sample."""
    records = []
    for s in samples:
        pred_ids = model.greedy(list(s.prompt_ids), len(s.answer_ids), s.answer_ids)
        text = model.tokenizer.decode(pred_ids)
        records.append({"task": s.task, "index": s.index, "depth": s.depth,
                        "tokens": s.num_tokens, "prediction": text,
                        "references": list(s.references),
                        **score_sample(s.task, text, s.references)})
        if advance:
            advance(1)
    return records


def _summary(records: list[dict]) -> dict:
    keys = [k for k in records[0] if k in ("score", "exact", "first_digit", "digits")]
    out = {k: float(np.mean([r[k] for r in records])) for k in keys}
    out["samples"] = len(records)
    out["mean_tokens"] = float(np.mean([r["tokens"] for r in records]))
    by_depth = defaultdict(list)
    for r in records:
        if r["depth"] is not None:
            by_depth[r["depth"]].append(r["score"])
    if by_depth:
        out["by_depth"] = {f"{d:g}": float(np.mean(v)) for d, v in sorted(by_depth.items())}
    return out


def run_eval(
    model: EvalModel,
    tasks: Sequence[str],
    lengths: Sequence[int],
    *,
    seed: int = 0,
    trials: int = 10,
    depths: Sequence[float] | None = None,
    ppl: dict | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate `model` on `tasks` x `lengths`.

    Args:
        model: an `EvalModel`.
        tasks: names from `tasks.ALL_TASKS` (already checked).
        lengths: evaluation lengths in tokens.
        seed: data seed (the same seed gives the same prompts on every machine).
        trials: samples per (length, depth) cell.
        depths: needle depths for passkey and niah (default: each task's own).
        ppl: keyword arguments of `perplexity.perplexity` (split, stride, max_windows, ...).
        progress: show a progress bar.

    Returns:
        {"tasks": {task: {str(length): summary}}, "samples": {...}, "wall_s": {...}}.

    Raises:
        LengthError: a length the model or a task cannot hold, before any model call.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    ppl = dict(ppl or {})
    for n in lengths:
        if n > model.max_length:
            raise LengthError(
                f"length {n} is more than this model holds (inference.max_seq_len="
                f"{model.max_length}); allow it with --set inference.max_seq_len={n}")
    plan: list[tuple[str, int, list[Sample] | int]] = []
    for task in tasks:
        for n in lengths:
            if task == "ppl":
                plan.append((task, n, ppl_mod.passes_needed(n, **ppl)))
            else:
                plan.append((task, n, generate_task(task, model.tokenizer, n, seed=seed,
                                                    trials=trials, depths=depths)))
    total = sum(p if isinstance(p, int) else len(p) for _, _, p in plan)
    results: dict = {"tasks": defaultdict(dict), "samples": defaultdict(dict), "wall_s": {}}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        job = bar.add_task("eval", total=total)
        for task, n, work in plan:
            bar.update(job, description=f"{task} @ {n}")
            t0 = time.perf_counter()
            if task == "ppl":
                out = ppl_mod.perplexity(model.token_losses, n, advance=lambda k: bar.advance(
                    job, k), eot_id=_eot(model), **ppl)
                results["tasks"]["ppl"][str(n)] = out
            else:
                records = score_samples(model, work, advance=lambda k: bar.advance(job, k))
                for name in dict.fromkeys(r["task"] for r in records):
                    mine = [r for r in records if r["task"] == name]
                    results["tasks"][name][str(n)] = _summary(mine)
                    results["samples"][name][str(n)] = mine
            results["wall_s"][f"{task}@{n}"] = round(time.perf_counter() - t0, 3)
    results["tasks"] = dict(results["tasks"])
    results["samples"] = dict(results["samples"])
    return results


def _eot(model: EvalModel) -> int:
    from megatron_ext.data.tokenizer import eot_id

    return eot_id(model.tokenizer)
