"""From the `data` config section to packed train and held-out sequences.

`build_datasets(data_cfg, seed)` reads the corpus (the embedded one, or a `.jsonl[.xz]` file of
the same format), loads the tokenizer, tokenizes with a progress bar and packs each split with
document boundaries kept (see packing.py). The held-out split is a separate set of whole books
(`data.eval_split`), never a tail of training documents.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.config import DataConfig
from megatron_ext.data.corpus import Document, load_documents
from megatron_ext.data.packing import PackedSequences, pack_documents, tokenize_documents
from megatron_ext.data.tokenizer import eot_id, load_tokenizer


@dataclass(frozen=True)
class Datasets:
    train: PackedSequences
    eval: PackedSequences
    tokenizer: object  # tokenizers.Tokenizer
    vocab_size: int
    eot_id: int


def _documents(cfg: DataConfig, split: str) -> list[Document]:
    path = None if cfg.corpus == "embedded" else cfg.corpus
    docs = load_documents(split, path=path)
    if not docs:
        raise ValueError(f"data.corpus={cfg.corpus!r} has no documents in split {split!r}")
    if cfg.max_documents is not None:
        docs = docs[: cfg.max_documents]
    return docs


def build_datasets(cfg: DataConfig, *, seed: int, progress: bool = True) -> Datasets:
    """Tokenize and pack the training split and the held-out split of `cfg.corpus`."""
    tok = load_tokenizer(cfg.tokenizer)
    eot = eot_id(tok)
    packed = {}
    for split in ("train", cfg.eval_split):
        docs = _documents(cfg, split)
        tokenized = tokenize_documents([(d.id, d.text) for d in docs], tok, eot_id=eot,
                                       progress=progress)
        packed[split] = pack_documents(tokenized, cfg.seq_length, seed=seed, pad_id=eot,
                                       shuffle=split == "train")
    return Datasets(packed["train"], packed[cfg.eval_split], tok, tok.get_vocab_size(), eot)


__all__ = ["Datasets", "build_datasets"]
