"""Tokenizers: the shipped byte-level BPE (vocabulary 4,096, digits split) and any other.

`assets/tokenizer.json` is trained by `train_tokenizer.py` on the train split of the embedded
corpus (docs/data.md). It is byte-level, so every string round-trips exactly:
`tok.decode(tok.encode(text).ids) == text`. Its only special token is `EOT_TOKEN`.

`load_text_tokenizer(path, eos_token)` takes any tokenizer a run may name: a `tokenizer.json`
or a Hugging Face tokenizer directory, each with its own end-of-document token (see
`resolve_eos` for how it is found). Encoding never adds special tokens; the packing code puts
the EOS after every document.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOT_TOKEN = "<|endoftext|>"
DEFAULT_TOKENIZER_PATH = Path(__file__).resolve().parent / "assets" / "tokenizer.json"
RETRAIN_HINT = "retrain it with `python -m megatron_ext.data.train_tokenizer`"


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a `tokenizers` tokenizer file, by default the shipped BPE-4096.

    Args:
        path: a `tokenizer.json`; defaults to `assets/tokenizer.json` of this package.

    Returns:
        The tokenizer. `tok.encode(text).ids` gives ids; `tok.decode(ids)` inverts it.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not a valid tokenizer (the message names the file), or it
            lacks the `EOT_TOKEN` special token.
    """
    file = Path(path) if path is not None else DEFAULT_TOKENIZER_PATH
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file {file} does not exist; {RETRAIN_HINT}")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        raise ValueError(f"{file}: not a valid tokenizer file ({err}); {RETRAIN_HINT}") from err
    eot_id(tok)  # fail early on a tokenizer without the document separator
    return tok


def eot_id(tok: Tokenizer) -> int:
    """The id of `EOT_TOKEN` in `tok`.

    Raises:
        ValueError: if `tok` has no such token or it is not registered as special.
    """
    token_id = tok.token_to_id(EOT_TOKEN)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    if token_id is None or EOT_TOKEN not in special:
        raise ValueError(f"tokenizer has no special token {EOT_TOKEN!r}; {RETRAIN_HINT}")
    return token_id


def to_hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap `tok` for `transformers` (generation, pipelines, `save_pretrained`).

    `EOT_TOKEN` serves as BOS, EOS and padding token, as in GPT-2; there is no unknown token
    (byte-level BPE encodes every string).

    Returns:
        A `transformers.PreTrainedTokenizerFast` holding a copy of `tok` (same ids); `tok` is
        left unchanged.
    """
    from transformers import PreTrainedTokenizerFast  # heavy; imported only when asked for

    eot_id(tok)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT_TOKEN, eos_token=EOT_TOKEN, pad_token=EOT_TOKEN
    )


@dataclass(frozen=True)
class TextTokenizer:
    """A `tokenizers.Tokenizer` with the end-of-document token a run appends to every document."""

    tokenizer: Tokenizer
    """The fast tokenizer (for a Hugging Face directory: its backend tokenizer)."""
    eos_token: str
    """End-of-document token."""
    eos_id: int
    """Its id."""
    source: str
    """What was loaded: 'shipped BPE-4096', a tokenizer.json or a directory."""

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce: 1 + the largest id, added tokens included."""
        top = max(self.tokenizer.get_added_tokens_decoder(), default=-1)
        return max(self.tokenizer.get_vocab_size(with_added_tokens=True), top + 1)

    @property
    def identity(self) -> str:
        """sha256 of the tokenizer's full JSON and the EOS: equal iff the ids it produces are."""
        h = hashlib.sha256(self.tokenizer.to_str().encode("utf-8"))
        h.update(f"\0eos={self.eos_token}\0".encode())
        return h.hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (parallel in the Rust library)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def _special_tokens(tok: Tokenizer) -> list[str]:
    return [t.content for t in tok.get_added_tokens_decoder().values() if t.special]


def _config_eos(directory: Path) -> str | None:
    """The eos_token of a Hugging Face tokenizer directory's config files, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"{file}: not a JSON object ({err})") from err
        if isinstance(eos, dict):  # an AddedToken written out: {"content": ..., ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def resolve_eos(tok: Tokenizer, eos_token: str | None, *, config_eos: str | None,
                where: str) -> tuple[str, int]:
    """The end-of-document token and id: `eos_token` if given, else the tokenizer's config's
    eos_token, else its one special token.

    Raises:
        ValueError: the token named is not in the vocabulary, or none can be told apart (the
            message lists the special tokens and says to set `data.eos_token`).
    """
    if eos_token is not None:
        token_id = tok.token_to_id(eos_token)
        if token_id is None:
            raise ValueError(f"data.eos_token={eos_token!r} is not in the vocabulary of {where}; "
                             f"its special tokens: {_special_tokens(tok)}")
        return eos_token, token_id
    if config_eos is not None:
        token_id = tok.token_to_id(config_eos)
        if token_id is None:
            raise ValueError(f"{where}: its config names eos_token={config_eos!r}, which is not "
                             "in its vocabulary; set data.eos_token")
        return config_eos, token_id
    special = _special_tokens(tok)
    if len(special) == 1:
        return special[0], tok.token_to_id(special[0])
    raise ValueError(f"{where} does not say which token ends a document (no eos_token in a "
                     f"config, special tokens: {special or 'none'}); set data.eos_token")


def load_text_tokenizer(path: str | os.PathLike | None = None,
                        eos_token: str | None = None) -> TextTokenizer:
    """Load the shipped tokenizer, a `tokenizer.json`, or a Hugging Face tokenizer directory.

    A directory with a `tokenizer.json` is read with `tokenizers` (its EOS from
    `tokenizer_config.json` or `special_tokens_map.json`); one without (e.g. only a
    SentencePiece model) goes through `transformers.AutoTokenizer` and must yield a fast
    tokenizer.

    Raises:
        FileNotFoundError: `path` does not exist (the message names it as `data.tokenizer`).
        ValueError: the file or directory holds no readable tokenizer, or no EOS can be found.
    """
    if path is None:
        tok = load_tokenizer()
        eos, eos_id = resolve_eos(tok, eos_token, config_eos=EOT_TOKEN, where="the shipped BPE")
        return TextTokenizer(tok, eos, eos_id, "shipped BPE-4096")
    where = Path(path).expanduser()
    if not where.exists():
        raise FileNotFoundError(f"data.tokenizer={os.fspath(path)!r} does not exist (expected a "
                                "tokenizer.json or a Hugging Face tokenizer directory)")
    config_eos = None
    if where.is_dir():
        config_eos = _config_eos(where)
        if (where / "tokenizer.json").is_file():
            tok = _read_tokenizer_json(where / "tokenizer.json", path)
        else:
            tok = _auto_tokenizer(where, path)
    else:
        tok = _read_tokenizer_json(where, path)
    eos, eos_id = resolve_eos(tok, eos_token, config_eos=config_eos,
                              where=f"data.tokenizer={os.fspath(path)!r}")
    return TextTokenizer(tok, eos, eos_id, str(where))


def _read_tokenizer_json(file: Path, named: str | os.PathLike) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        raise ValueError(f"data.tokenizer={os.fspath(named)!r}: {file} is not a valid "
                         f"tokenizer.json ({err})") from err


def _auto_tokenizer(directory: Path, named: str | os.PathLike) -> Tokenizer:
    from transformers import AutoTokenizer  # heavy; only for directories without tokenizer.json

    try:
        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"data.tokenizer={os.fspath(named)!r}: not a Hugging Face tokenizer "
                         f"directory ({err})") from err
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"data.tokenizer={os.fspath(named)!r}: transformers loads it only as a "
                         "slow tokenizer; save a tokenizer.json with it (save_pretrained of the "
                         "fast tokenizer) and point data.tokenizer at that")
    return backend
