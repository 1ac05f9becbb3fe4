"""Run metrics: tensorboard scalars, a JSON-lines log and PNG plots, written by rank 0 only.

`metrics.jsonl` holds one record per optimizer step (`step`, `loss`, `lr`, `grad_norm`,
`tokens_per_s`, and `eval_loss` on steps that evaluated). A new run starts the file afresh; a
resumed run keeps the records of the steps before the checkpoint and drops the rest, so the
file never holds a step twice (tensorboard events after that step are purged the same way).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path


class MetricsWriter:
    """Collects scalars per step; writes tensorboard events, metrics.jsonl and PNG curves."""

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool = True,
                 resume_step: int | None = None) -> None:
        """
        Args:
            out_dir: run directory (created if missing).
            enabled: False on every rank but 0.
            resume_step: None for a new run; k when resuming after k completed steps (records
                with step >= k are dropped).
        """
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        kept: list[str] = []
        if resume_step is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if row.get("step", resume_step) < resume_step:
                    kept.append(line)
                    for k, v in row.items():
                        if k != "step":
                            self.history[k].append((row["step"], float(v)))
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        os.replace(tmp, path)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"),
                                 purge_step=resume_step)
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, **scalars: float) -> None:
        """One record for `step` (call once per step)."""
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.history[name].append((step, float(value)))
            self._tb.add_scalar(name, float(value), step)
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}})
                          + "\n")
        self._jsonl.flush()

    def plot(self, names: list[str], filename: str, *, title: str = "") -> Path | None:
        """Plot the named series against step into out_dir/filename (PNG)."""
        if not self.enabled or not any(self.history.get(n) for n in names):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for name in names:
            pts = self.history.get(name)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out_dir / filename
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        fig.savefig(tmp)
        os.replace(tmp, path)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.close()
            self._jsonl.close()
