"""The shipped model configs: realistic sizes build on the meta device with the documented
parameter counts, and every tiny variant trains from its YAML on CPU (the loss falls).

Parameter counts are exact integers from the architecture (e.g. Llama-3-8B has 8,030,261,248
parameters), so they are compared exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_ext.config import load_config

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "configs" / "model"


def llama_params(layers: int, hidden: int, heads: int, groups: int, ffn: int, vocab: int,
                 tied: bool, layernorm: bool = False) -> int:
    head_dim = hidden // heads
    norm = 2 * hidden if layernorm else hidden  # LayerNorm has a bias, RMSNorm not
    attn = hidden * (heads + 2 * groups) * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * ffn
    per_layer = attn + mlp + 2 * norm
    emb = vocab * hidden * (1 if tied else 2)
    return layers * per_layer + emb + norm


@pytest.fixture(scope="module")
def single_process():
    from megatron_ext.dist import init_distributed

    init_distributed()
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "name, expected",
    [
        pytest.param("llama3_8b_dca", 8_030_261_248, id="llama3-8b-dca"),
        pytest.param("coca_7b", 6_738_415_616, id="coca-7b"),
        pytest.param("command_r7b_hybrid",
                     llama_params(32, 4096, 32, 8, 14336, 256000, tied=True, layernorm=True),
                     id="command-r7b-hybrid"),
    ],
)
def test_realistic_configs_build_on_meta(single_process, name: str, expected: int) -> None:
    from megatron.core import parallel_state as ps

    from megatron_ext.specs import dry_run

    cfg = load_config(MODELS / f"{name}.yaml")
    assert dry_run(cfg.model, cfg.attention, vocab_size=1) == expected
    ps.destroy_model_parallel()


def test_llama_formula_matches_known_counts() -> None:
    assert llama_params(32, 4096, 32, 8, 14336, 128256, tied=False) == 8_030_261_248
    assert llama_params(32, 4096, 32, 32, 11008, 32000, tied=False) == 6_738_415_616


TINY = sorted(p.stem for p in MODELS.glob("tiny_*.yaml"))


def test_every_variant_has_a_tiny_config() -> None:
    variants = {load_config(MODELS / f"{n}.yaml").attention.variant for n in TINY}
    assert variants == {"rope", "nope", "coca", "dca", "hybrid"}


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_tiny_variant_trains(single_process, tmp_path: Path, name: str) -> None:
    import json

    from megatron_ext.train import train

    cfg = load_config(MODELS / f"{name}.yaml", [
        f"train.out_dir={tmp_path}", "train.steps=20", "train.lr=0.003", "train.warmup_steps=3",
        "train.micro_batch_size=4", "data.seq_length=96", "data.max_documents=2",
        "train.eval_batches=1"])
    result = train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, (name, losses)
    assert result["eval_loss"] < losses[0]
