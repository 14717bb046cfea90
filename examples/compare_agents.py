"""Sample-efficiency curves of several agents over seeds: a thin call of `kvp-gym compare`.

    python examples/compare_agents.py --traces TRAIN --eval-traces TEST --agents kvp,grpo,pairwise,ppo --seeds 3 --steps 300

Writes compare.png (IQM over seeds with 95% intervals of the held-out cost ratio, against env steps
and wall time), compare.md and compare.csv into --out. See agents/compare.py.
"""

import sys

from kvp_gym.cli import app  # mounts `compare` from the kvp_gym.commands entry point (agents/compare.py)

if __name__ == "__main__":
    app(["compare", *sys.argv[1:]], prog_name="compare_agents.py")
