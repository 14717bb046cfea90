"""tests/kill_at_write.py for `kvp-gym leaderboard` on a tiny suite: the suite's fields come as JSON in
$KVP_TEST_SUITE and are registered under their name before the command runs.

Usage: KVP_TEST_SUITE='{"name": "tiny", ...}' python tests/kill_leaderboard.py K OUT leaderboard --suite tiny ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kvp_gym.eval.suite import SUITES, Suite

sys.path.insert(0, str(Path(__file__).parent))
import kill_at_write  # noqa: E402

fields = {key: tuple(value) if isinstance(value, list) else value for key, value in json.loads(os.environ["KVP_TEST_SUITE"]).items()}
SUITES[fields["name"]] = Suite(**fields)

if __name__ == "__main__":
    kill_at_write.main()
