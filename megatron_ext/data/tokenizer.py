"""The shipped byte-level BPE tokenizer (vocabulary 4,096, digits split one per token).

`assets/tokenizer.json` is trained by `train_tokenizer.py` on the train split of the embedded
corpus (../shared/EVAL.md section 3). It is byte-level, so every string round-trips exactly:
`tok.decode(tok.encode(text).ids) == text`. Its only special token is `EOT_TOKEN`, which the
packing code puts between documents; encoding adds no special tokens by itself.
"""

from __future__ import annotations

import os
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
