"""Synthetic passkey documents for training (megatron_ext/eval/retrieval_mix.py)."""

from __future__ import annotations

import json
import re

import pytest

from megatron_ext.data.tokenizer import load_tokenizer
from megatron_ext.eval.retrieval_mix import retrieval_documents, write_retrieval_corpus


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_documents_are_passkey_prompts_with_their_answer(tok) -> None:
    docs = list(retrieval_documents(tok, docs=12, max_length=256, seed=1, min_length=96))
    assert len(docs) == 12
    lengths = []
    for text in docs:
        m = re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", text)
        assert m, text[:200]
        assert text.endswith(f"What is the pass key? The pass key is {m.group(1)}")
        lengths.append(len(tok.encode(text, add_special_tokens=False).ids))
    assert all(len(t) > 0 for t in docs)
    assert max(lengths) <= 256 + 2 and min(lengths) >= 96 - 8  # within a token or two of the draw
    assert len(set(lengths)) > 3 and len({re.search(r"is (\d+)\.", t).group(1) for t in docs}) > 6


def test_deterministic_per_seed(tok) -> None:
    a = list(retrieval_documents(tok, docs=5, max_length=160, seed=3))
    assert a == list(retrieval_documents(tok, docs=5, max_length=160, seed=3))
    assert a != list(retrieval_documents(tok, docs=5, max_length=160, seed=4))


def test_written_jsonl_reads_back(tok, tmp_path) -> None:
    path = write_retrieval_corpus(tmp_path / "mix" / "p.jsonl", tok, docs=4, max_length=128,
                                  seed=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in rows] == list(retrieval_documents(tok, docs=4, max_length=128,
                                                                 seed=2))
    assert not (tmp_path / "mix" / "p.jsonl.tmp").exists()


@pytest.mark.parametrize("kw, match", [({"docs": 0}, "docs=0"),
                                       ({"min_length": 16}, r"lengths \[16, 128\]"),
                                       ({"min_length": 200}, r"lengths \[200, 128\]")])
def test_bad_arguments(tok, kw, match) -> None:
    args = {"docs": 2, "max_length": 128, "seed": 1} | kw
    with pytest.raises(ValueError, match=match):
        list(retrieval_documents(tok, **args))
