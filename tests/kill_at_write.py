"""Fault injection for the tests: run `kvp-gym ARGS...` and SIGKILL the process just before its K-th
atomic rename into OUT (the temporary file is fully written, the rename not done).

Usage: python tests/kill_at_write.py K OUT ARGS...
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from kvp_gym.cli import app


def main() -> None:
    kill_at, out, args = int(sys.argv[1]), Path(sys.argv[2]).resolve(), sys.argv[3:]
    real_replace = os.replace
    renames = 0

    def replace_or_die(src: str, dst: str) -> None:
        nonlocal renames
        if Path(dst).resolve().parent == out:
            renames += 1
            if renames == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace_or_die
    app(args, prog_name="kvp-gym")


if __name__ == "__main__":
    main()
