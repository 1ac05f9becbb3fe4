"""Refusals: every bad input stops the conversion with a message naming the file, tensor or
config field. Compared: the error type and the name in its message (no partial output left)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_hf
from safetensors.torch import load_file, save_file

from megatron_ext.checkpoint import save_megatron_checkpoint
from megatron_ext.config import AttentionConfig, ModelConfig, RunConfig
from megatron_ext.convert import ConversionError, hf_to_mcore, hf_to_run_config, mcore_to_hf
from megatron_ext.convert.__main__ import main as cli
from megatron_ext.specs import build_gpt_model


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_and_unexpressible_fields(tmp_path):
    src = make_hf(tmp_path, "llama")
    _edit_config(src, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                       "factor": 2.0})
    with pytest.raises(ConversionError, match="rope_type='longrope'"):
        hf_to_run_config(src)
    _edit_config(src, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                 attention_bias=True)
    with pytest.raises(ConversionError, match="attention_bias=True"):
        hf_to_run_config(src)
    _edit_config(src, attention_bias=False, my_new_field=3)
    with pytest.raises(ConversionError, match="my_new_field=3"):
        hf_to_run_config(src)
    q = make_hf(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8)
    with pytest.raises(ConversionError, match="use_sliding_window=True"):
        hf_to_run_config(q)
    dca = make_hf(tmp_path, "llama4_text", moe_layers=[1], intermediate_size_mlp=48)
    with pytest.raises(ConversionError, match="moe_layers"):
        hf_to_run_config(dca)


def test_tensor_problems_named(tmp_path, megatron_single_process):
    src = make_hf(tmp_path, "llama")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    tensors["model.extra_thing.weight"] = torch.zeros(2)
    save_file(tensors, shard)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra_thing.weight"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="model.extra_thing.weight"):
        hf_to_mcore(src, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(ConversionError, match=shard.name):
        hf_to_mcore(src, tmp_path / "out", show_progress=False)
    shard.unlink()
    with pytest.raises(ConversionError, match=f"shard {shard.name}, which is missing"):
        hf_to_mcore(src, tmp_path / "out", show_progress=False)


def test_mismatched_shape_named(tmp_path, megatron_single_process):
    src = make_hf(tmp_path, "llama")
    _edit_config(src, intermediate_size=64)
    with pytest.raises(ConversionError, match=r"layers\.0\.mlp"):
        hf_to_mcore(src, tmp_path / "out", show_progress=False)


def test_coca_into_llama_refused(tmp_path, megatron_single_process):
    mc = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64)
    attn = AttentionConfig(variant="coca")
    model = build_gpt_model(mc, attn, vocab_size=64)
    ckpt = save_megatron_checkpoint(model, tmp_path / "c", config=RunConfig(model=mc,
                                                                           attention=attn))
    with pytest.raises(ConversionError, match="cannot be exported as llama: CoCA"):
        mcore_to_hf(ckpt, tmp_path / "hf", family="llama", show_progress=False)
    (ckpt / "__0_0.distcp").write_bytes(b"garbage")
    with pytest.raises(Exception, match="__0_0.distcp"):
        mcore_to_hf(ckpt, tmp_path / "hf", show_progress=False)


def test_cli_round_trip_and_error(tmp_path, megatron_single_process, capsys):
    src = make_hf(tmp_path, "qwen2")
    cli(["hf2mcore", "--src", str(src), "--dst", str(tmp_path / "m"), "--tp", "2"])
    cli(["mcore2hf", "--src", str(tmp_path / "m"), "--dst", str(tmp_path / "h")])
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "h" / "config.json").read_text())["model_type"] == "qwen2"
    with pytest.raises(SystemExit, match="not empty"):
        cli(["mcore2hf", "--src", str(tmp_path / "m"), "--dst", str(tmp_path / "h")])
