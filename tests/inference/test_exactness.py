"""Cached inference equals one full forward pass, per method.

For every method of the package (RoPE, RoPE with dynamic NTK and YaRN, NoPE, hybrid with
sliding-window layers, hybrid with chunked-local layers + L2 QK-norm + Llama-4 NoPE temperature,
DCA with the Qwen temperature, CoCA, LongHeads) a 4-layer GQA model with peaked weights is run
twice on the same tokens:

- reference: ``InferenceModel.logits`` -- one ``gpt_forward`` of the whole sequence at the same
  fixed length (for LongHeads: the uncached walk with the whole-sequence LongHeads op in every
  layer, so a decoded row must equal the op's row);
- cached: the prompt prefilled in chunks (7 tokens, crossing DCA chunks of 7, windows of 5,
  chunks of 6, LongHeads chunks of 4) or in one call, then one token per decode step.

Every position's logits must agree to 1e-4 in fp32 (logits are ~20 in size; the two paths only
differ in summation order, a few 1e-5 over four layers). Batches of two rows with different
lengths, right-padded, must equal each row run alone; greedy generation must reproduce the
argmax of a full forward over its own output. Sizes are tiny (S <= 37) to keep this fast.
"""

from __future__ import annotations

import pytest
import torch
from inference_tiny import METHODS, VOCAB, tiny_model

TOL = 1e-4
S = 37


def _cached_logits(m, tokens: torch.Tensor, prefill: int, chunk: int) -> torch.Tensor:
    """Logits [B, S, V] of rows of equal length: chunked prefill, then decode one by one."""
    B, n = tokens.shape
    sess = m.session([n] * B)
    pos = torch.arange(n).expand(B, n)
    outs = [sess.logits(tokens[:, s : min(prefill, s + chunk)], pos[:, s : min(prefill, s + chunk)])
            for s in range(0, prefill, chunk)]
    outs += [sess.logits(tokens[:, p : p + 1], pos[:, p : p + 1]) for p in range(prefill, n)]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("method", list(METHODS))
def test_chunked_prefill_and_decode_equal_full_forward(megatron_single_process, method: str):
    m = tiny_model(METHODS[method])
    tokens = torch.randint(0, VOCAB, (1, S))
    full = m.logits(tokens, seq_len=S)
    chunked = _cached_logits(m, tokens, prefill=23, chunk=7)
    whole = _cached_logits(m, tokens, prefill=23, chunk=23)
    assert full.abs().max() > 5  # peaked weights: a wrong rule would move these a lot
    assert (chunked - full).abs().max() <= TOL
    assert (whole - full).abs().max() <= TOL


def test_longheads_is_not_plain_rope(megatron_single_process):
    """The LongHeads comparison is not vacuous: past K*w = 12 its logits differ from RoPE's."""
    tokens = torch.randint(0, VOCAB, (1, S))
    lh = tiny_model(METHODS["longheads"]).logits(tokens)
    rope = tiny_model(METHODS["rope"]).logits(tokens)
    assert (lh[:, :12] - rope[:, :12]).abs().max() <= TOL  # identity below K*w
    assert (lh[:, 12:] - rope[:, 12:]).abs().max() > 0.1


@pytest.mark.parametrize("method", [k for k in METHODS if k != "rope-ntk"])
def test_batch_of_unequal_lengths_equals_each_row(megatron_single_process, method: str):
    """Two rows (37 and 26 tokens), right-padded prefill of 20 columns in chunks of 6, then
    lockstep decode (the shorter row is padding once it is done) == each row's full forward.
    (Dynamic NTK uses one length per batch, so it is covered by the single-row test.)"""
    m = tiny_model(METHODS[method])
    lens = [S, 26]
    tokens = torch.randint(0, VOCAB, (2, S))
    sess = m.session(lens)
    col = torch.arange(S).expand(2, S)
    pos = torch.where(col < torch.tensor(lens)[:, None], col, -1)
    outs = [sess.logits(tokens[:, s : min(20, s + 6)], pos[:, s : min(20, s + 6)])
            for s in range(0, 20, 6)]
    outs += [sess.logits(tokens[:, p : p + 1], pos[:, p : p + 1]) for p in range(20, S)]
    got = torch.cat(outs, 1)
    for b, n in enumerate(lens):
        ref = m.logits(tokens[b : b + 1, :n], seq_len=n)
        assert (got[b : b + 1, :n] - ref).abs().max() <= TOL, f"row {b}"


@pytest.mark.parametrize("method", ["rope", "hybrid-swa", "hybrid-chunk-temp", "dca", "coca",
                                    "longheads"])
def test_greedy_generation_matches_full_forward_argmax(megatron_single_process, method: str):
    """Greedy tokens equal the argmax of one full forward over prompt + output, and a batch
    of two prompts of different lengths generates what each prompt generates alone."""
    m = tiny_model(METHODS[method])
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (19, 11)]
    new = 12
    both = m.generate(prompts, max_new_tokens=new, prefill_chunk_size=5, stop_tokens=[])
    for prompt, out in zip(prompts, both):
        assert len(out) == new
        assert m.generate([prompt], max_new_tokens=new, prefill_chunk_size=8,
                          stop_tokens=[]) == [out]
        seq = torch.tensor([prompt + out])
        logits = m.logits(seq, seq_len=len(prompt) + new)
        assert logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == out
