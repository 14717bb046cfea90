"""Prose: contiguous windows of the English documentation that ships with Python (`pydoc_data.topics`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

from pydoc_data.topics import topics as _PYDOC_TOPICS

from .common import check_request, corpus_windows, join_parts, keys_in_split, paragraph_starts, parts_between
from .sample import TextSample

_TOPIC_SEPARATOR = "\n\n"


class ProseCorpus(NamedTuple):
    """The topics of one split joined in key order, with the char offset where each topic starts."""

    text: str
    keys: tuple[str, ...]
    starts: tuple[int, ...]

    def topics_between(self, start: int, stop: int) -> list[str]:
        """Keys of the topics overlapping text[start:stop]."""
        return parts_between(self.keys, self.starts, start, stop)


def prose_topics(split: str) -> list[str]:
    """The `pydoc_data.topics` keys of a split (disjoint between train and test)."""
    return keys_in_split(sorted(_PYDOC_TOPICS), split)


@lru_cache(maxsize=None)
def prose_corpus(split: str) -> ProseCorpus:
    """The split's documentation text, one topic after another."""
    keys = tuple(prose_topics(split))
    text, starts = join_parts([_PYDOC_TOPICS[key].strip() for key in keys], _TOPIC_SEPARATOR)
    return ProseCorpus(text, keys, starts)


def make_prose(tokenizer: Any, n: int, split: str, seed: int, target_tokens: int) -> list[TextSample]:
    """`n` windows of about `target_tokens` tokens (never more), each starting at a seeded paragraph start."""
    check_request(n, split, target_tokens)
    corpus = prose_corpus(split)
    return corpus_windows(tokenizer, corpus.text, paragraph_starts(corpus.text), "prose", split, seed, n, target_tokens,
                          lambda start, stop: {"topics": corpus.topics_between(start, stop)})
