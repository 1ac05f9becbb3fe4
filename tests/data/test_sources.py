"""Corpus formats, tokenizers and the token cache, each against an independent reference.

- Formats: the token file built from a .txt / .jsonl / .jsonl.gz / .jsonl.xz / .parquet corpus
  (and a directory of them) equals the tokenizer run directly on the same texts, plus the EOS,
  document by document (exact integers: nothing but ids moves).
- Tokenizers: a tokenizer.json and a Hugging Face directory with a non-GPT EOS give that EOS and
  the same ids as `tokenizers` itself; `data.eos_token` overrides; the vocabulary check refuses a
  model vocabulary smaller than the tokenizer's.
- Cache: a second build reuses the entry (no tokenising: the tokenizer is not called); editing
  the corpus or changing the tokenizer makes a new entry.
- Bad inputs: each error names the key, file, line or field, and what would be valid.
"""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
from data_helpers import TEXTS, train_bpe, write_jsonl, write_parquet

from megatron_ext.config import DataConfig
from megatron_ext.data import indexed
from megatron_ext.data.dataset import build_datasets, check_vocab_size, corpus_documents
from megatron_ext.data.tokenizer import load_text_tokenizer


def _expected(tok, texts: list[str]) -> list[list[int]]:
    return [tok.tokenizer.encode(t, add_special_tokens=False).ids + [tok.eos_id] for t in texts]


def _docs(spec: str, tmp_path: Path, **kw) -> list[list[int]]:
    cfg = DataConfig(corpus=spec, cache_dir=str(tmp_path / "cache"), **kw)
    tok = load_text_tokenizer(cfg.tokenizer, cfg.eos_token)
    docs, _ = corpus_documents(spec, tok, cfg, key="data.corpus", progress=False)
    return [docs.document(i).tolist() for i in range(len(docs))]


def _gz(path: Path, texts: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return path


def _xz(path: Path, texts: list[str]) -> Path:
    with lzma.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.xz", "parquet", "txt"])
def test_each_format_matches_direct_tokenization(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"corpus.{kind}"
    texts = TEXTS
    if kind == "jsonl":
        write_jsonl(path, texts)
    elif kind == "jsonl.gz":
        _gz(path, texts)
    elif kind == "jsonl.xz":
        _xz(path, texts)
    elif kind == "parquet":
        write_parquet(path, texts)
    else:
        texts = ["\n".join(TEXTS)]
        path.write_text(texts[0], encoding="utf-8")
    assert _docs(str(path), tmp_path) == _expected(load_text_tokenizer(), texts)


def test_directory_and_text_field(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "b.jsonl", TEXTS[2:4], field="body")
    write_parquet(d / "a.parquet", TEXTS[:2], column="body")
    (d / "c.txt").write_text(TEXTS[4], encoding="utf-8")
    (d / "notes.md").write_text("ignored: not a corpus file", encoding="utf-8")
    got = _docs(str(d), tmp_path, text_field="body")
    assert got == _expected(load_text_tokenizer(), TEXTS[:5])  # a.parquet, b.jsonl, c.txt


def test_tokenizer_json_and_hf_directory_with_own_eos(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    bpe = train_bpe(special="</s>")
    file = tmp_path / "tok.json"
    bpe.save(str(file))
    hf_dir = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>").save_pretrained(hf_dir)
    corpus = str(write_jsonl(tmp_path / "c.jsonl", TEXTS))
    want = [bpe.encode(t).ids + [bpe.token_to_id("</s>")] for t in TEXTS]
    for spec in (str(file), str(hf_dir)):
        tok = load_text_tokenizer(spec)
        assert (tok.eos_token, tok.vocab_size) == ("</s>", 300)
        assert _docs(corpus, tmp_path, tokenizer=spec) == want
    # an explicit data.eos_token wins over the tokenizer's own
    bpe.add_special_tokens(["<|end|>"])
    bpe.save(str(file))
    with pytest.raises(ValueError, match=r"special tokens: \['</s>', '<\|end\|>'\]\); set "
                       r"data.eos_token"):
        load_text_tokenizer(str(file))
    tok = load_text_tokenizer(str(file), "<|end|>")
    assert (tok.eos_token, tok.eos_id, tok.vocab_size) == ("<|end|>", 300, 301)


def test_build_datasets_with_hf_tokenizer_and_vocab_check(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=train_bpe(), eos_token="</s>").save_pretrained(
        hf_dir)
    cfg = DataConfig(corpus=str(write_jsonl(tmp_path / "c.jsonl", TEXTS * 4)),
                     tokenizer=str(hf_dir), cache_dir=str(tmp_path / "cache"), seq_length=16,
                     eval_fraction=0.25)
    ds = build_datasets(cfg, seed=0, progress=False)
    assert ds.vocab_size == 300 and ds.eot_id == 0
    assert ds.corpora[0].eval_documents == 6 and ds.corpora[0].train_documents == 18
    assert check_vocab_size(None, cfg) == 300 and check_vocab_size(512, cfg) == 512
    with pytest.raises(ValueError, match=r"model.vocab_size=100 is smaller than the tokenizer's "
                       r"vocabulary \(300 ids"):
        check_vocab_size(100, cfg)


def test_cache_reused_then_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    cache = tmp_path / "cache"
    first = _docs(str(corpus), tmp_path)
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(entries) == 1
    manifest = json.loads((cache / entries[0] / "manifest.json").read_text())
    assert (manifest["documents"], manifest["eos_token"]) == (len(TEXTS), "<|endoftext|>")
    # megatron-core's own reader sees the same documents (what GPTDataset would train on)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    mds = IndexedDataset(str(cache / entries[0] / "tokens"))
    assert [mds[i].tolist() for i in range(len(mds))] == first
    assert mds.document_indices.tolist() == list(range(len(TEXTS) + 1))

    calls = []
    real = indexed._build
    monkeypatch.setattr(indexed, "_build", lambda *a, **k: (calls.append(a[0]), real(*a, **k)))
    assert _docs(str(corpus), tmp_path) == first and calls == []  # reused, nothing rebuilt

    write_jsonl(corpus, TEXTS[:3] + ["a new last document"])  # edited corpus -> new entry
    assert _docs(str(corpus), tmp_path) == _expected(load_text_tokenizer(),
                                                     TEXTS[:3] + ["a new last document"])
    assert len(calls) == 1
    bpe = train_bpe()
    bpe.save(str(tmp_path / "tok.json"))  # another tokenizer -> another entry
    _docs(str(corpus), tmp_path, tokenizer=str(tmp_path / "tok.json"))
    assert len(calls) == 2
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3
    assert not list(cache.glob("*.tmp.*"))  # no half-written entry left behind


def test_megatron_preprocessed_dataset_is_read_as_is(tmp_path: Path) -> None:
    """Write the pair the way Megatron-LM's preprocess_data does (add_item per sentence,
    end_document per document, --append-eod on the last sentence) and read it back."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tok = load_text_tokenizer()
    prefix = str(tmp_path / "mydata_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    want = []
    for text in TEXTS:
        sentences = [s for s in text.split("\n")]
        ids = [tok.encode_batch([s])[0] for s in sentences]
        ids[-1] = ids[-1] + [tok.eos_id]
        for s in ids:
            builder.add_item(torch.tensor(s, dtype=torch.int64))
        builder.end_document()
        want.append([i for s in ids for i in s])
    builder.finalize(prefix + ".idx")
    for spec in (prefix, prefix + ".bin"):
        assert _docs(spec, tmp_path) == want
    cfg = DataConfig(corpus=prefix, cache_dir=str(tmp_path / "c"), seq_length=8,
                     eval_fraction=0.2)
    ds = build_datasets(cfg, seed=0, progress=False)
    stream = np.concatenate([ds.train.batch([i])["tokens"][0].numpy()
                             for i in range(len(ds.train))])
    order = ds.train.order.tolist()
    assert stream[: ds.train.num_real_tokens].tolist() == [t for i in order for t in want[i]]
    assert sorted(order + ds.eval.order.tolist()) == list(range(len(TEXTS)))  # whole documents
    # a token id beyond the tokenizer's vocabulary (data from another tokenizer) is refused
    small = tmp_path / "small.json"
    train_bpe().save(str(small))
    cfg = DataConfig(corpus=prefix, tokenizer=str(small), cache_dir=str(tmp_path / "c"),
                     eval_fraction=0.2)
    with pytest.raises(ValueError, match=r"token id \d+ >= the vocabulary \(300\)"):
        build_datasets(cfg, seed=0, progress=False).train.batch([0])


@pytest.mark.parametrize(
    "setup, kw, error, match",
    [
        pytest.param(None, {"corpus": "{tmp}/absent.jsonl"}, FileNotFoundError,
                     r"data.corpus='.*absent.jsonl' does not exist \(expected 'embedded', a "
                     r"\.txt/\.jsonl", id="missing-corpus"),
        pytest.param("c.csv", {"corpus": "{tmp}/c.csv"}, ValueError,
                     r"data.corpus='.*c.csv': unsupported file kind; expected one of \.txt, "
                     r"\.jsonl", id="unsupported-kind"),
        pytest.param("c.jsonl", {"corpus": "{tmp}/c.jsonl", "text_field": "content"},
                     ValueError, r"c.jsonl, line 1: no field data.text_field='content'; the "
                     r"object has \['id', 'text'\]", id="missing-field"),
        pytest.param("c.parquet", {"corpus": "{tmp}/c.parquet", "text_field": "content"},
                     ValueError, r"no column data.text_field='content'; its columns are "
                     r"\['text', 'n'\]", id="missing-column"),
        pytest.param("bad.jsonl", {"corpus": "{tmp}/bad.jsonl"}, ValueError,
                     r"bad.jsonl, line 2: not valid JSON", id="bad-json"),
        pytest.param("num.jsonl", {"corpus": "{tmp}/num.jsonl"}, ValueError,
                     r"num.jsonl, line 1: field 'text' is a int, expected a string",
                     id="not-a-string"),
        pytest.param("empty_dir", {"corpus": "{tmp}/empty_dir"}, ValueError,
                     r"is a directory with no \.txt/\.jsonl", id="empty-directory"),
        pytest.param("c.jsonl", {"corpus": "{tmp}/c.jsonl", "tokenizer": "{tmp}/nope"},
                     FileNotFoundError, r"data.tokenizer='.*nope' does not exist",
                     id="missing-tokenizer"),
        pytest.param("garbage.json", {"corpus": "{tmp}/c.jsonl",
                                      "tokenizer": "{tmp}/garbage.json"},
                     ValueError, r"garbage.json is not a valid tokenizer.json", id="bad-tokenizer"),
        pytest.param("empty_dir", {"corpus": "embedded", "tokenizer": "{tmp}/empty_dir"},
                     ValueError, r"data.tokenizer='.*empty_dir': not a Hugging Face tokenizer "
                     r"directory", id="tokenizer-directory-without-tokenizer"),
        pytest.param("c.jsonl", {"corpus": "{tmp}/c.jsonl", "eos_token": "</s>"}, ValueError,
                     r"data.eos_token='</s>' is not in the vocabulary of the shipped BPE",
                     id="unknown-eos"),
        pytest.param("one.jsonl", {"corpus": "{tmp}/one.jsonl"}, ValueError,
                     r"has 1 document; whole documents cannot be held out .* data.eval_corpus",
                     id="single-document"),
    ],
)
def test_bad_inputs(setup, kw: dict, error: type, match: str, tmp_path: Path) -> None:
    if setup == "c.jsonl":
        write_jsonl(tmp_path / "c.jsonl", TEXTS)
    elif setup == "c.parquet":
        write_parquet(tmp_path / "c.parquet", TEXTS)
    elif setup == "c.csv":
        (tmp_path / "c.csv").write_text("text\nhello\n")
    elif setup == "bad.jsonl":
        (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    elif setup == "num.jsonl":
        (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    elif setup == "empty_dir":
        (tmp_path / "empty_dir").mkdir()
    elif setup == "garbage.json":
        write_jsonl(tmp_path / "c.jsonl", TEXTS)
        (tmp_path / "garbage.json").write_text('{"not": "a tokenizer"}')
    elif setup == "one.jsonl":
        write_jsonl(tmp_path / "one.jsonl", TEXTS[:1])
    kw = {k: v.replace("{tmp}", str(tmp_path)) for k, v in kw.items()}
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), **kw)
    with pytest.raises(error, match=match):
        build_datasets(cfg, seed=0, progress=False)


def test_progress_bytes_add_up_to_the_corpus_size(tmp_path: Path) -> None:
    """The tokenising progress bar advances by on-disk bytes and ends exactly at the total."""
    from megatron_ext.data.sources import find_corpus

    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "a.jsonl", TEXTS * 100)  # > 256 lines: intermediate updates happen
    _gz(d / "b.jsonl.gz", TEXTS * 100)
    write_parquet(d / "c.parquet", TEXTS * 500)  # 3 batches of rows
    (d / "d.txt").write_text(TEXTS[0], encoding="utf-8")
    files = find_corpus(str(d), "text")
    steps: list[int] = []
    texts = list(files.documents(steps.append))
    assert len(texts) == 600 + 600 + 3000 + 1 and len(steps) > 4
    assert sum(steps) == files.total_bytes() == sum(f.stat().st_size for f in d.iterdir())
    cfg = DataConfig(corpus=str(d), cache_dir=str(tmp_path / "cache"), seq_length=32)
    assert len(build_datasets(cfg, seed=0, progress=True).train) > 0  # with the bar shown


def test_damaged_token_files_are_refused_by_name(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    _docs(str(corpus), tmp_path)
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    bin_path, idx_path = entry / "tokens.bin", entry / "tokens.idx"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-6])  # truncated .bin
    with pytest.raises(ValueError, match=r"tokens.bin has \d+ bytes but .*tokens.idx describes "
                       r"\d+ tokens of 2 bytes \(truncated or not a pair\)"):
        _docs(str(corpus), tmp_path)
    bin_path.write_bytes(data)
    idx_path.write_bytes(b"NOTANIDX" + idx_path.read_bytes()[8:])  # wrong header
    with pytest.raises(ValueError, match=r"tokens.idx is not a megatron-core indexed dataset"):
        _docs(str(corpus), tmp_path)
