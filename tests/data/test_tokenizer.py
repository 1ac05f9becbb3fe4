"""The shipped BPE-4096 tokenizer against the properties the training code relies on.

Compares `decode(encode(text))` with `text` on every document of the embedded corpus (byte-level
BPE must be lossless, so the comparison is exact), checks the vocabulary size, that the
end-of-text marker is one special token, that digits are split one per token (passkeys), and
that chars/token on the held-out Persuasion is in a sane range for a 4k vocabulary (2.5-4; the
shipped file gives 3.41, see docs/data.md). Also checks that retraining on a small text is
deterministic and that missing or corrupt files give errors naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from megatron_ext.data.corpus import load_documents
from megatron_ext.data.tokenizer import EOT_TOKEN, eot_id, load_tokenizer, to_hf_tokenizer
from megatron_ext.data.train_tokenizer import text_pieces, train_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


def test_round_trip_on_every_document(tok: Tokenizer) -> None:
    docs = load_documents()
    encodings = tok.encode_batch([d.text for d in docs])
    decoded = tok.decode_batch([e.ids for e in encodings])
    mismatched = [d.id for d, text in zip(docs, decoded) if text != d.text]
    assert mismatched == []


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("  leading and trailing  \n\n", id="whitespace"),
        pytest.param("naïve café — “quoted” 你好 🙂 \t\r\n", id="unseen-unicode"),
        pytest.param("The pass key is 68042. Remember it. 68042 is the pass key.", id="passkey"),
    ],
)
def test_round_trip_on_awkward_strings(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text).ids) == text


def test_vocab_size_and_eot(tok: Tokenizer) -> None:
    assert tok.get_vocab_size() == 4096
    eot = eot_id(tok)
    assert tok.encode(EOT_TOKEN).ids == [eot]
    ids = tok.encode(f"end.{EOT_TOKEN}Start").ids
    assert ids.count(eot) == 1
    assert tok.decode(ids, skip_special_tokens=False) == f"end.{EOT_TOKEN}Start"
    assert tok.encode("plain text").ids.count(eot) == 0  # no special tokens added implicitly


@pytest.mark.parametrize(
    "text, n_tokens",
    [
        pytest.param("12345", 5, id="five-digits"),
        pytest.param("1611", 4, id="year"),
        pytest.param("0000000", 7, id="repeated-digit"),
    ],
)
def test_digits_split_individually(tok: Tokenizer, text: str, n_tokens: int) -> None:
    assert tok.encode(text).tokens == list(text)
    assert len(tok.encode(text).ids) == n_tokens


def test_chars_per_token_on_persuasion(tok: Tokenizer) -> None:
    (persuasion,) = [d for d in load_documents("test") if d.title == "Persuasion"]
    ratio = len(persuasion.text) / len(tok.encode(persuasion.text).ids)
    assert 2.5 < ratio < 4.0


def test_hf_wrapper_matches(tok: Tokenizer) -> None:
    hf = to_hf_tokenizer(tok)
    text = "It is a truth universally acknowledged, 1813."
    assert hf(text)["input_ids"] == tok.encode(text).ids
    assert hf.eos_token_id == eot_id(tok) and hf.decode(tok.encode(text).ids) == text


def test_training_is_deterministic_and_uses_recipe() -> None:
    docs = load_documents("dev")
    pieces = list(text_pieces(docs, piece_chars=20_000))[:5]
    assert len(pieces) == 5 and all(len(p) == 20_000 for p in pieces)
    first = train_tokenizer(pieces, vocab_size=400, show_progress=False)
    second = train_tokenizer(pieces, vocab_size=400, show_progress=False)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 400 and eot_id(first) == 0
    assert first.encode("2024").tokens == ["2", "0", "2", "4"]


def test_bad_vocab_size_and_piece_size() -> None:
    with pytest.raises(ValueError, match=r"vocab_size=100; expected at least 257"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match=r"piece_chars=0; expected a positive"):
        list(text_pieces(load_documents("dev"), piece_chars=0))


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.json does not exist.*train_tokenizer"):
        load_tokenizer(tmp_path / "absent.json")


def test_corrupt_tokenizer_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"broken\.json: not a valid tokenizer file"):
        load_tokenizer(path)


def test_tokenizer_without_eot_is_rejected(tmp_path: Path, tok: Tokenizer) -> None:
    data = json.loads(tok.to_str())
    data["added_tokens"] = []
    del data["model"]["vocab"][EOT_TOKEN]
    path = tmp_path / "no_eot.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no special token '<\|endoftext\|>'"):
        load_tokenizer(path)
