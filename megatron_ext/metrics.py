"""Run metrics: tensorboard scalars, a JSON-lines log and PNG plots, written by rank 0 only."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path


class MetricsWriter:
    """Collects scalars per step; writes tensorboard events, metrics.jsonl and PNG curves."""

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._tb = None
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, **scalars: float) -> None:
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
        fig.savefig(path)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
