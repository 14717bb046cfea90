"""The default trace set the envs use when given no ``traces``: made once from the embedded model.

It lives in $KVP_GYM_HOME/traces/default-<source>-<split> (one trace set per text source) and is
generated on first use with a progress bar (a few minutes on a CPU), then reused. An interrupted
generation resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvp_gym.paths import home_dir

DEFAULT_SOURCES = ("prose", "ruler")
TRACES_PER_SOURCE = 4
TRACE_LENGTH = 1024


def default_trace_dir(source: str, split: str = "train") -> Path:
    return home_dir() / "traces" / f"default-{source}-{split}"


def _complete(directory: Path) -> bool:
    manifest = directory / "manifest.json"
    return manifest.exists() and len(json.loads(manifest.read_text()).get("sequences", [])) >= TRACES_PER_SOURCE


def default_traces(split: str = "train", show_progress: bool = True) -> list[Path]:
    """Directories of the default trace sets (prose and RULER-style tasks, 4 x 1024 tokens each)."""
    directories = []
    for source in DEFAULT_SOURCES:
        directory = default_trace_dir(source, split)
        if not _complete(directory):
            from kvp_gym.traces import generate_traces

            print(f"kvp-gym: generating the default {source}/{split} traces once into {directory}")
            generate_traces(directory, source, n=TRACES_PER_SOURCE, length=TRACE_LENGTH, split=split,
                            show_progress=show_progress)
        directories.append(directory)
    return directories
