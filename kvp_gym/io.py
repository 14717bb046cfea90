"""Atomic file writes and the package versions every manifest and report records."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def package_versions() -> dict[str, str]:
    """Versions recorded in every manifest and report."""
    names = ("kvp-gym", "torch", "transformers", "safetensors", "numpy", "gymnasium")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``; never leaves a partial file.
    The file gets the permissions ``open`` would give it (mkstemp's are owner-only)."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temp_files(directory: Path) -> None:
    """Delete the temporary files ``write_atomic`` calls left in ``directory`` when the process was killed."""
    for path in directory.glob(f".*{TEMP_SUFFIX}"):
        path.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON with ``write_atomic``."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
