"""Task generators: deterministic from the seed, answers checkable from the prompt text.

Each generated prompt is decoded and re-read with plain string parsing (an independent oracle):
the pass key sits at the requested depth of the garbage, the queried needle carries the reference
value, following the variable chain gives exactly the reference names, the common / frequent
words are the ones counted most often. Lengths are compared exactly with the token budget: a
sample must be within a few tokens of L (binary search moves whole filler units) and never over.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from megatron_ext.data.tokenizer import load_tokenizer
from megatron_ext.eval import frequency, needle, passkey, tracking
from megatron_ext.eval.samples import FILLER, LengthError
from megatron_ext.eval.tasks import generate_task, parse_tasks


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _text(tok, s) -> str:
    return tok.decode(list(s.prompt_ids))


@pytest.mark.parametrize("task", ["passkey", "niah", "vt", "cwe", "fwe"])
def test_same_seed_same_prompts_other_seed_others(tok, task):
    a = generate_task(task, tok, 512, seed=3, trials=2)
    b = generate_task(task, tok, 512, seed=3, trials=2)
    c = generate_task(task, tok, 512, seed=4, trials=2)
    assert [s.prompt_ids for s in a] == [s.prompt_ids for s in b]
    assert [s.references for s in a] != [s.references for s in c]


def test_sample_does_not_depend_on_other_depths(tok):
    one = passkey.generate(tok, 512, seed=0, trials=2, depths=[0.5])
    many = passkey.generate(tok, 512, seed=0, trials=2, depths=[0.0, 0.5, 1.0])
    assert [s.prompt_ids for s in one] == [s.prompt_ids for s in many if s.depth == 0.5]


@pytest.mark.parametrize("length", [300, 1024])
def test_passkey_prompt_key_depth_and_length(tok, length):
    samples = passkey.generate(tok, length, seed=1, trials=2, depths=[0.0, 0.5, 1.0])
    assert len(samples) == 6
    for s in samples:
        text = _text(tok, s)
        key = s.references[0]
        lines = text.split("\n")
        assert len(lines) == 5 and lines[-1] == "What is the pass key? The pass key is"
        assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
        n_garbage = len(lines[1]) + len(lines[3])
        assert n_garbage == s.meta["n_garbage"]
        assert len(lines[1]) == int(s.depth * n_garbage)
        assert FILLER.startswith(lines[1][:80]) and FILLER.startswith(lines[3][:80])
        assert tok.decode(list(s.answer_ids)) == f" {key}" and 1 <= int(key) <= 50000
        assert length - 4 <= s.num_tokens <= length


def test_needles_hold_the_reference_value(tok):
    samples = needle.generate(tok, 768, seed=2, trials=3, depths=[0.25, 0.75])
    assert {s.task for s in samples} == {"niah_single", "niah_multikey"}
    for s in samples:
        text = _text(tok, s)
        found = dict(re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", text))
        assert len(found) == needle.SUBTASKS[s.task]
        query = re.search(r"numbers for ([a-z]+-[a-z]+) mentioned", text).group(1)
        assert found[query] == s.references[0]
        assert tok.decode(list(s.answer_ids)) == f" {s.references[0]}"
        assert 768 - 40 <= s.num_tokens <= 768  # one noise unit is ~29 tokens
        # the queried needle sits at its depth of the haystack (in noise units)
        before = text.split(f"for {query} is:")[0]
        assert before.count(FILLER) == round(s.depth * s.meta["units"])


def test_variable_chain_resolves_to_the_references(tok):
    for s in tracking.generate(tok, 1024, seed=5, trials=3):
        text = _text(tok, s)
        value = int(re.search(r"assigned the value (\d+) in", text).group(1))
        direct = re.findall(r"VAR ([A-Z]{5}) = (\d+)\.", text)
        links = dict((b, a) for b, a in re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", text))
        holds = {name for name, v in direct if int(v) == value}
        changed = True
        while changed:
            new = {b for b, a in links.items() if a in holds} - holds
            holds |= new
            changed = bool(new)
        assert holds == set(s.references) and len(s.references) == 5
        assert 1024 - 40 <= s.num_tokens <= 1024


def test_cwe_references_are_the_most_common_words(tok):
    for s in frequency.generate_cwe(tok, 1024, seed=0, trials=2):
        words = re.findall(r"^\d+\. ([a-z]+)$", _text(tok, s), flags=re.M)
        counts = Counter(words).most_common()
        top = {w for w, _ in counts[:10]}
        assert top == set(s.references)
        assert counts[9][1] > counts[10][1]  # a strict gap: the answer is unambiguous
        assert 1024 - 12 <= s.num_tokens <= 1024


def test_fwe_references_are_the_three_most_frequent(tok):
    for s in frequency.generate_fwe(tok, 1024, seed=0, trials=2):
        body = _text(tok, s).split("\n")[2]
        counts = Counter(re.findall(r"\b[a-z]{5}\b", body)).most_common()
        assert [w for w, _ in counts[:3]] == list(s.references)
        assert counts[2][1] > counts[3][1]
        assert 1024 - 12 <= s.num_tokens <= 1024


def test_cwe_frequencies_follow_the_length():
    assert frequency.cwe_frequencies(4096) == (30, 3)
    assert frequency.cwe_frequencies(512) == (3, 1)
    assert frequency.cwe_frequencies(64) == (2, 1)


@pytest.mark.parametrize("task,length", [("passkey", 40), ("niah", 60), ("vt", 50),
                                         ("cwe", 40), ("fwe", 60)])
def test_too_short_length_is_refused(tok, task, length):
    with pytest.raises(LengthError, match=r"fixed text alone is \d+ tokens"):
        generate_task(task, tok, length, seed=0, trials=1)


def test_unknown_task_and_bad_arguments_are_refused(tok):
    with pytest.raises(ValueError, match=r"unknown task 'pass_key'; expected .*passkey"):
        parse_tasks("passkey,pass_key")
    assert parse_tasks("ppl,passkey,ppl") == ["ppl", "passkey"]
    with pytest.raises(ValueError, match="depth 1.5"):
        passkey.generate(tok, 512, seed=0, depths=[1.5])
    with pytest.raises(ValueError, match="sub-task 'niah_x'"):
        needle.generate(tok, 512, seed=0, subtasks=["niah_x"])
