"""Code: contiguous windows of Python source from the interpreter's own standard library.

The out-of-domain source: held out of every training recipe, it checks whether a policy trained on
RULER, dialogue and documentation prose carries over to a kind of text it never saw.

The corpus is a fixed, sorted list of pure-Python stdlib modules (:data:`CODE_FILES`), read from
``sysconfig.get_paths()["stdlib"]``: no tests, no site-packages, no idlelib, no generated or
platform-specific files (``_sysconfigdata*``, ``sysconfig``, ``site``), nothing whose content depends
on the machine; every module exists in CPython 3.11 (and in 3.12 and 3.13), and a missing one is an
error naming it. Files go to the train or test split by their path (like prose topics by title), so
the splits share no file. Windows start at a top-level statement of a file (an import, a ``def``
or ``class`` with its decorators, an assignment, ...) and run across file boundaries like prose does.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from functools import lru_cache
from typing import Any, NamedTuple

from .common import JoinedCorpus, check_request, corpus_windows, join_corpus, keys_in_split
from .sample import TextSample

# Paths relative to the stdlib directory, sorted. Changing this list changes every code sample.
CODE_FILES: tuple[str, ...] = (
    "argparse.py",
    "ast.py",
    "asyncio/locks.py",
    "asyncio/queues.py",
    "asyncio/tasks.py",
    "base64.py",
    "bdb.py",
    "bisect.py",
    "calendar.py",
    "cmd.py",
    "code.py",
    "codeop.py",
    "collections/__init__.py",
    "colorsys.py",
    "concurrent/futures/_base.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fileinput.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "gettext.py",
    "glob.py",
    "graphlib.py",
    "heapq.py",
    "hmac.py",
    "html/parser.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "numbers.py",
    "operator.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "reprlib.py",
    "sched.py",
    "selectors.py",
    "shlex.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "timeit.py",
    "tokenize.py",
    "tomllib/_parser.py",
    "trace.py",
    "traceback.py",
    "types.py",
    "typing.py",
    "uuid.py",
    "warnings.py",
    "wave.py",
    "weakref.py",
    "zipfile.py",
)

_FILE_SEPARATOR = "\n\n\n"  # two blank lines, as between top-level definitions


class CodeCorpus(NamedTuple):
    """The files of one split joined in path order, the char offset where each file starts, and the
    char offsets of every top-level statement (window start candidates)."""

    text: str
    files: tuple[str, ...]
    starts: tuple[int, ...]
    statement_starts: tuple[int, ...]

    def files_between(self, start: int, stop: int) -> list[str]:
        """Paths of the files overlapping text[start:stop]."""
        return JoinedCorpus(self.text, self.files, self.starts).names_between(start, stop)


def stdlib_dir() -> str:
    """The directory of the running interpreter's pure-Python standard library."""
    return sysconfig.get_paths()["stdlib"]


def code_files(split: str) -> list[str]:
    """The :data:`CODE_FILES` of a split (disjoint between train and test)."""
    return keys_in_split(CODE_FILES, split)


def read_code_file(path: str) -> str:
    """The source of one stdlib module (leading and trailing blank space stripped); a clear error if absent."""
    full = os.path.join(stdlib_dir(), *path.split("/"))
    if not os.path.isfile(full):
        raise FileNotFoundError(
            f"the code source needs the standard-library module {path!r}, which Python "
            f"{sys.version.split()[0]} does not have at {full} (the file list is fixed for CPython 3.11+)"
        )
    with open(full, encoding="utf-8") as handle:
        return handle.read().strip()


def _top_level_starts(source: str, path: str) -> list[int]:
    """Char offsets in `source` of its top-level statements (decorators included)."""
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as error:
        raise ValueError(f"the standard-library module {path!r} is not valid Python: {error}") from None
    line_starts = [0]
    for index, char in enumerate(source):
        if char == "\n":
            line_starts.append(index + 1)
    starts = []
    for node in tree.body:
        decorators = getattr(node, "decorator_list", None) or []
        line = min([node.lineno, *(d.lineno for d in decorators)])
        starts.append(line_starts[line - 1])
    return starts


@lru_cache(maxsize=None)
def code_corpus(split: str) -> CodeCorpus:
    """The split's source code, one file after another."""
    files = code_files(split)
    bodies = [read_code_file(path) for path in files]
    joined = join_corpus(files, bodies, _FILE_SEPARATOR)
    statements = [start + offset for start, body, path in zip(joined.starts, bodies, files)
                  for offset in _top_level_starts(body, path)]
    return CodeCorpus(joined.text, joined.names, joined.starts, tuple(statements))


def make_code(tokenizer: Any, n: int, split: str, seed: int, target_tokens: int) -> list[TextSample]:
    """`n` windows of about `target_tokens` tokens (never more), each starting at a seeded top-level statement."""
    check_request(n, split, target_tokens)
    corpus = code_corpus(split)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return corpus_windows(tokenizer, corpus.text, corpus.statement_starts, "code", split, seed, n, target_tokens,
                          lambda start, stop: {"files": corpus.files_between(start, stop), "python": python})
