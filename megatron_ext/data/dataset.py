"""From the `data` config section to packed train and held-out sequences.

`build_datasets(data_cfg, seed=...)` loads the tokenizer, tokenises each corpus once into the
token cache (indexed.py; a Megatron indexed dataset is used as it is), picks the training and
held-out documents, packs them with document boundaries kept (packing.py) and, for a blend,
mixes the corpora by weight. Held-out text is always whole documents, never a tail of training
documents: the embedded corpus's held-out books (`data.eval_split`, also when it is named as
`data.eval_corpus`), `data.eval_corpus`, or a fixed `data.eval_fraction` of each corpus's
documents (the same ones whatever the seed).

`tokenizer_vocab_size(data_cfg)` and `check_vocab_size(model_vocab_size, data_cfg)` let the
trainer refuse a too-small model vocabulary before it tokenises or writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_ext.config import DataConfig
from megatron_ext.data.corpus import DEFAULT_CORPUS_PATH, load_documents
from megatron_ext.data.indexed import (
    TokenDocuments,
    corpus_tokens,
    is_indexed_prefix,
    open_indexed,
)
from megatron_ext.data.packing import BlendedSequences, ConcatSequences, PackedSequences
from megatron_ext.data.sources import find_corpus
from megatron_ext.data.tokenizer import TextTokenizer, load_text_tokenizer

EMBEDDED = "embedded"
HOLDOUT_SEED = 0
"""Seed of the held-out document choice: fixed, so changing train.seed never leaks eval text."""


@dataclass(frozen=True)
class CorpusStats:
    """What one corpus contributed (printed by the trainer)."""

    name: str
    documents: int
    tokens: int
    train_documents: int
    eval_documents: int
    weight: float
    location: str | None
    """The token file prefix (cache entry or the Megatron dataset itself)."""


@dataclass(frozen=True)
class Datasets:
    train: PackedSequences | BlendedSequences
    eval: PackedSequences | ConcatSequences
    tokenizer: object  # tokenizers.Tokenizer
    vocab_size: int
    eot_id: int
    """The end-of-document token's id (also the padding id)."""
    text_tokenizer: TextTokenizer | None = None
    corpora: list[CorpusStats] = field(default_factory=list)

    @property
    def eos_id(self) -> int:
        return self.eot_id


def load_data_tokenizer(cfg: DataConfig) -> TextTokenizer:
    """The run's tokenizer (`data.tokenizer`, `data.eos_token`)."""
    return load_text_tokenizer(cfg.tokenizer, cfg.eos_token)


def tokenizer_vocab_size(cfg: DataConfig) -> int:
    """Vocabulary of the configured tokenizer (cheap: loads the tokenizer only)."""
    return load_data_tokenizer(cfg).vocab_size


def check_vocab_size(model_vocab_size: int | None, cfg: DataConfig) -> int:
    """The model vocabulary to build: `model_vocab_size`, or the tokenizer's when None.

    Raises:
        ValueError: `model_vocab_size` is smaller than the tokenizer's vocabulary (ids the
            tokenizer produces would index past the embedding).
    """
    tok = load_data_tokenizer(cfg)
    if model_vocab_size is None:
        return tok.vocab_size
    if model_vocab_size < tok.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tok.vocab_size} ids, {tok.source}); set model.vocab_size >= {tok.vocab_size} "
            "or leave it unset to take the tokenizer's")
    return model_vocab_size


def _embedded_tokens(tok: TextTokenizer, cfg: DataConfig, progress: bool) -> TokenDocuments:
    docs = load_documents()
    st = DEFAULT_CORPUS_PATH.stat()
    identity = {"embedded": [DEFAULT_CORPUS_PATH.name, st.st_size, st.st_mtime_ns]}
    return corpus_tokens(EMBEDDED, identity, lambda on_bytes: _embedded_texts(docs, on_bytes),
                         tok, cfg.cache_dir, total_bytes=sum(len(d.text) for d in docs),
                         meta={"splits": [d.split for d in docs], "ids": [d.id for d in docs]},
                         progress=progress)


def _embedded_texts(docs, on_bytes):
    for d in docs:
        yield d.text
        on_bytes(len(d.text))


def corpus_documents(spec: str, tok: TextTokenizer, cfg: DataConfig, *, key: str,
                     progress: bool = True) -> tuple[TokenDocuments, bool]:
    """Tokenised documents of one corpus and whether they are foreign (a Megatron dataset
    whose ids must be checked against the vocabulary)."""
    if spec == EMBEDDED:
        return _embedded_tokens(tok, cfg, progress), False
    prefix = is_indexed_prefix(spec)
    if prefix is not None:
        return open_indexed(prefix, f"{key}={spec!r}"), True
    files = find_corpus(spec, cfg.text_field, key=key)
    identity = {"files": files.fingerprint(), "text_field": cfg.text_field}
    docs = corpus_tokens(spec, identity, files.documents, tok, cfg.cache_dir,
                         total_bytes=files.total_bytes(), progress=progress)
    return docs, False


def split_documents(docs: TokenDocuments, cfg: DataConfig, *, holdout: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) document indices of one corpus.

    The embedded corpus splits by book (`split` == 'train' / `data.eval_split`); another corpus
    holds out `data.eval_fraction` of its documents (at least one) when `holdout`, chosen by a
    fixed seed. `data.max_documents` keeps the first N training documents.
    """
    n = len(docs)
    if docs.splits is not None:
        splits = np.asarray(docs.splits)
        train = np.flatnonzero(splits == "train")
        held = np.flatnonzero(splits == cfg.eval_split) if holdout else np.zeros(0, np.int64)
    elif holdout:
        if n < 2:
            raise ValueError(
                f"{docs.name} has {n} document; whole documents cannot be held out for "
                "evaluation: give data.eval_corpus, or a corpus of several documents")
        k = max(1, round(cfg.eval_fraction * n))
        held = np.sort(np.random.default_rng(HOLDOUT_SEED).permutation(n)[:k])
        train = np.setdiff1d(np.arange(n), held)
    else:
        train, held = np.arange(n), np.zeros(0, np.int64)
    if cfg.max_documents is not None:
        train = train[: cfg.max_documents]
    return train, held


def _pack(docs: TokenDocuments, idx: np.ndarray, cfg: DataConfig, tok: TextTokenizer, *,
          seed: int | None, foreign: bool) -> PackedSequences:
    order = idx if seed is None else idx[np.random.default_rng(seed).permutation(idx.size)]
    if order.size == 0 or docs.lengths[order].sum() == 0:
        raise ValueError(f"{docs.name}: no documents left for "
                         f"{'training' if seed is not None else 'evaluation'}")
    names = None
    if docs.doc_names is not None:
        names = tuple(docs.doc_names[i] for i in order)
    return PackedSequences(docs, order, cfg.seq_length, pad_id=tok.eos_id, doc_order=names,
                           vocab_size=tok.vocab_size if foreign else None)


def build_datasets(cfg: DataConfig, *, seed: int, progress: bool = True) -> Datasets:
    """Tokenise (once, cached), split, pack and blend the configured corpora.

    Args:
        cfg: the `data` section.
        seed: shuffles the training documents and the blend (held-out choice does not depend
            on it).
        progress: show progress bars while tokenising.

    Returns:
        Datasets with `.train` (packed, blended when `data.blend` has several corpora),
        `.eval` (packed held-out documents, in order), the tokenizer and `.vocab_size`.

    Raises:
        FileNotFoundError / ValueError: a corpus, field or tokenizer that is missing or wrong,
            named with the config key that points at it.
    """
    tok = load_data_tokenizer(cfg)
    if cfg.blend:
        specs = [(b.path, b.weight, f"data.blend[{i}].path") for i, b in enumerate(cfg.blend)]
    else:
        specs = [(cfg.corpus, 1.0, "data.corpus")]
    holdout = cfg.eval_corpus is None
    train_parts, eval_parts, stats = [], [], []
    for j, (spec, weight, key) in enumerate(specs):
        docs, foreign = corpus_documents(spec, tok, cfg, key=key, progress=progress)
        train_idx, held_idx = split_documents(docs, cfg, holdout=holdout)
        train_parts.append(_pack(docs, train_idx, cfg, tok, seed=seed + j, foreign=foreign))
        if held_idx.size:
            eval_parts.append(_pack(docs, held_idx, cfg, tok, seed=None, foreign=foreign))
        stats.append(CorpusStats(spec, len(docs), docs.num_tokens, int(train_idx.size),
                                 int(held_idx.size), weight, docs.path_prefix))
    if cfg.eval_corpus is not None:
        docs, foreign = corpus_documents(cfg.eval_corpus, tok, cfg, key="data.eval_corpus",
                                         progress=progress)
        held = np.arange(len(docs))
        if docs.splits is not None:  # the embedded corpus: only its held-out books
            held = np.flatnonzero(np.asarray(docs.splits) == cfg.eval_split)
        eval_parts = [_pack(docs, held, cfg, tok, seed=None, foreign=foreign)]
        stats.append(CorpusStats(cfg.eval_corpus, len(docs), docs.num_tokens, 0, int(held.size),
                                 0.0, docs.path_prefix))
    if not eval_parts:
        raise ValueError("no held-out documents: set data.eval_corpus")
    train = train_parts[0] if len(train_parts) == 1 else BlendedSequences(
        train_parts, [w for _, w, _ in specs], seed=seed)
    held = eval_parts[0] if len(eval_parts) == 1 else ConcatSequences(eval_parts)
    return Datasets(train, held, tok.tokenizer, tok.vocab_size, tok.eos_id, tok, stats)


__all__ = ["CorpusStats", "Datasets", "build_datasets", "check_vocab_size",
           "corpus_documents", "load_data_tokenizer", "split_documents", "tokenizer_vocab_size"]
