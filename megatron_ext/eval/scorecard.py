"""`python -m megatron_ext.eval.scorecard --plan configs/eval/scorecard_cpu.yaml`: the scorecard.

One command, three stages, each skipped when its output exists (`--force` redoes them):

1. train every model of the plan that has no checkpoint (`python -m megatron_ext.train`, or
   torchrun with `nproc` ranks for the context-parallel run), timing it;
2. evaluate every method (a model plus `--set` overrides) at `multiples` x `train_length` with
   `python -m megatron_ext.eval`, one results JSON per method;
3. render `docs/scorecard.md` (method x length tables of passkey exact match and perplexity,
   the targets with their outcome, hardware and wall time of every run) and the PNG plots
   (`docs/scorecard/passkey_<method>.png` depth x length heat maps; `ppl_vs_length.png`).

`--render-only` does stage 3 from existing results. Nothing here is tuned on the evaluation
seed: the plan fixes every knob before any result exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from megatron_ext.eval.schedule import Job, run_jobs, threads_per_slot

__all__ = ["eval_jobs", "load_plan", "main", "render", "train_jobs"]

PASSKEY_TARGET, PPL_TOLERANCE = 0.95, 0.10
TARGET_METHODS = ("dca", "longheads", "hybrid")


def load_plan(path: str | os.PathLike) -> dict:
    """Read and check a plan YAML (keys as in configs/eval/scorecard_cpu.yaml)."""
    plan = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    need = ("train_length", "multiples", "runs_dir", "seed", "trials", "depths", "tasks",
            "models", "methods")
    missing = [k for k in need if k not in plan]
    if missing:
        raise ValueError(f"plan {path}: missing keys {missing}")
    mix = plan.get("retrieval_mix")
    if mix is not None:
        if "seed" not in mix or int(mix["seed"]) == int(plan["seed"]):
            raise ValueError(f"plan {path}: retrieval_mix.seed={mix.get('seed')!r}; expected a "
                             f"seed other than the evaluation seed {plan['seed']}")
        if not 0.0 < float(mix.get("weight", 0)) < 1.0 or int(mix.get("docs", 0)) < 1:
            raise ValueError(f"plan {path}: retrieval_mix={mix}; expected docs >= 1 and "
                             "0 < weight < 1")
    for name, m in plan["models"].items():
        if m.get("mix_retrieval") and mix is None:
            raise ValueError(f"plan {path}: model {name!r} sets mix_retrieval but the plan has "
                             "no retrieval_mix section")
        ml = m.get("mix_length")
        if ml is not None and (not m.get("mix_retrieval") or not isinstance(ml, int) or ml < 32):
            raise ValueError(f"plan {path}: model {name!r} has mix_length={ml!r}; expected an "
                             "int >= 32 on a model with mix_retrieval: true")
    for name, m in plan["methods"].items():
        if m.get("model") not in plan["models"]:
            raise ValueError(f"plan {path}: method {name!r} uses model {m.get('model')!r}; "
                             f"expected one of {sorted(plan['models'])}")
    return plan


def _retrieval_blend(plan: dict, root: Path, length: int | None = None) -> str:
    """The ``data.blend`` override of a model trained with synthetic passkey documents of up to
    ``length`` tokens (default the plan's train_length), written once per (seed, count, length)
    under runs_dir; see ``retrieval_mix.py``."""
    from megatron_ext.data.tokenizer import load_tokenizer
    from megatron_ext.eval.retrieval_mix import write_retrieval_corpus

    mix = plan["retrieval_mix"]
    seed, docs = int(mix["seed"]), int(mix["docs"])
    length = int(length or plan["train_length"])
    path = root / f"retrieval_mix_s{seed}_n{docs}_L{length}.jsonl"
    if not path.exists():
        write_retrieval_corpus(path, load_tokenizer(None), docs=docs, max_length=length,
                               seed=seed)
    w = float(mix["weight"])
    return f"data.blend=[{{path: embedded, weight: {1 - w:g}}}, {{path: {path}, weight: {w:g}}}]"


def _train_set(m: dict) -> list[str]:
    """A model's ``train_set`` overrides, with nested lists (YAML anchors reused inside a
    list) flattened in order."""
    out: list[str] = []
    for item in m.get("train_set", []):
        out += [str(x) for x in item] if isinstance(item, list) else [str(item)]
    return out


def _init_from(m: dict) -> str | None:
    """The ``train.init_from`` a model's training will use: its config with its train_set
    applied by the same loader training uses."""
    from megatron_ext.config import load_config

    return load_config(m["config"], _train_set(m)).train.init_from


def train_jobs(plan: dict, *, force: bool = False) -> list[Job]:
    """Stage 1 as jobs: train each model without a checkpoint, then write train_info.json.

    A model initialised from another model of the plan (``train.init_from`` naming its
    directory) waits for that model's training.
    """
    from megatron_ext.eval.runner import hardware_info

    root = Path(plan["runs_dir"])
    dirs = {(root / n).resolve(): n for n in plan["models"]}
    jobs = []
    for name, m in plan["models"].items():
        out = root / name
        if (out / "checkpoints" / "latest").exists() and not force:
            continue
        sets = ["--set", f"train.out_dir={out}"]
        if m.get("mix_retrieval"):
            sets += ["--set", _retrieval_blend(plan, root, m.get("mix_length"))]
        for item in _train_set(m):  # e.g. a shorter schedule for a quick plan
            sets += ["--set", item]
        nproc = int(m.get("nproc", 1))
        launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
                  if nproc > 1 else [sys.executable])
        cmd = [*launch, "-m", "megatron_ext.train", "--config", m["config"], "--no-progress",
               *sets, *(["--overwrite"] if force else [])]
        init = _init_from(m)
        base = dirs.get(Path(init).resolve()) if init else None
        after = {f"train {base}"} if base and base != name else set()

        def done(wall: float, out: Path = out, m: dict = m, nproc: int = nproc) -> None:
            info = {"config": m["config"], "nproc": nproc, "wall_s": round(wall, 1),
                    "threads": threads_per_slot(plan.get("_jobs", 1)),
                    "jobs": plan.get("_jobs", 1), "hardware": hardware_info()}
            (out / "train_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")

        jobs.append(Job(f"train {name}", cmd, root / "logs" / f"train_{name}.log", ranks=nproc,
                        after=after, done=done))
    return jobs


def eval_jobs(plan: dict, *, force: bool = False, trained: set[str] = frozenset()) -> list[Job]:
    """Stage 2 as jobs: one results JSON per method under runs_dir/results/, each waiting for
    its model when that model is among ``trained`` (the jobs of stage 1)."""
    root = Path(plan["runs_dir"])
    lengths = ",".join(str(plan["train_length"] * k) for k in plan["multiples"])
    ppl = plan.get("ppl", {})
    jobs = []
    for name, m in plan["methods"].items():
        out = root / "results" / f"{name}.json"
        if out.exists() and not force:
            continue
        cmd = [sys.executable, "-m", "megatron_ext.eval", "--checkpoint",
               str(root / m["model"]), "--tasks", ",".join(plan["tasks"]), "--lengths", lengths,
               "--seed", str(plan["seed"]), "--trials", str(plan["trials"]),
               "--depths", ",".join(str(d) for d in plan["depths"]), "--out", str(out),
               "--no-progress", "--ppl-split", ppl.get("split", "test"),
               "--ppl-windows", str(ppl.get("windows", 8))]
        if ppl.get("docs"):
            cmd += ["--ppl-docs", str(ppl["docs"])]
        for s in m.get("set", []):
            cmd += ["--set", s]
        after = {f"train {m['model']}"} if m["model"] in trained else set()
        jobs.append(Job(f"eval {name}", cmd, root / "logs" / f"eval_{name}.log", after=after))
    return jobs


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}"


def _ppl(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _target_outcome(in_dist: float | None, pk: float, ratio: float | None) -> str:
    """Met / missed, and why, for a method with targets (passkey at 1x and 32x, ppl 16x/1x)."""
    pk_ok, ppl_ok = pk >= PASSKEY_TARGET, ratio is not None and ratio <= 1 + PPL_TOLERANCE
    if pk_ok and ppl_ok:
        return "met"
    why = []
    if not pk_ok:
        if not in_dist:
            why.append("exact-match passkey is 0% already at 1×, so there is nothing to extend "
                       "at this budget")
        elif in_dist < PASSKEY_TARGET:
            why.append(f"the base model reaches only {_pct(in_dist)}% at 1×, so "
                       f"{PASSKEY_TARGET:.0%} at 32× is out of reach; at 32× it keeps "
                       f"{_pct(min(pk / in_dist, 1.0))}% of its 1× score")
        else:
            why.append(f"passkey falls from {_pct(in_dist)}% at 1× to {_pct(pk)}% at 32×")
    if not ppl_ok:
        why.append("perplexity not measured at 16×" if ratio is None else
                   f"perplexity at 16× is {ratio:.2f}× its 1× value")
    return "missed: " + "; ".join(why)


def _control_outcome(in_dist: float | None, pk: float, ratio: float | None) -> str:
    """What the RoPE control shows: a collapse where it had skill at 1x, or why it cannot."""
    if in_dist and pk <= in_dist / 2:
        return f"collapses in passkey, as expected ({_pct(in_dist)}% at 1×, {_pct(pk)}% at 32×)"
    if ratio is not None and ratio > 1 + PPL_TOLERANCE:
        return "collapses in perplexity, as expected"
    if not in_dist:
        return ("no collapse to show: passkey is 0% already at 1× and perplexity does not rise "
                "with length at this budget")
    return "does not collapse"


def render(plan: dict, out_md: str | os.PathLike = "docs/scorecard.md") -> Path:
    """Stage 3: write the markdown scorecard and its plots from runs_dir/results/*.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    root, md = Path(plan["runs_dir"]), Path(out_md)
    fig_dir = md.parent / md.stem  # docs/scorecard.md -> docs/scorecard/*.png
    fig_dir.mkdir(parents=True, exist_ok=True)
    T, mults = plan["train_length"], plan["multiples"]
    lengths = [str(T * k) for k in mults]
    res = {}
    for name in plan["methods"]:
        f = root / "results" / f"{name}.json"
        if f.exists():
            res[name] = json.loads(f.read_text(encoding="utf-8"))
    missing = [n for n in plan["methods"] if n not in res]

    def passkey(name: str, n: str) -> float | None:
        return res[name]["tasks"].get("passkey", {}).get(n, {}).get("score")

    def ppl(name: str, n: str, proto: str = "truncation") -> float | None:
        return res[name]["tasks"].get("ppl", {}).get(n, {}).get(proto, {}).get("ppl")

    head = "| method | " + " | ".join(f"{k}× ({T * k})" for k in mults) + " |"
    sep = "|---|" + "---|" * len(mults)
    lines = [
        "# Scorecard: long-context methods on small self-trained models", "",
        f"Generated by `python -m megatron_ext.eval.scorecard --plan {plan['_path']}"
        f"{'' if md.name == 'scorecard.md' else f' --out {out_md}'}` "
        "(docs/eval.md: protocols). The models are small and trained here on the embedded "
        "corpus; no pretrained weights are available offline, so compare trends with the "
        "papers, not absolute numbers.", "",
        f"Training length T = {T}; evaluation seed {plan['seed']}; {plan['trials']} trial(s) per "
        f"(length, depth) cell over depths {plan['depths']}.", "",
    ]
    mixed = [f"{n} (128-{m.get('mix_length', T)} tokens)"
             for n, m in plan["models"].items() if m.get("mix_retrieval")]
    if mixed:
        mix = plan["retrieval_mix"]
        lines += [f"**Trained with synthetic retrieval:** {float(mix['weight']):.0%} of the "
                  f"training rows of the models {', '.join(mixed)} were passkey documents in the "
                  f"evaluation's template with the answer, from their own seed {mix['seed']} "
                  "(docs/eval.md, \"Making retrieval learnable\"). Retrieval scores here are "
                  "those of models taught the task at T, not of models trained on prose alone.",
                  ""]
    if missing:
        lines += [f"**Not run yet:** {', '.join(missing)} (no results file under "
                  f"`{root}/results/`). Run the command above to train and evaluate them.", ""]
    lines += ["## Passkey retrieval, exact match (%)", "", head, sep]
    lines += [f"| {n} | " + " | ".join(_pct(passkey(n, L)) for L in lengths) + " |" for n in res]

    def partial(name: str, n: str, key: str) -> float | None:
        return res[name]["tasks"].get("passkey", {}).get(n, {}).get(key)

    lines += ["", "Partial credit (not the target): first digit right (%) / share of digits "
              "right (%). Guessing does well here: keys are drawn from 1-50000, so about 22% of "
              "them start with each of 1-4, and a random digit is right 10% of the time.", "",
              head, sep]
    lines += [f"| {n} | " + " | ".join(f"{_pct(partial(n, L, 'first_digit'))} / "
                                       f"{_pct(partial(n, L, 'digits'))}" for L in lengths)
              + " |" for n in res]  # fmt: skip
    for proto in ("truncation", "sliding"):
        lines += ["", f"## Perplexity, {proto} protocol (held-out books)", "", head, sep]
        lines += [f"| {n} | " + " | ".join(_ppl(ppl(n, L, proto)) for L in lengths) + " |"
                  for n in res]
    # targets
    lines += ["", "## Targets", "",
              f"DCA, LongHeads and hybrid: passkey ≥ {PASSKEY_TARGET:.0%} at 32× and perplexity "
              f"within {PPL_TOLERANCE:.0%} of its 1× value up to 16×; the RoPE baseline "
              "should collapse (the control).", "",
              "| method | passkey 1× | passkey 32× | digits right 1× → 32× | ppl 16× / 1× | "
              "outcome |", "|---|---|---|---|---|---|"]
    for n in (*TARGET_METHODS, "rope"):
        if n not in res:
            lines.append(f"| {n} | — | — | — | — | not run |")
            continue
        pk, in_dist = passkey(n, str(T * 32)), passkey(n, str(T))
        digits = (f"{_pct(partial(n, str(T), 'digits'))} → "
                  f"{_pct(partial(n, str(T * 32), 'digits'))}")
        p1, p16 = ppl(n, str(T)), ppl(n, str(T * 16))
        ratio = None if p1 is None or p16 is None else p16 / p1
        if pk is None:
            lines.append(f"| {n} | {_pct(in_dist)} | — | {digits} | — | not measured at 32× |")
            continue
        why = (_control_outcome(in_dist, pk, ratio) if n == "rope"
               else _target_outcome(in_dist, pk, ratio))
        lines.append(f"| {n} | {_pct(in_dist)} | {_pct(pk)} | {digits} | "
                     f"{'—' if ratio is None else f'{ratio:.2f}'} | {why} |")
    # runs
    lines += ["", "## Runs: hardware and wall time", "", "| run | hardware | wall time (s) |",
              "|---|---|---|"]
    for name in plan["models"]:
        f = root / name / "train_info.json"
        if f.exists():
            info = json.loads(f.read_text(encoding="utf-8"))
            hw = info["hardware"]
            how = f"{info['nproc']} process(es)"
            if "threads" in info:
                how += f", {info['threads']} thread(s) each, {info['jobs']} job slot(s)"
            lines.append(f"| train {name} ({how}) | "
                         f"{hw.get('gpu', hw['cpu'])}, {hw['cpu_count']} CPUs | "
                         f"{info['wall_s']:.0f} |")
    for n, r in res.items():
        hw = r["hardware"]
        lines.append(f"| eval {n} ({r['engine']} engine) | {hw.get('gpu', hw['cpu'])}, "
                     f"{hw['cpu_count']} CPUs, {hw['torch_threads']} threads | "
                     f"{r['wall_time_s']:.0f} |")
    # plots
    plots = []
    depths = [f"{d:g}" for d in plan["depths"]]
    for n, r in res.items():
        pk = r["tasks"].get("passkey")
        if not pk:
            continue
        grid = np.array([[pk.get(L, {}).get("by_depth", {}).get(d, np.nan) for L in lengths]
                         for d in depths])
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
        im = ax.imshow(100 * grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{k}×" for k in mults])
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel(f"length (T = {T})")
        ax.set_ylabel("depth")
        ax.set_title(f"passkey exact match (%): {n}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(fig_dir / f"passkey_{n}.png")
        plt.close(fig)
        plots.append(f"![passkey {n}]({md.stem}/passkey_{n}.png)")
    def by_length(file: str, ylabel: str, value, log_y: bool, guess: float | None = None):
        """One line per method over the evaluation lengths (legend outside the axes)."""
        fig, ax = plt.subplots(figsize=(7.5, 4), dpi=110)
        for n in res:
            ys = [value(n, L) for L in lengths]
            if any(y is not None for y in ys):
                ax.plot(mults, [np.nan if y is None else y for y in ys], marker="o", label=n)
        if guess is not None:
            ax.axhline(guess, color="grey", ls="--", lw=1, label="random digit")
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(f"evaluation length / T (T = {T})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(fig_dir / file)
        plt.close(fig)

    by_length("ppl_vs_length.png", "perplexity (truncation)", ppl, log_y=True)
    figs = [f"![perplexity vs length]({md.stem}/ppl_vs_length.png)"]
    if any(r["tasks"].get("passkey") for r in res.values()):
        def digits(n: str, L: str) -> float | None:
            d = partial(n, L, "digits")
            return None if d is None else 100 * d

        by_length("passkey_digits_vs_length.png", "passkey: digits right (%)", digits,
                  log_y=False, guess=10.0)
        figs.append(f"![passkey digits right vs length]({md.stem}/passkey_digits_vs_length.png)")
    lines += ["", "## Plots", "", *figs, "", *plots, ""]
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, md)
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_ext.eval.scorecard",
                                description="Train, evaluate and write docs/scorecard.md.")
    p.add_argument("--plan", default="configs/eval/scorecard_cpu.yaml")
    p.add_argument("--out", default="docs/scorecard.md")
    p.add_argument("--render-only", action="store_true", help="only rewrite the markdown/plots")
    p.add_argument("--skip-train", action="store_true", help="evaluate existing checkpoints only")
    p.add_argument("--force", action="store_true", help="redo training and evaluation")
    p.add_argument("--jobs", type=int, default=1,
                   help="training / evaluation processes at once (a CP run counts its ranks); "
                        "each gets cores / jobs threads")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: expected >= 1")
    plan = load_plan(args.plan)
    plan["_path"], plan["_jobs"] = args.plan, args.jobs
    if not args.render_only:
        train = [] if args.skip_train else train_jobs(plan, force=args.force)
        trained = {j.name.removeprefix("train ") for j in train}
        run_jobs(train + eval_jobs(plan, force=args.force, trained=trained), args.jobs)
    print(f"wrote {render(plan, args.out)}")


if __name__ == "__main__":
    main()
