"""Tests of the out-of-domain `code` source: stdlib Python windows, split by file, like prose."""

from __future__ import annotations

import ast

import pytest

from kvp_gym.data import CODE_FILES, SOURCES, TRAINING_SOURCES, code_files, count_tokens, make_code, make_samples
from kvp_gym.data import pycode
from kvp_gym.data.pycode import code_corpus


def test_registered_as_a_held_out_source():
    assert "code" in SOURCES and "code" not in TRAINING_SOURCES
    assert set(TRAINING_SOURCES) < set(SOURCES)
    from kvp_gym.eval.suite import SUITES

    # only the out-of-domain suites read it, as a perplexity source
    readers = sorted(name for name, suite in SUITES.items() if "code" in suite.sources)
    assert readers == ["headline", "long", "unseen"]
    assert all("code" in SUITES[name].ppl_sources for name in readers)


def test_file_list_is_fixed_clean_and_split_disjoint():
    assert list(CODE_FILES) == sorted(set(CODE_FILES))
    for path in CODE_FILES:
        assert path.endswith(".py")
        assert not any(bad in path for bad in ("test", "site-packages", "idlelib", "sysconfig"))
    train, test = set(code_files("train")), set(code_files("test"))
    assert train and test and not train & test
    assert train | test == set(CODE_FILES)
    assert len(test) < len(train)
    assert code_corpus("train").files == tuple(code_files("train"))


def test_corpus_is_python_source_with_statement_starts():
    for split in ("train", "test"):
        corpus = code_corpus(split)
        assert corpus.statement_starts and list(corpus.statement_starts) == sorted(corpus.statement_starts)
        for start, path in zip(corpus.starts, corpus.files):
            assert corpus.text[start:].startswith(pycode.read_code_file(path)[:200])
        assert "\ndef " in corpus.text and "\nclass " in corpus.text
        for path in corpus.files:
            ast.parse(pycode.read_code_file(path))  # every file is valid Python
    train_text = code_corpus("train").text
    for path in code_files("test"):
        assert pycode.read_code_file(path) not in train_text


def test_missing_file_fails_clearly(monkeypatch):
    monkeypatch.setattr(pycode, "CODE_FILES", ("no_such_module_xyz.py",))
    monkeypatch.setattr(pycode, "keys_in_split", lambda keys, split: list(keys))
    pycode.code_corpus.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="no_such_module_xyz.py"):
            pycode.code_corpus("test")
    finally:
        pycode.code_corpus.cache_clear()


def test_code_windows(smol_tokenizer):
    target = 512
    samples = make_code(smol_tokenizer, 4, "test", 0, target)
    assert samples == make_code(smol_tokenizer, 4, "test", 0, target)
    assert samples == make_samples("code", smol_tokenizer, 4, "test", 0, target)
    assert samples[0].text != make_code(smol_tokenizer, 1, "test", 1, target)[0].text
    test_corpus, train_corpus = code_corpus("test").text, code_corpus("train").text
    for sample in samples:
        assert (sample.source, sample.task, sample.split, sample.answer) == ("code", "code", "test", [])
        assert sample.answer_start == sample.question_start == len(sample.text)
        n_tokens = count_tokens(smol_tokenizer, sample.text)
        assert 0.95 * target <= n_tokens <= target and sample.meta["n_tokens"] == n_tokens
        assert sample.text in test_corpus and sample.text not in train_corpus
        assert set(sample.meta["files"]) <= set(code_files("test"))
        # a window starts at a top-level statement: its first line is unindented Python
        first_line = sample.text.splitlines()[0]
        assert first_line and not first_line[0].isspace()
        assert any(word in sample.text for word in ("def ", "class ", "import ", "return"))
        # up to its last top-level statement start (within its first file) the window parses as Python
        corpus = code_corpus("test")
        start, stop = sample.meta["char_start"], sample.meta["char_start"] + len(sample.text)
        next_file = min([s for s in corpus.starts if s > start] + [stop])
        cut = max(s for s in corpus.statement_starts if start <= s <= next_file)
        if cut > start:
            ast.parse(sample.text[: cut - start])


def test_train_windows_differ_from_test(smol_tokenizer):
    (train,) = make_code(smol_tokenizer, 1, "train", 0, 256)
    assert train.text in code_corpus("train").text and train.split == "train"
    assert count_tokens(smol_tokenizer, train.text) <= 256
    assert set(train.meta["files"]) <= set(code_files("train"))


def test_target_beyond_corpus_raises(smol_tokenizer):
    with pytest.raises(ValueError, match="exceeds the test code corpus"):
        make_code(smol_tokenizer, 1, "test", 0, 10**7)
