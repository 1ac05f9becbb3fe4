"""Packed documents inside a row (``doc_ids``) through the inference cache.

- LongHeads, op level: the LongHeads cache fed in prefill chunks (crossing document and chunk
  boundaries) and then one token per step equals ``longheads_attn_func`` with the same
  ``doc_ids`` on every position (fp32, 1e-5 as the op tests: the two paths differ only in
  summation order). Rows hold 2-3 documents, boundaries off the chunk grid, a document shorter
  than w, batch 2 with different layouts (one row padded), GQA, and a document that starts
  during decode.
- Whole model, every method: chunked prefill + decode with ``doc_ids`` equals
  ``InferenceModel.logits(tokens, doc_ids=...)`` (one ``gpt_forward`` with per-document
  positions, or the uncached LongHeads walk) to 1e-4 on fp32 logits of size ~20, as
  ``test_exactness.py``; generation continues a prompt's last document as if it were alone.
- Bad ids, indices and settings get errors naming the value.
"""

from __future__ import annotations

import pytest
import torch
from inference_tiny import METHODS, VOCAB, tiny_model

from megatron_ext.config import LongHeadsConfig
from megatron_ext.inference.attend import LayerMethod, meta_of
from megatron_ext.inference.documents import RowDocuments
from megatron_ext.inference.longheads_cache import LongHeadsCache
from megatron_ext.ops import longheads_attn_func

TOL_OP, TOL_LOGITS = 1e-5, 1e-4


def _ids(*lengths: int, first: int = 0) -> torch.Tensor:
    """Document ids of consecutive documents of the given lengths."""
    return torch.cat([torch.full((n,), first + i) for i, n in enumerate(lengths)])


def _drive_cache(q, k, v, ids, lens, w, K, prefill, chunk):
    """LongHeads cache outputs [B, S, H, D]: prefill columns in chunks, then decode; padding
    (-1) past each row's length. Decode passes ids only when some row starts a document."""
    B, S, H, D = q.shape
    lm = LayerMethod(layer_number=1, kind="longheads", method=None, cache="longheads",
                     longheads=LongHeadsConfig(chunk_len=w, num_chunks=K))
    cache = LongHeadsCache(lm, B, S, H, k.shape[2], D, "cpu")
    docs = RowDocuments(B, S)
    col = torch.arange(S).expand(B, S)
    pos = torch.where(col < torch.tensor(lens)[:, None], col, -1)
    blocks = [(s, min(prefill, s + chunk)) for s in range(0, prefill, chunk)]
    blocks += [(p, p + 1) for p in range(prefill, S)]
    out = torch.zeros(B, S, H, D)
    for s, e in blocks:
        new_doc = s < prefill or bool((ids[:, s] != ids[:, s - 1]).any())
        block_ids = ids[:, s:e] if new_doc else None
        for piece in docs.split(pos[:, s:e], block_ids):
            if len(piece.reset):
                cache.reset_rows(piece.reset)
            sl = slice(s + piece.cols.start, s + piece.cols.stop)
            out[:, sl] = cache.step(lm, q[:, sl], k[:, sl], v[:, sl], meta_of(piece.positions, S),
                                    torch.tensor(lens), S)
    return out


def test_row_documents_positions_resets_and_pieces():
    """Indices + ids -> per-document positions; a block is cut where a row starts a document
    and that row is reset before its piece; tokens without ids continue the document."""
    docs = RowDocuments(2, 10)
    pos = torch.tensor([[0, 1, 2, 3], [0, 1, -1, -1]])
    pieces = docs.split(pos, torch.tensor([[0, 0, 1, 1], [5, 6, 9, 9]]))
    assert [(p.cols.start, p.cols.stop) for p in pieces] == [(0, 1), (1, 2), (2, 4)]
    assert torch.cat([p.positions for p in pieces], 1).tolist() == [[0, 1, 0, 1], [0, 0, -1, -1]]
    assert [p.reset.tolist() for p in pieces] == [[], [1], [0]]
    (piece,) = docs.split(torch.tensor([[4], [2]]))  # decode: continue the last document
    assert piece.positions.tolist() == [[2], [1]] and piece.reset.tolist() == []
    (piece,) = docs.split(torch.tensor([[5], [3]]), torch.tensor([[1], [7]]))
    assert piece.positions.tolist() == [[3], [0]] and piece.reset.tolist() == [1]


@pytest.mark.parametrize("w, K", [pytest.param(4, 3, id="w4-K3"), pytest.param(3, 4, id="w3-K4"),
                                  pytest.param(2, 5, id="w2-K5")])
@pytest.mark.parametrize("chunk", [pytest.param(5, id="prefill-chunks-5"),
                                   pytest.param(23, id="prefill-whole")])
def test_longheads_cache_with_documents_equals_op(w: int, K: int, chunk: int):
    B, S, H, Hkv, D = 2, 41, 4, 2, 16
    lens = [S, 37]  # row 1 is padded after 37 tokens
    # Row 0: a document shorter than w, then boundaries at 2 and 21; row 1: a boundary at 26,
    # during decode (prefill covers columns 0..22), then padding.
    ids = torch.stack((_ids(2, 19, 20), torch.cat((_ids(26, 11, first=5), torch.full((4,), 6)))))
    q = torch.randn(B, S, H, D)
    k, v = (torch.randn(B, S, Hkv, D) for _ in range(2))
    got = _drive_cache(q, k, v, ids, lens, w, K, prefill=23, chunk=chunk)
    for b, n in enumerate(lens):
        ref = longheads_attn_func(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n],
                                  chunk_len=w, num_chunks=K, doc_ids=ids[b : b + 1, :n])
        assert (got[b, :n] - ref[0]).abs().max() <= TOL_OP, f"row {b}"
        mixed = longheads_attn_func(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n],
                                    chunk_len=w, num_chunks=K)
        assert (mixed - ref).abs().max() > 1e-2  # the documents really change the output
    assert (got[1, 37:] == 0).all()  # padding rows are never written


@pytest.mark.parametrize("method", [k for k in METHODS if k != "rope-ntk"])
def test_documents_in_cache_equal_full_forward(megatron_single_process, method: str):
    """Two rows (37 and 30 tokens) with different layouts: row 0 has documents of 5, 14, 18
    tokens (boundaries inside prefill chunks), row 1 of 20, 2, 4 and 4 (the last starts during
    decode). Prefill of 23 columns in chunks of 7, then decode with ids only where a document
    starts == each row's full forward with its doc_ids. (Dynamic NTK uses one length per batch,
    so it is checked on one row below.)"""
    m = tiny_model(METHODS[method])
    lens = [37, 30]
    ids = torch.stack((_ids(5, 14, 18), _ids(20, 2, 4, 11, first=1)))  # row 1: 30 real tokens
    tokens = torch.randint(0, VOCAB, (2, 37))
    sess = m.session(lens)
    col = torch.arange(37).expand(2, 37)
    pos = torch.where(col < torch.tensor(lens)[:, None], col, -1)
    outs = [sess.logits(tokens[:, s : min(23, s + 7)], pos[:, s : min(23, s + 7)],
                        ids[:, s : min(23, s + 7)]) for s in range(0, 23, 7)]
    for p in range(23, 37):
        new_doc = bool((ids[:, p] != ids[:, p - 1]).any())
        outs.append(sess.logits(tokens[:, p : p + 1], pos[:, p : p + 1],
                                ids[:, p : p + 1] if new_doc else None))
    got = torch.cat(outs, 1)
    for b, n in enumerate(lens):
        ref = m.logits(tokens[b : b + 1, :n], seq_len=n, doc_ids=ids[b : b + 1, :n])
        assert ref.abs().max() > 5
        assert (got[b : b + 1, :n] - ref).abs().max() <= TOL_LOGITS, f"row {b}"
    # Without documents the last document of row 0 reads earlier tokens: a different result.
    plain = m.logits(tokens[:1], seq_len=37)
    assert (plain[:, 19:] - got[:1, 19:]).abs().max() > 0.1


def test_dynamic_ntk_with_documents(megatron_single_process):
    m = tiny_model(METHODS["rope-ntk"])
    ids = _ids(9, 17, 11)[None]
    tokens = torch.randint(0, VOCAB, (1, 37))
    sess = m.session([37])
    pos = torch.arange(37)[None]
    outs = [sess.logits(tokens[:, :30], pos[:, :30], ids[:, :30])]
    outs += [sess.logits(tokens[:, p : p + 1], pos[:, p : p + 1]) for p in range(30, 37)]
    got = torch.cat(outs, 1)
    ref = m.logits(tokens, seq_len=37, doc_ids=ids)
    assert (got - ref).abs().max() <= TOL_LOGITS


@pytest.mark.parametrize("method", ["rope", "hybrid-swa", "longheads"])
def test_generation_continues_the_last_document(megatron_single_process, method: str):
    """A packed prompt generates what its last document generates alone (length rules aside,
    which these methods do not have), and greedy tokens equal the full-forward argmax."""
    m = tiny_model(METHODS[method])
    docs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (6, 3, 17)]
    packed = sum(docs, [])
    doc_ids = sum([[i] * len(d) for i, d in enumerate(docs)], [])
    other = torch.randint(0, VOCAB, (9,)).tolist()
    out = m.generate([packed, other], doc_ids=[doc_ids, [0] * 9], max_new_tokens=10,
                     prefill_chunk_size=5, stop_tokens=[])
    alone = m.generate([docs[-1], other], max_new_tokens=10, prefill_chunk_size=4,
                       stop_tokens=[])
    assert out == alone
    seq = torch.tensor([packed + out[0]])
    ids = torch.tensor([doc_ids + [2] * 10])
    logits = m.logits(seq, seq_len=seq.shape[1], doc_ids=ids)
    assert logits[0, len(packed) - 1 : -1].argmax(-1).tolist() == out[0]


def test_bad_doc_ids_raise(megatron_single_process):
    m = tiny_model(METHODS["longheads"])
    tokens = torch.randint(0, VOCAB, (2, 10))
    good = torch.zeros(2, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"doc_ids\[1, 4\]=0 < doc_ids\[1, 3\]=2"):
        m.logits(tokens, doc_ids=torch.tensor([[0] * 10, [0, 1, 2, 2, 0, 0, 3, 3, 3, 3]]))
    with pytest.raises(ValueError, match=r"doc_ids.shape=\(2, 9\); expected \[B, S\] = \[2, 10\]"):
        m.logits(tokens, doc_ids=good[:, :9])
    with pytest.raises(ValueError, match="doc_ids dtype=torch.float32"):
        m.logits(tokens, doc_ids=good.float())
    sess = m.session([10, 10])
    pos = torch.arange(4).expand(2, 4)
    sess.feed(tokens[:, :4], pos, torch.tensor([[0, 0, 1, 1], [3, 3, 3, 3]]))
    with pytest.raises(ValueError, match="doc_ids of row 1: id 2 at index 4 follows id 3"):
        sess.feed(tokens[:, 4:5], pos[:, :1] + 4, torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match=r"positions of row 0: \[5\]; expected the row's next "
                                         r"indices \[4\]"):
        sess.feed(tokens[:, 4:5], pos[:, :1] + 5)
    with pytest.raises(ValueError, match=r"doc_ids.shape=\(2, 2\); expected \[B, S\] = \[2, 1\]"):
        sess.feed(tokens[:, 4:5], pos[:, :1] + 4, good[:, :2])
    with pytest.raises(ValueError, match="past the cache capacity 10"):
        sess.feed(tokens, torch.arange(4, 14).expand(2, 10))
    with pytest.raises(ValueError, match=r"doc_ids lengths \[3, 1\]; expected one id per prompt"):
        m.generate([[1, 2, 3], [4, 5]], doc_ids=[[0, 0, 1], [0]], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs token-id prompts"):
        m.generate(["some text"], doc_ids=[[0]], max_new_tokens=2)
    off = tiny_model([*METHODS["rope"], "attention.mask_documents=false"])
    with pytest.raises(ValueError, match="attention.mask_documents=False"):
        off.logits(tokens, doc_ids=good)
