"""Loading checkpoints for inference: weights, overrides that switch on a method, bad input.

A tiny RoPE model with peaked weights is saved with ``save_megatron_checkpoint`` (the run config
beside it). ``load_model`` must give bit-identical logits to the saved model (same weights, same
maths), and with a ``--set``-style override that switches on a training-free method (DCA,
LongHeads, YaRN, dynamic NTK; the NoPE temperature of a hybrid) the logits must equal those of a
model built directly with that method from the same weights (<= 1e-6: the same computation) and
differ from the plain model (> 1e-2: the override took effect). Bad input -- a missing path, an
unknown method, a prompt longer than ``inference.max_seq_len``, a Hugging Face directory with no
registered converter -- must raise an error naming the value.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from inference_tiny import TOKENIZER_VOCAB, VOCAB, peak_weights, save_tiny_rope, tiny_config
from utils import launcher_free_env

from megatron_ext.checkpoint import CheckpointError, save_megatron_checkpoint
from megatron_ext.config import ConfigError
from megatron_ext.inference import from_model, load_model
from megatron_ext.inference.loader import build_attention
from megatron_ext.specs import build_gpt_model

LONG = 40  # > K*w, > DCA chunk, > window: every method changes something here

SWITCHES = {
    "dca": {"attention.variant": "dca",
            "attention.dca": {"chunk_size": 10, "local_size": 3}},
    "longheads": {"attention.variant": "longheads",
                  "attention.longheads": {"chunk_len": 4, "num_chunks": 3}},
    "yarn": {"attention.rope_scaling": {"type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 8}},
    "dynamic-ntk": {"attention.rope_scaling": {"type": "dynamic", "factor": 4.0,
                                               "original_max_position_embeddings": 8}},
}


@pytest.fixture(scope="module")
def saved(megatron_single_process, tmp_path_factory):
    """(checkpoint dir, the saved model, its run config) of a tiny RoPE model."""
    path = tmp_path_factory.mktemp("run") / "step_10"
    model, cfg = save_tiny_rope(path)
    return path, model, cfg


def _direct(saved_model, cfg_overrides: dict):
    """The saved weights in a model built directly with the overridden config."""
    from megatron_ext.inference.loader import _override_strings

    cfg = tiny_config(["attention.variant=rope", *_override_strings(cfg_overrides)])
    model = build_gpt_model(cfg.model, build_attention(cfg), vocab_size=TOKENIZER_VOCAB)
    model.load_state_dict(saved_model.state_dict())
    return from_model(model, cfg)


def test_load_gives_the_saved_model(saved):
    path, model, cfg = saved
    m = load_model(path, device="cpu")
    tokens = torch.randint(0, VOCAB, (2, LONG))
    ref = from_model(model, cfg).logits(tokens)
    assert torch.equal(m.logits(tokens), ref)
    assert m.tokenizer is not None and m.tokenizer.get_vocab_size() > 0


@pytest.mark.parametrize("name", list(SWITCHES))
def test_override_switches_on_a_training_free_method(saved, name: str):
    path, model, cfg = saved
    m = load_model(path, SWITCHES[name], device="cpu")
    tokens = torch.randint(0, VOCAB, (1, LONG))
    got = m.logits(tokens)
    want = _direct(model, SWITCHES[name]).logits(tokens)
    plain = from_model(model, cfg).logits(tokens)
    assert (got - want).abs().max() <= 1e-6
    assert (got - plain).abs().max() > 1e-2
    # and the cached path runs the switched-on method too
    out = m.generate([tokens[0, :30].tolist()], max_new_tokens=3, stop_tokens=[])[0]
    seq = torch.cat([tokens[0, :30], torch.tensor(out)])[None]
    assert m.logits(seq, seq_len=33)[0, 29:-1].argmax(-1).tolist() == out


def test_hybrid_nope_temperature_override(megatron_single_process, tmp_path):
    """A hybrid checkpoint trained without the Llama-4 temperature gets it by override."""
    base = ["attention.variant=hybrid", "attention.hybrid={preset: cohere2, window: 5}"]
    cfg = tiny_config(base)
    model = build_gpt_model(cfg.model, cfg.attention, vocab_size=VOCAB)
    peak_weights(model)
    save_megatron_checkpoint(model, tmp_path / "ckpt", config=cfg)
    sets = ["attention.hybrid.temperature_tuning=true", "attention.hybrid.floor_scale=4"]
    m = load_model(tmp_path / "ckpt", sets, device="cpu")
    assert m.model.config.attn_temperature_tuning
    tokens = torch.randint(0, VOCAB, (1, LONG))
    plain = from_model(model, cfg).logits(tokens)
    assert (m.logits(tokens) - plain).abs().max() > 1e-2


def test_run_directory_with_latest_pointer(saved):
    path, model, cfg = saved
    (path.parent / "latest").write_text(path.name + "\n")
    m = load_model(path.parent, device="cpu")
    tokens = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(m.logits(tokens), from_model(model, cfg).logits(tokens))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does_not_exist.*does not exist"):
        load_model(tmp_path / "does_not_exist")


def test_unknown_method(saved):
    with pytest.raises(ConfigError, match="bogus"):
        load_model(saved[0], {"attention.variant": "bogus"})


def test_prompt_longer_than_the_maximum(saved):
    m = load_model(saved[0], device="cpu")
    with pytest.raises(ValueError, match="max_seq_len=64"):
        m.generate([[1] * 60], max_new_tokens=8)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        m.logits(torch.zeros(1, 65, dtype=torch.long))


def test_token_out_of_vocabulary(saved):
    m = load_model(saved[0], device="cpu")
    with pytest.raises(ValueError, match="4096"):
        m.generate([[1, 5000]], max_new_tokens=1)


def test_hf_directory_of_an_unknown_family(tmp_path):
    """An HF directory goes to the converter, which names what it cannot convert."""
    from megatron_ext.convert.errors import ConversionError

    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConversionError, match="model_type='gpt2'; supported: llama"):
        load_model(tmp_path)


def test_cli_generates_and_reports(saved, tmp_path):
    """The CLI end to end in a fresh process: text out, prefill rate and peak memory shown;
    a missing checkpoint is a one-line error."""
    path = saved[0]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time")
    run = subprocess.run(
        [sys.executable, "-m", "megatron_ext.generate", "--checkpoint", str(path),
         "--prompt-file", str(prompt), "--max-new-tokens", "4", "--set",
         "attention.variant=dca", "--set", "attention.dca={chunk_size: 10, local_size: 3}"],
        capture_output=True, text=True, timeout=300, env=launcher_free_env())
    assert run.returncode == 0, run.stderr
    assert "tok/s" in run.stdout and "peak memory" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "megatron_ext.generate", "--checkpoint",
                          str(tmp_path / "nope"), "--prompt", "x"],
                         capture_output=True, text=True, timeout=300, env=launcher_free_env())
    assert bad.returncode != 0 and "does not exist" in bad.stderr
