"""Synthetic passkey documents to blend into training, so small models can learn retrieval.

A model of a few million parameters trained on ~1M tokens of prose never sees a sentence it
must copy from far back, and scores 0% on passkey at every length (docs/scorecard_quick.md, quick
plan). Blending a share of passkey documents into its training data teaches the skill at the
training length; the scorecard then measures whether each method carries it to longer
contexts. The documents use the evaluation's template (``passkey.py``) with the answer
appended, at lengths drawn uniformly from ``[min_length, max_length]`` tokens and depths drawn
uniformly from [0, 1], from their own seed: the scorecard refuses a mix seed equal to the
evaluation seed, so no evaluation prompt is trained on.

    python -m megatron_ext.eval.retrieval_mix --out runs/mix/passkey.jsonl --docs 4000 \\
        --max-length 512 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from megatron_ext.eval import passkey

__all__ = ["retrieval_documents", "write_retrieval_corpus"]


def retrieval_documents(
    tokenizer, *, docs: int, max_length: int, seed: int, min_length: int = 128
) -> Iterator[str]:
    """``docs`` passkey prompts with their answers, as training text.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (the model's).
        docs: number of documents.
        max_length, min_length: each document's token length is drawn from this range.
        seed: the mix's seed (never the evaluation seed).

    Raises:
        ValueError: docs < 1 or an empty / too short length range.
    """
    if docs < 1:
        raise ValueError(f"docs={docs}; expected >= 1")
    if not 32 <= min_length <= max_length:
        raise ValueError(f"lengths [{min_length}, {max_length}]; expected 32 <= min <= max")
    rng = np.random.default_rng([seed, 0x5EED])
    for i in range(docs):
        length = int(rng.integers(min_length, max_length + 1))
        depth = round(float(rng.random()), 4)
        (s,) = passkey.generate(tokenizer, length, seed=seed * 1_000_003 + i, trials=1,
                                depths=(depth,))
        key, n_garbage = s.meta["key"], s.meta["n_garbage"]
        yield passkey.passkey_prompt(key, n_garbage, depth) + f" {key}"


def write_retrieval_corpus(
    path: str | os.PathLike, tokenizer, *, docs: int, max_length: int, seed: int,
    min_length: int = 128,
) -> Path:  # fmt: skip
    """Write the documents as JSON Lines (``{"text": ...}``) atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for text in retrieval_documents(tokenizer, docs=docs, max_length=max_length, seed=seed,
                                        min_length=min_length):
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    from megatron_ext.data.tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="a .jsonl path")
    p.add_argument("--docs", type=int, default=4000)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--min-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json; default the shipped one")
    a = p.parse_args(argv)
    out = write_retrieval_corpus(a.out, load_tokenizer(a.tokenizer), docs=a.docs,
                                 max_length=a.max_length, seed=a.seed, min_length=a.min_length)
    print(f"wrote {a.docs} passkey documents to {out}")


if __name__ == "__main__":
    main()
