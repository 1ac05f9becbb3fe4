"""The task registry: names accepted by `--tasks` and the generator behind each.

`passkey`, `niah` (sub-tasks `niah_single` and `niah_multikey`), `vt`, `cwe`, `fwe` generate
prompts; `ppl` is perplexity on held-out books (perplexity.py). An unknown name is refused with
the list of valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from megatron_ext.eval import frequency, needle, passkey, tracking
from megatron_ext.eval.samples import Sample

__all__ = ["ALL_TASKS", "GENERATORS", "generate_task", "parse_tasks"]

GENERATORS: dict[str, Callable[..., list[Sample]]] = {
    "passkey": passkey.generate,
    "niah": needle.generate,
    "vt": tracking.generate,
    "cwe": frequency.generate_cwe,
    "fwe": frequency.generate_fwe,
}
DEPTH_TASKS = ("passkey", "niah")
ALL_TASKS = (*GENERATORS, "ppl")


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    """Task names from 'passkey,niah,ppl' (or a list), in the given order, duplicates dropped.

    Raises:
        ValueError: naming an unknown task and the valid ones.
    """
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    out: list[str] = []
    for name in names:
        if name not in ALL_TASKS:
            raise ValueError(f"unknown task {name!r}; expected a comma-separated list of "
                             f"{', '.join(ALL_TASKS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no task given; expected some of {', '.join(ALL_TASKS)}")
    return out


def generate_task(name: str, tokenizer, length: int, *, seed: int, trials: int,
                  depths: Sequence[float] | None = None) -> list[Sample]:
    """Samples of one generated task at one length (depths only for passkey and niah)."""
    if name not in GENERATORS:
        raise ValueError(f"task {name!r} has no prompt generator; expected one of "
                         f"{', '.join(GENERATORS)}")
    kwargs = {"seed": seed, "trials": trials}
    if name in DEPTH_TASKS and depths is not None:
        kwargs["depths"] = tuple(depths)
    return GENERATORS[name](tokenizer, length, **kwargs)
