"""The eval CLI end to end on a tiny saved checkpoint, at two lengths.

A 2-layer GPT (random weights) is saved with `save_megatron_checkpoint` and evaluated through
`python -m megatron_ext.eval`'s `main`. The results file is checked against independent
recomputation on the same weights: every sample's score against the scorer applied to its
prediction, a passkey prediction against step-by-step greedy decoding with the model's logits,
and the per-document perplexity against exp(mean cross-entropy) of the logits. Those agree to
1e-4 relative (fp32 logits through two code paths, Megatron's fused loss and torch's
cross_entropy). Bad task names and lengths beyond the model are refused with a clear message.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.eval.cli import main
from megatron_ext.eval.model import load_eval_model
from megatron_ext.eval.perplexity import held_out_tokens
from megatron_ext.eval.scoring import score_sample


@pytest.mark.parametrize("engine", ["inference", "forward"])
def test_cli_end_to_end_two_lengths(checkpoint: Path, tmp_path: Path, capsys, engine):
    out = tmp_path / "results.json"
    main(["--checkpoint", str(checkpoint), "--tasks", "passkey,vt,ppl", "--lengths", "256,384",
          "--trials", "1", "--depths", "0,1", "--ppl-docs", "2", "--ppl-windows", "2",
          "--out", str(out), "--no-progress", "--engine", engine])
    res = json.loads(out.read_text())
    assert "passkey" in capsys.readouterr().out
    assert res["lengths"] == [256, 384] and res["config"]["model"]["num_layers"] == 2
    assert res["engine"] == engine
    assert res["hardware"]["cpu_count"] >= 1 and res["wall_time_s"] > 0
    for task in ("passkey", "vt", "ppl"):
        assert set(res["tasks"][task]) == {"256", "384"}
    assert set(res["tasks"]["passkey"]["256"]["by_depth"]) == {"0", "1"}
    for task in ("passkey", "vt"):
        for n in ("256", "384"):
            recs = res["samples"][task][n]
            for r in recs:
                assert r == {**r, **score_sample(task, r["prediction"], r["references"])}
                assert r["tokens"] <= int(n)
            mean = sum(r["score"] for r in recs) / len(recs)
            assert res["tasks"][task][n]["score"] == pytest.approx(mean)

    m = load_eval_model(checkpoint, device="cpu", engine="forward")  # plain gpt_forward
    from megatron_ext.eval.passkey import generate

    s = generate(m.tokenizer, 256, seed=0, trials=1, depths=[0.0])[0]
    seq = list(s.prompt_ids)
    for _ in s.answer_ids:  # step-by-step greedy on the model's logits
        seq.append(int(m.logits(torch.tensor([seq]), seq_len=s.num_tokens)[0, -1].argmax()))
    want = m.tokenizer.decode(seq[len(s.prompt_ids):])
    assert res["samples"]["passkey"]["256"][0]["prediction"] == want

    doc_id, ids = held_out_tokens("test")[0]
    x = torch.from_numpy(ids[:384])[None]
    ce = F.cross_entropy(m.logits(x)[0, :-1], x[0, 1:])
    got = res["tasks"]["ppl"]["384"]["truncation"]["per_doc"][doc_id]
    assert got == pytest.approx(math.exp(ce.item()), rel=1e-4)


def test_override_reaches_the_model(checkpoint: Path):
    m = load_eval_model(checkpoint, ["inference.max_seq_len=1024",
                                     "attention.rope_scaling={type: dynamic, factor: 2.0, "
                                     "original_max_position_embeddings: 256}"],
                        device="cpu")
    assert m.max_length == 1024 and m.config.attention.rope_scaling.type == "dynamic"
    plain = load_eval_model(checkpoint, device="cpu", engine="forward")
    x = torch.randint(0, 4096, (1, 300))
    # dynamic NTK changes nothing up to the original length and everything past it
    assert torch.allclose(m.logits(x[:, :200], seq_len=200), plain.logits(x[:, :200]))
    assert not torch.allclose(m.logits(x, seq_len=1024)[0, -1], plain.logits(x)[0, -1])


@pytest.mark.parametrize("args,message", [
    (["--tasks", "passkey,needle", "--lengths", "256"], "unknown task 'needle'"),
    (["--tasks", "passkey", "--lengths", "256,1024"],
     "length 1024 is more than this model holds.*--set inference.max_seq_len=1024"),
    (["--tasks", "passkey", "--lengths", "32"], "fixed text alone is"),
    (["--tasks", "ppl", "--lengths", "256,x"], "'x' is not an integer"),
])
def test_bad_input_is_refused_clearly(checkpoint: Path, tmp_path: Path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "r.json"),
              "--no-progress", *args])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "r.json").exists()
