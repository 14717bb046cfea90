"""Prose: contiguous windows of the English documentation that ships with Python (`pydoc_data.topics`)."""

from __future__ import annotations

import bisect
import re
from functools import lru_cache
from typing import Any, NamedTuple

from pydoc_data.topics import topics as _PYDOC_TOPICS

from .common import check_request, count_tokens, keys_in_split, sample_rng, truncate_to_tokens
from .sample import TextSample

_TOPIC_SEPARATOR = "\n\n"
_PARAGRAPH_BREAK = re.compile(r"\n\n+")


class ProseCorpus(NamedTuple):
    """The topics of one split joined in key order, with the char offset where each topic starts."""

    text: str
    keys: tuple[str, ...]
    starts: tuple[int, ...]

    def topics_between(self, start: int, stop: int) -> list[str]:
        """Keys of the topics overlapping text[start:stop]."""
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_left(self.starts, stop)
        return list(self.keys[first:last])


def prose_topics(split: str) -> list[str]:
    """The `pydoc_data.topics` keys of a split (disjoint between train and test)."""
    return keys_in_split(sorted(_PYDOC_TOPICS), split)


@lru_cache(maxsize=None)
def prose_corpus(split: str) -> ProseCorpus:
    """The split's documentation text, one topic after another."""
    keys = tuple(prose_topics(split))
    parts, starts, position = [], [], 0
    for key in keys:
        body = _PYDOC_TOPICS[key].strip()
        starts.append(position)
        parts.append(body)
        position += len(body) + len(_TOPIC_SEPARATOR)
    return ProseCorpus(_TOPIC_SEPARATOR.join(parts), keys, tuple(starts))


def make_prose(tokenizer: Any, n: int, split: str, seed: int, target_tokens: int) -> list[TextSample]:
    """`n` windows of about `target_tokens` tokens (never more), each starting at a seeded paragraph start."""
    check_request(n, split, target_tokens)
    corpus = prose_corpus(split)
    enc = tokenizer(corpus.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if target_tokens > len(offsets):
        raise ValueError(
            f"target_tokens={target_tokens} exceeds the {split} prose corpus ({len(offsets)} tokens)"
        )
    starts = _paragraph_token_starts(corpus.text, offsets, target_tokens)
    samples = []
    for index in range(n):
        first = sample_rng("prose", split, seed, index).choice(starts)
        char_start = offsets[first][0]
        char_stop = offsets[first + target_tokens - 1][1]
        text = truncate_to_tokens(tokenizer, corpus.text[char_start:char_stop], target_tokens)
        meta = {
            "seed": seed,
            "index": index,
            "target_tokens": target_tokens,
            "n_tokens": count_tokens(tokenizer, text),
            "char_start": char_start,
            "topics": corpus.topics_between(char_start, char_start + len(text)),
        }
        samples.append(
            TextSample(text, "prose", "prose", split, [], len(text), len(text), meta)
        )
    return samples


def _paragraph_token_starts(text: str, offsets: list[tuple[int, int]], length: int) -> list[int]:
    """Token indices that begin a paragraph and leave room for `length` tokens (token 0 at least)."""
    token_starts = [start for start, _ in offsets]
    paragraph_chars = [0] + [match.end() for match in _PARAGRAPH_BREAK.finditer(text)]
    candidates = sorted({bisect.bisect_left(token_starts, char) for char in paragraph_chars})
    fitting = [token for token in candidates if token + length <= len(offsets)]
    return fitting or [0]
