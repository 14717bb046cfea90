"""Tests of the `docs` training source: stdlib docstrings, split by module, never the `code` source's modules."""

from __future__ import annotations

import ast

import pytest

from kvp_gym.data import CODE_FILES, SOURCES, TRAINING_SOURCES, count_tokens, docs_modules, make_docs, make_samples
from kvp_gym.data.docstrings import MIN_DOCSTRING_CHARS, docs_corpus, module_docstrings, stdlib_modules
from kvp_gym.data.pycode import code_corpus, read_code_file


def test_registered_as_a_training_source():
    assert "docs" in SOURCES and "docs" in TRAINING_SOURCES
    from kvp_gym.eval.suite import SUITES

    assert not [name for name, suite in SUITES.items() if "docs" in suite.sources]  # the pinned suites are unchanged


def test_modules_exclude_the_code_source_and_split_disjoint():
    modules = stdlib_modules()
    assert list(modules) == sorted(set(modules)) and len(modules) > 200
    assert not set(modules) & set(CODE_FILES)
    for path in modules:
        assert path.endswith(".py") and not any(part.startswith("_") for part in path.split("/"))
        assert not any(bad in path.split("/") for bad in ("test", "tests", "idlelib", "encodings", "site-packages"))
    train, test = set(docs_modules("train")), set(docs_modules("test"))
    assert train and test and not train & test and train | test == set(modules)


def test_module_docstrings_by_hand():
    long = "x" * MIN_DOCSTRING_CHARS
    source = f'''
"""{long} module."""
class Public:
    """{long} class."""
    def method(self):
        """{long} method."""
    def _private(self):
        """{long} private."""
    def short(self):
        """Too short."""
def _hidden():
    """{long} hidden."""
async def fetch():
    """{long} coroutine."""
'''
    text = module_docstrings(source, "pkg.mod")
    assert text == "\n\n".join([f"pkg.mod\n\n{long} module.", f"pkg.mod.Public\n\n{long} class.",
                                f"pkg.mod.Public.method\n\n{long} method.", f"pkg.mod.fetch\n\n{long} coroutine."])
    assert module_docstrings("def broken(:\n", "x") == ""


def test_docs_windows(smol_tokenizer):
    target = 512
    samples = make_docs(smol_tokenizer, 4, "train", 0, target)
    assert samples == make_samples("docs", smol_tokenizer, 4, "train", 0, target)
    assert samples[0].text != make_docs(smol_tokenizer, 1, "train", 1, target)[0].text
    train, test = docs_corpus("train").text, docs_corpus("test").text
    code = code_corpus("train").text + code_corpus("test").text
    for sample in samples:
        assert (sample.source, sample.task, sample.split, sample.answer) == ("docs", "docs", "train", [])
        assert 0.95 * target <= count_tokens(smol_tokenizer, sample.text) <= target
        assert sample.text in train and sample.text not in test
        assert set(sample.meta["modules"]) <= set(docs_modules("train"))
    # windows start at a paragraph: a docstring's qualified name or a paragraph of one
    assert all(not sample.text[0].isspace() for sample in samples)
    # no code-source module's docstring is in the corpus
    for path in CODE_FILES[:5]:
        tree = ast.parse(read_code_file(path))
        docstring = ast.get_docstring(tree)
        if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
            assert docstring not in train + test and ast.get_docstring(tree, clean=False) in code


def test_target_beyond_corpus_raises(smol_tokenizer):
    with pytest.raises(ValueError, match="exceeds the test docs corpus"):
        make_docs(smol_tokenizer, 1, "test", 0, 10**7)
