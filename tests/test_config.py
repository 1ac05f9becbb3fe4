"""Config: strict YAML loading, typed `--set` overrides, dump/reload round trip, error messages.

Every error path asserts the message names the key, the offending value and what is valid, since
that message is the whole user interface of a bad config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_ext.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_and_shipped_configs_load() -> None:
    assert load_config(None) == RunConfig()
    for path in sorted((REPO / "configs" / "run").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig), path
    models = [p for p in (REPO / "configs" / "eval").glob("*.yaml")
              if not p.name.startswith("scorecard")]  # the rest are scorecard plans
    assert models
    for path in sorted(models):
        cfg = load_config(path)
        assert cfg.data.seq_length <= cfg.model.max_position_embeddings, path


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param([], id="defaults"),
        pytest.param(["attention.variant=dca", "attention.dca.chunk_size=96",
                      "attention.dca.local_size=16",
                      "attention.dca.original_max_position_embeddings=64"], id="dca"),
        pytest.param(["attention.variant=hybrid", "attention.hybrid.preset=custom",
                      "attention.hybrid.layer_types=[rope_swa, nope_full]",
                      "attention.hybrid.window=8"], id="hybrid-custom"),
        pytest.param(["attention.rope_scaling={type: yarn, factor: 4.0}",
                      "model.num_query_groups=2"], id="yarn-gqa"),
    ],
)
def test_round_trip(tmp_path: Path, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    out = tmp_path / "resolved.yaml"
    text = dump_config(cfg, out)
    assert out.read_text() == text
    assert load_config(out) == cfg
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_override_types() -> None:
    cfg = load_config(None, ["train.lr=3e-4", "train.steps=7", "data.tokenizer=/x/tok.json",
                             "model.tie_embeddings=false", "attention.coca_form=strict"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7
    assert cfg.data.tokenizer == "/x/tok.json"
    assert cfg.model.tie_embeddings is False
    assert cfg.attention.coca_form == "strict"


def test_yaml_float_spelled_as_string_is_accepted(tmp_path: Path) -> None:
    # PyYAML reads 1e-3 (no dot) as a string; a float field accepts it, a str field is untouched
    cfg = load_config(_write(tmp_path, "train:\n  lr: 1e-3\n"))
    assert cfg.train.lr == pytest.approx(1e-3)


def test_file_overrides_merge(tmp_path: Path) -> None:
    p = _write(tmp_path, "train:\n  steps: 3\n  lr: 0.01\n")
    cfg = load_config(p, ["train.steps=9"])
    assert (cfg.train.steps, cfg.train.lr) == (9, 0.01)


@pytest.mark.parametrize(
    "text, match",
    [
        pytest.param("modle:\n  hidden_size: 8\n",
                     r"unknown config key 'modle'; did you mean 'model'\?", id="unknown-section"),
        pytest.param("model:\n  hiden_size: 8\n",
                     r"unknown config key 'model.hiden_size'; did you mean 'hidden_size'\?.*"
                     r"valid keys in model: .*hidden_size", id="unknown-key"),
        pytest.param("model:\n  num_layers: two\n",
                     r"model.num_layers: expected int, got 'two' \(str\)", id="wrong-type"),
        pytest.param("model:\n  num_layers: 2.5\n",
                     r"model.num_layers: expected int, got 2.5 \(float\)", id="float-for-int"),
        pytest.param("model:\n  tie_embeddings: 1\n",
                     r"model.tie_embeddings: expected bool, got 1 \(int\)", id="int-for-bool"),
        pytest.param("model:\n  num_layers: true\n",
                     r"model.num_layers: expected int, got True \(bool\)", id="bool-for-int"),
        pytest.param("attention:\n  variant: flash\n",
                     r"attention.variant: invalid value 'flash'; expected one of 'rope', 'nope'",
                     id="bad-literal"),
        pytest.param("model:\n  hidden_size: 10\n  num_attention_heads: 4\n",
                     r"model.hidden_size=10 is not divisible by model.num_attention_heads=4",
                     id="heads-divide"),
        pytest.param("model:\n  num_query_groups: 3\n",
                     r"num_attention_heads=4 is not divisible by model.num_query_groups=3",
                     id="gqa-divide"),
        pytest.param("model:\n  num_layers: 0\n",
                     r"model.num_layers=0; expected a positive number", id="positive"),
        pytest.param("model:\n  hidden_dropout: 1.5\n",
                     r"model.hidden_dropout=1.5; expected 0 <= p < 1", id="dropout"),
        pytest.param("parallel:\n  tensor_parallel_size: 3\n",
                     r"num_attention_heads=4 is not divisible by parallel.tensor_parallel_size=3",
                     id="tp-divide"),
        pytest.param("parallel:\n  cp_layout: stripe\n",
                     r"parallel.cp_layout: invalid value 'stripe'; expected one of 'zigzag'",
                     id="cp-layout"),
        pytest.param("attention:\n  variant: dca\n",
                     r"attention.variant='dca' needs an attention.dca section", id="dca-missing"),
        pytest.param("attention:\n  variant: dca\n  dca: {chunk_size: 8, local_size: 8}\n",
                     r"local_size=8, chunk_size=8; expected 0 <= local_size < chunk_size",
                     id="dca-sizes"),
        pytest.param("attention:\n  variant: dca\n  dca: {chunk_size: 8}\n",
                     r"local_size", id="dca-field-missing"),
        pytest.param("attention:\n  variant: hybrid\n",
                     r"attention.variant='hybrid' needs an attention.hybrid section",
                     id="hybrid-missing"),
        pytest.param("attention:\n  variant: hybrid\n  hybrid: {preset: cohere2}\n",
                     r"rope_swa layers need attention.hybrid.window", id="hybrid-window"),
        pytest.param("attention:\n  variant: hybrid\n  hybrid: {preset: llama4}\n",
                     r"rope_chunked layers need attention.hybrid.chunk", id="hybrid-chunk"),
        pytest.param("attention:\n  variant: hybrid\n  hybrid: {preset: custom}\n",
                     r"preset='custom' needs attention.hybrid.layer_types", id="custom-empty"),
        pytest.param("attention:\n  variant: hybrid\n  hybrid:\n    preset: custom\n"
                     "    layer_types: [rope_full]\n",
                     r"layer_types has 1 entries; model.num_layers=2", id="custom-length"),
        pytest.param("attention:\n  hybrid:\n    preset: custom\n    layer_types: [rope, x]\n",
                     r"attention.hybrid.layer_types\[0\]: invalid value 'rope'", id="layer-type"),
        pytest.param("attention:\n  hybrid:\n    preset: cohere2\n    layer_types: [rope_full]\n",
                     r"layer_types is only used with preset 'custom'", id="types-not-custom"),
        pytest.param("attention:\n  rope_scaling: {type: yarn, factor: 0.5}\n",
                     r"rope_scaling.factor=0.5; expected >= 1", id="rope-factor"),
        pytest.param("attention:\n  variant: coca\n  coca_form: strict\n  rotary_percent: 0.5\n",
                     r"rotary_percent=0.5 must be 1.0", id="coca-strict-partial-rotary"),
        pytest.param("attention:\n  longheads: {num_chunks: 2}\n",
                     r"num_chunks=2; expected >= 3", id="longheads-chunks"),
        pytest.param("model:\n  hidden_size: 12\n  num_attention_heads: 4\n",
                     r"head dim 3 .* must be even for RoPE", id="odd-head-dim"),
        pytest.param("train:\n  min_lr_ratio: 2\n",
                     r"train.min_lr_ratio=2.0; expected \[0, 1\]", id="min-lr"),
        pytest.param("train:\n  warmup_steps: -1\n",
                     r"train.warmup_steps=-1; expected >= 0", id="negative"),
        pytest.param("deepspeed:\n  zero_stage: 4\n",
                     r"deepspeed.zero_stage=4; expected 0, 1, 2 or 3", id="zero-stage"),
        pytest.param("inference:\n  temperature: -1\n",
                     r"temperature=-1.0, top_k=0; expected both >= 0", id="temperature"),
        pytest.param("data:\n  eval_split: train\n",
                     r"data.eval_split: invalid value 'train'; expected one of 'dev', 'test'",
                     id="eval-split"),
        pytest.param("train: 5\n", r"train: expected mapping \(TrainConfig\), got 5",
                     id="section-not-mapping"),
        pytest.param("- a\n- b\n", r"top level must be a mapping of sections, got list",
                     id="top-level-list"),
        pytest.param("model: [\n", r"is not valid YAML", id="bad-yaml"),
    ],
)
def test_file_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        load_config(_write(tmp_path, text))
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    "override, match",
    [
        pytest.param("train.lr", r"--set 'train.lr': expected section.key=value", id="no-equals"),
        pytest.param("lr=3", r"expected section.key=value \(e.g. train.lr=3e-4\)", id="no-section"),
        pytest.param("train.lrr=3", r"unknown config key 'train.lrr'; did you mean 'lr'\?",
                     id="unknown"),
        pytest.param("trian.lr=3", r"unknown config key 'trian'; did you mean 'train'\?",
                     id="unknown-section"),
        pytest.param("train.lr.x=3", r"--set train.lr.x: train.lr is not a section",
                     id="not-a-section"),
        pytest.param("train.steps=ten", r"train.steps: expected int, got 'ten'", id="type"),
        pytest.param("train.steps=[1", r"value is not valid YAML", id="bad-yaml"),
    ],
)
def test_override_errors(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_parse_override_keeps_strings() -> None:
    assert parse_override("data.corpus=some/path.jsonl") == ("data.corpus", "some/path.jsonl")
    assert parse_override("train.lr=1.5") == ("train.lr", 1.5)


def test_hybrid_presets_resolve() -> None:
    cfg = load_config(None, ["model.num_layers=8", "attention.variant=hybrid",
                             "attention.hybrid.preset=cohere2", "attention.hybrid.window=16"])
    assert cfg.attention.hybrid is not None
    assert cfg.attention.hybrid.resolve(8) == ["rope_swa"] * 3 + ["nope_full"] + \
        ["rope_swa"] * 3 + ["nope_full"]
    assert not cfg.attention.hybrid.use_temperature
    cfg = load_config(None, ["model.num_layers=4", "attention.variant=hybrid",
                             "attention.hybrid.preset=llama4", "attention.hybrid.chunk=32"])
    assert cfg.attention.hybrid is not None
    assert cfg.attention.hybrid.resolve(4) == ["rope_chunked"] * 3 + ["nope_full"]
    assert cfg.attention.hybrid.use_temperature


def test_cli_prints_resolved_or_error() -> None:
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "megatron_ext.config", "--config",
                         str(REPO / "configs/run/tiny.yaml"), "--set", "train.steps=3"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "steps: 3" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "megatron_ext.config", "--set", "train.stpes=3"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "config error: unknown config key 'train.stpes'; did you mean 'steps'?" in bad.stderr
