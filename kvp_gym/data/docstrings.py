"""Docs: contiguous windows of the docstrings of Python's standard library, English prose about APIs.

A second documentation source for training, 1.6 times the training text of ``prose`` (``pydoc_data.topics``).
Each module contributes its dotted name and its docstring, then the docstring of every public class,
function and method, under its qualified name, in source order. Docstrings shorter than
:data:`MIN_DOCSTRING_CHARS` (one-liners such as "Return self.") are left out.

The modules are every pure-Python module of the interpreter's standard library except the private
ones (a ``_`` name), tests, demos, bundled packages, ``encodings`` (boilerplate), and the :data:`CODE_FILES`
of the held-out ``code`` source: no text of that domain enters a training set through this one. The list
is read from ``sysconfig.get_paths()["stdlib"]``, so the corpus is fixed by the CPython version (the
project's is 3.11). Modules go to the train or test split by their path, like prose topics by title.
"""

from __future__ import annotations

import ast
import os
from functools import lru_cache
from typing import Any

from .common import JoinedCorpus, check_request, corpus_windows, join_corpus, keys_in_split, paragraph_starts
from .pycode import CODE_FILES, stdlib_dir
from .sample import TextSample

MIN_DOCSTRING_CHARS = 80
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "turtledemo", "site-packages", "ensurepip", "lib2to3",
                           "encodings", "__pycache__", "pydoc_data"})
_MODULE_SEPARATOR = "\n\n\n"


@lru_cache(maxsize=1)
def stdlib_modules() -> tuple[str, ...]:
    """Paths (relative to the stdlib directory, sorted) of the modules the docs source reads, both splits
    (the directory is walked once)."""
    root, paths = stdlib_dir(), []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories
                                   if name not in EXCLUDED_DIRS and not name.startswith(("_", "config-")))
        for name in files:
            if name.endswith(".py") and not name.startswith("_"):
                paths.append(os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/"))
    return tuple(sorted(path for path in paths if path not in CODE_FILES))


def docs_modules(split: str) -> list[str]:
    """The modules of a split (disjoint between train and test)."""
    return keys_in_split(stdlib_modules(), split)


def module_docstrings(source: str, module: str) -> str:
    """The module's name and docstring, then each public class's, function's and method's qualified name
    and docstring, in source order; docstrings under MIN_DOCSTRING_CHARS are left out ("" when none is left)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""  # a few stdlib files are templates or Python-2 examples, not modules
    entries: list[str] = []

    def visit(node: ast.AST, qualified: str) -> None:
        docstring = ast.get_docstring(node)
        if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
            entries.append(f"{qualified}\n\n{docstring}")
        for child in getattr(node, "body", []):
            definition = isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            if definition and not child.name.startswith("_"):
                visit(child, f"{qualified}.{child.name}")

    visit(tree, module)
    return "\n\n".join(entries)


@lru_cache(maxsize=None)
def docs_corpus(split: str) -> JoinedCorpus:
    """The split's docstrings, one module after another, named by path (modules without a long docstring are skipped)."""
    bodies = {}
    for path in docs_modules(split):
        with open(os.path.join(stdlib_dir(), *path.split("/")), encoding="utf-8") as handle:
            module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            body = module_docstrings(handle.read(), module)
        if body:
            bodies[path] = body
    return join_corpus(list(bodies), list(bodies.values()), _MODULE_SEPARATOR)


def make_docs(tokenizer: Any, n: int, split: str, seed: int, target_tokens: int) -> list[TextSample]:
    """`n` windows of about `target_tokens` tokens (never more), each starting at a seeded paragraph start."""
    check_request(n, split, target_tokens)
    corpus = docs_corpus(split)
    return corpus_windows(tokenizer, corpus.text, paragraph_starts(corpus.text), "docs", split, seed, n, target_tokens,
                          lambda start, stop: {"modules": corpus.names_between(start, stop)})
