"""Prose: contiguous windows of the English documentation that ships with Python (`pydoc_data.topics`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydoc_data.topics import topics as _PYDOC_TOPICS

from .common import JoinedCorpus, check_request, corpus_windows, join_corpus, keys_in_split, paragraph_starts
from .sample import TextSample

_TOPIC_SEPARATOR = "\n\n"


def prose_topics(split: str) -> list[str]:
    """The `pydoc_data.topics` keys of a split (disjoint between train and test)."""
    return keys_in_split(sorted(_PYDOC_TOPICS), split)


@lru_cache(maxsize=None)
def prose_corpus(split: str) -> JoinedCorpus:
    """The split's documentation text, one topic after another (named by its key)."""
    keys = prose_topics(split)
    return join_corpus(keys, [_PYDOC_TOPICS[key].strip() for key in keys], _TOPIC_SEPARATOR)


def make_prose(tokenizer: Any, n: int, split: str, seed: int, target_tokens: int) -> list[TextSample]:
    """`n` windows of about `target_tokens` tokens (never more), each starting at a seeded paragraph start."""
    check_request(n, split, target_tokens)
    corpus = prose_corpus(split)
    return corpus_windows(tokenizer, corpus.text, paragraph_starts(corpus.text), "prose", split, seed, n, target_tokens,
                          lambda start, stop: {"topics": corpus.names_between(start, stop)})
