"""Where kvp-gym keeps its files: $KVP_GYM_HOME (default ~/.cache/kvp_gym)."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    """The user's kvp-gym cache directory (converted models, default trace sets, checkpoints)."""
    return Path(os.environ.get("KVP_GYM_HOME", Path.home() / ".cache" / "kvp_gym")).expanduser()
