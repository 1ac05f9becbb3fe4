"""Train the shipped byte-level BPE tokenizer on the train split of the embedded corpus.

    python -m megatron_ext.data.train_tokenizer [--vocab-size 4096] [--out PATH]

Recipe of docs/data.md ("Tokenizer") with `tokenizers`: `models.BPE`, pre-tokenizer
`Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False)])`, ByteLevel
decoder, special token `<|endoftext|>`, `min_frequency=2`, the 256 byte symbols as the initial
alphabet (so any string encodes, even with characters the corpus lacks), and the text fed in
100k-character pieces. Only the train split is used, so no dev or test text shapes the merges.
Training is deterministic: the same corpus gives a byte-identical `tokenizer.json`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_ext.data.corpus import Document, load_documents
from megatron_ext.data.tokenizer import DEFAULT_TOKENIZER_PATH, EOT_TOKEN

PIECE_CHARS = 100_000


def text_pieces(docs: Iterable[Document], piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Yield each document's text in consecutive pieces of at most `piece_chars` characters.

    Raises:
        ValueError: if `piece_chars` is not positive.
    """
    if piece_chars <= 0:
        raise ValueError(f"piece_chars={piece_chars}; expected a positive number of characters")
    for doc in docs:
        for start in range(0, len(doc.text), piece_chars):
            yield doc.text[start : start + piece_chars]


def new_bpe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with individually split digits and a ByteLevel decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, *, show_progress: bool = True
) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    Args:
        texts: training text, e.g. `text_pieces(load_documents("train"))`.
        vocab_size: total vocabulary including the 256 byte symbols and `EOT_TOKEN`.
        show_progress: show the `tokenizers` progress bars.

    Returns:
        The trained tokenizer; `EOT_TOKEN` is registered as a special token.

    Raises:
        ValueError: if `vocab_size` cannot hold the byte alphabet and `EOT_TOKEN`.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size={vocab_size}; expected at least {len(alphabet) + 1}")
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=DEFAULT_TOKENIZER_PATH)
    parser.add_argument("--corpus", type=Path, default=None, help="corpus.jsonl.xz to train on")
    args = parser.parse_args(argv)
    console = Console()
    docs = load_documents("train", args.corpus)
    n_chars = sum(len(d.text) for d in docs)
    console.print(
        f"training BPE-{args.vocab_size} on {len(docs)} train documents, {n_chars:,} chars"
    )
    start = time.perf_counter()
    tok = train_tokenizer(text_pieces(docs), args.vocab_size)
    console.print(f"trained in {time.perf_counter() - start:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    console.print(f"wrote {args.out} (vocabulary {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
