"""Context-parallel prefill equals one-process prefill: CP = 2 (gloo) against CP = 1.

For RoPE, RoPE with dynamic NTK, NoPE, the hybrids (sliding window; chunked-local with L2
QK-norm and the Llama-4 NoPE temperature), DCA with the Qwen temperature and CoCA, a 4-layer GQA
model with peaked weights is built twice from the same weights, at CP = 1 and at CP = 2 (Megatron
parallel state; the layers' own CP plans: ring, allgather, a2a, halo for window / chunked
layers; zigzag and contiguous layouts). A batch of two prompts of unequal odd lengths (19 and
11: neither fills the zigzag's 4 slices, so the layout pads) is prefilled

- at CP = 1 in chunks of 5 columns (the one-process path);
- at CP = 2 sharded over both ranks, in one step, and in steps of 8 columns (later steps attend
  the keys earlier steps cached and merge by log-sum-exp);

then decoded teacher-forced for 6 steps on every rank. The last-prompt-position logits and every
decode logit must agree to 1e-4 (fp32, logits ~20 in size; the paths differ only in summation
order), every rank must hold the same logits, greedy generation must give identical tokens, and
the CP full forward (``InferenceModel.logits``) must equal the one-process one. Methods without
a sharded prefill (LongHeads) and jobs that do not fit the CP size are refused with errors
naming them; the CLI under torchrun prints, from rank 0 only, the text one process generates.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from inference_tiny import METHODS, VOCAB, save_tiny_rope, tiny_config, tiny_model
from utils import free_port, launcher_free_env, run_distributed

TOL = 1e-4
LENS = (19, 11)
NEW = 6
PROMPT = "Once upon a time there was a little girl who lived in a village near the forest."

CASES = [  # method, layout, cp_algorithm
    ("rope", "zigzag", "ring"),
    ("rope-ntk", "contiguous", "allgather"),
    ("nope", "zigzag", "a2a"),
    ("hybrid-swa", "zigzag", "ring"),
    ("hybrid-chunk-temp", "contiguous", "ring"),
    ("dca", "zigzag", "ring"),
    ("coca", "zigzag", "allgather"),
]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(right-padded prompts [2, 19], lengths [2], teacher-forced decode tokens [2, NEW])."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (len(LENS), max(LENS)), generator=g)
    return tokens, torch.tensor(LENS), torch.randint(0, VOCAB, (len(LENS), NEW), generator=g)


def _prefill_decode(m, chunk: int) -> torch.Tensor:
    """Logits [B, 1 + NEW, V]: at each row's last prompt position, then per decode step."""
    tokens, lens, forced = _inputs()
    sess = m.session((lens + NEW).tolist())
    out = [m.cached.logits_of(sess.prefill(tokens, lens, chunk)[None])[:, 0]]
    for step in range(NEW):
        out.append(sess.logits(forced[:, step : step + 1], (lens + step)[:, None])[:, 0])
    return torch.stack(out, 1)


def _greedy(m) -> list[list[int]]:
    tokens, lens, _ = _inputs()
    prompts = [tokens[b, :n].tolist() for b, n in enumerate(LENS)]
    return m.generate(prompts, max_new_tokens=8, prefill_chunk_size=7, stop_tokens=[])


def _worker(rank: int, group, cases: list, cp: int = 2) -> None:
    from megatron.core import parallel_state as ps

    tokens = _inputs()[0]
    for name, layout, algo in cases:
        sets = [*METHODS[name], f"parallel.cp_layout={layout}", f"parallel.cp_algorithm={algo}"]
        ps.initialize_model_parallel(1, context_parallel_size=1)
        ref_model = tiny_model(sets)
        ref = _prefill_decode(ref_model, chunk=5)
        ref_tokens = _greedy(ref_model)
        ref_full = ref_model.logits(tokens, seq_len=max(LENS))
        ps.destroy_model_parallel()

        ps.initialize_model_parallel(1, context_parallel_size=cp)
        m = tiny_model(sets, cp=cp)
        assert m.cached.cp_group is not None
        assert ref.abs().max() > 5  # peaked weights: a wrong rule would move these a lot
        for chunk in (max(LENS), 8):
            got = _prefill_decode(m, chunk)
            err = (got - ref).abs().max().item()
            assert err <= TOL, (name, chunk, err)
            other = got.clone()
            dist.broadcast(other, src=0, group=group)
            assert torch.equal(other, got), (name, "ranks disagree")
        assert _greedy(m) == ref_tokens, name
        full = m.logits(tokens, seq_len=max(LENS))
        assert (full - ref_full).abs().max() <= TOL, name
        docs = torch.zeros_like(tokens)  # packed documents are refused under CP, not ignored
        with pytest.raises(ValueError, match="context_parallel=1"):
            m.logits(tokens, doc_ids=docs)
        with pytest.raises(ValueError, match="context_parallel=1"):
            m.session([max(LENS)] * len(LENS)).prefill(tokens, torch.tensor(LENS), 8, doc_ids=docs)
        ps.destroy_model_parallel()


@pytest.mark.distributed
def test_cp2_prefill_and_decode_equal_cp1(tmp_path) -> None:
    run_distributed(_worker, 2, tmp_path, cases=CASES)


@pytest.mark.distributed
@pytest.mark.slow
def test_cp4_prefill_and_decode_equal_cp1(tmp_path) -> None:
    """Four ranks: the 11-token row leaves whole zigzag shards empty."""
    picked = [c for c in CASES if c[0] in ("rope", "hybrid-swa", "hybrid-chunk-temp", "dca")]
    run_distributed(_worker, 4, tmp_path, cases=picked, cp=4)


def test_longheads_is_refused() -> None:
    from megatron_ext.inference.loader import inference_config

    cfg = tiny_config(METHODS["longheads"])
    with pytest.raises(ValueError, match="variant='longheads' has no context-parallel prefill.*"
                                         "rope, nope, hybrid, dca, coca"):
        inference_config(cfg, 2)
    assert inference_config(cfg, 1).parallel.context_parallel_size == 1


@pytest.fixture(scope="module")
def checkpoint(megatron_single_process, tmp_path_factory):
    """A saved tiny RoPE model with the shipped tokenizer's vocabulary (the CLI encodes text)."""
    path = tmp_path_factory.mktemp("cp") / "ckpt"
    save_tiny_rope(path)
    return path


def test_load_model_refuses_what_cp_prefill_cannot_run(checkpoint):
    from megatron_ext.inference import load_model

    with pytest.raises(ValueError, match="context_parallel=2 needs a multiple of 2 ranks; this "
                                         "job has 1"):
        load_model(checkpoint, device="cpu", context_parallel=2)
    with pytest.raises(ValueError, match="longheads"):
        load_model(checkpoint, {"attention.variant": "longheads"}, device="cpu",
                   context_parallel=2)
    with pytest.raises(ValueError, match="context_parallel=0"):
        load_model(checkpoint, device="cpu", context_parallel=0)


@pytest.mark.distributed
def test_cli_under_torchrun_prints_the_one_process_text(checkpoint):
    """``torchrun --nproc-per-node 2 -m megatron_ext.generate --context-parallel 2``: rank 0
    prints, once, the greedy text one process generates (DCA switched on by override)."""
    from megatron_ext.inference import load_model

    sets = ["attention.variant=dca", "attention.dca={chunk_size: 10, local_size: 3}"]
    want = load_model(checkpoint, sets, device="cpu").generate(PROMPT, max_new_tokens=8)[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "megatron_ext.generate",
           "--context-parallel", "2", "--checkpoint", str(checkpoint), "--prompt", PROMPT,
           "--max-new-tokens", "8", "--device", "cpu"]
    for item in sets:
        cmd += ["--set", item]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=launcher_free_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.endswith(want + "\n"), (run.stdout, want)
    assert run.stdout.count("peak memory") == 1  # rank 0 reports, rank 1 is silent
