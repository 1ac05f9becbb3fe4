"""A 100k-token prompt on CPU: prefill, 16 decode steps, checked against one full forward.

For DCA (chunk_size 768, local_size 128: a model trained at 1024), LongHeads (w = 64, K = 8:
K * w = 512) and a Cohere2-style hybrid (256-token sliding window on RoPE layers, NoPE full
attention every second layer), a 2-layer model prefills 100 000 random tokens in chunks of
4096 and decodes 16 tokens greedily. The greedy tokens must equal the argmax of one full
forward over prompt + output at the same length (the uncached whole-sequence LongHeads op for
LongHeads), and the KV cache must hold exactly what docs/inference.md states. Marked ``slow``
(a few minutes on two cores).
"""

from __future__ import annotations

import pytest
import torch
from inference_tiny import VOCAB, tiny_model

S, NEW = 100_000, 16
CASES = {
    "dca": ["attention.variant=dca", "attention.dca={chunk_size: 768, local_size: 128}"],
    "longheads": ["attention.variant=longheads",
                  "attention.longheads={chunk_len: 64, num_chunks: 8}"],
    "hybrid": ["attention.variant=hybrid",
               "attention.hybrid={preset: cohere2, window: 256, nope_every: 2}"],
}
SHAPE = ["model.num_layers=2", "inference.max_seq_len=200000"]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES))
def test_100k_prompt_then_16_tokens(megatron_single_process, method: str):
    m = tiny_model([*SHAPE, *CASES[method]])
    ids = torch.randint(0, VOCAB, (S,)).tolist()
    out = m.generate([ids], max_new_tokens=NEW, prefill_chunk_size=4096, stop_tokens=[])[0]
    assert len(out) == NEW
    st = m.last_stats
    total = S + NEW
    kv = 2 * 2 * 16 * 4  # K and V of 2 KV heads x 16 dims, fp32
    if method == "hybrid":  # a ring of 256 slots, then a full cache
        assert st.cache_bytes == 256 * (kv + 8) + total * (kv + 8)
    elif method == "dca":
        assert st.cache_bytes == 2 * total * (kv + 8)
    seq = torch.tensor([ids + out])
    logits = m.logits(seq, seq_len=total)
    assert logits[0, S - 1 : -1].argmax(-1).tolist() == out
