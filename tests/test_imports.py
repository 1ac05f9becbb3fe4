"""Import tiers (docs/ops.md): ``ops`` and ``parallel`` never need Megatron or DeepSpeed.

Two checks: (1) in a fresh interpreter where ``import megatron`` / ``import deepspeed`` fail,
``megatron_ext.ops`` and ``megatron_ext.parallel`` still import (a subprocess, so the poisoned
``sys.modules`` cannot leak into other tests); (2) a static AST walk over every module of those
two packages finds no import of megatron, deepspeed or a higher tier of megatron_ext, including
imports hidden inside functions (lazy imports) and relative imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOW_TIERS = ("ops", "parallel")
FORBIDDEN = ("megatron", "deepspeed") + tuple(
    f"megatron_ext.{m}" for m in ("layers", "specs", "train", "inference", "convert", "eval")
)


def test_low_tiers_import_without_megatron_or_deepspeed() -> None:
    code = (
        "import sys\n"
        "sys.modules['megatron'] = None\n"
        "sys.modules['deepspeed'] = None\n"
        "import megatron_ext.ops, megatron_ext.parallel\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('megatron.', 'deepspeed.')))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of every module imported anywhere in the file (relative ones resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


FILES = sorted(p for tier in LOW_TIERS for p in (ROOT / "megatron_ext" / tier).rglob("*.py"))


def test_low_tier_files_found() -> None:
    names = {str(p.relative_to(ROOT / "megatron_ext")) for p in FILES}
    # the walk below is not vacuous and covers the one-path modules
    assert {"ops/attention.py", "ops/backend.py", "ops/method.py", "ops/meta.py",
            "ops/intervals.py", "parallel/cp_attention.py"} <= names, names


@pytest.mark.parametrize("path", [p for p in FILES if "ops" in p.relative_to(ROOT).parts],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_ops_do_not_import_parallel(path: Path) -> None:
    """ops is the lowest tier: parallel builds on it, never the other way round."""
    bad = [n for n in _imported_modules(path) if n.startswith("megatron_ext.parallel")]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_one_dispatch_module() -> None:
    """Backend choice lives in ops/backend.py only: no module-level switches elsewhere."""
    from megatron_ext.ops.backend import ENV_VAR

    offenders = []
    for path in (ROOT / "megatron_ext").rglob("*.py"):
        text = path.read_text()
        if path.name != "backend.py" and ENV_VAR in text:
            offenders.append(f"{path.relative_to(ROOT)} reads {ENV_VAR}")
        for switch in ("DEFAULT_BACKEND", "USE_TRITON"):
            if f"{switch}:" in text or f"{switch} =" in text:
                offenders.append(f"{path.relative_to(ROOT)} defines {switch}")
    assert not offenders, offenders


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_no_upward_or_framework_imports(path: Path) -> None:
    bad = [
        name
        for name in _imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
