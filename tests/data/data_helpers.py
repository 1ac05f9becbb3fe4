"""Small corpora and tokenizers written into a test's tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune "
    "must be in want of a wife.\nHowever little known the feelings or views of such a man may be",
    "In the beginning God created the heaven and the earth.\nAnd the earth was without form.",
    "ABASEMENT, n. A decent and customary mental attitude in the presence of wealth or power.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition,",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement,",
    "The family of Dashwood had long been settled in Sussex. Their estate was large, 1811.",
]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


def write_parquet(path: Path, texts: list[str], column: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, "n": list(range(len(texts)))}), path,
                   row_group_size=2)
    return path


def train_bpe(vocab_size: int = 300, special: str = "</s>") -> Tokenizer:
    """A byte-level BPE with one special token `special`, trained on TEXTS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXTS * 3, trainer)
    return tok
