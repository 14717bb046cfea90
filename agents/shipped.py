"""The policy that ships with kvp-gym: registry name ``kvp``, ready to use with no training.

    kvp-gym generate --policy kvp --budget 128 --prompt "..."
    EvictingCache(kvp_gym.scorers.get("kvp"), budget, config=model.config)

It is KVP's per-head network for SmolLM2-135M-Instruct reading keys, values, positions and the
attention statistics of the cache (``agents.kvp_scorer``, ``inputs="kv+attention"``), distilled from the
future-attention oracle (``agents.distill``); its checkpoint header records how it was trained.
"""

from __future__ import annotations

from pathlib import Path

from kvp_gym.checkpoint import load_scorer
from kvp_gym.scorers import Scorer

POLICY_FILE = Path(__file__).parent / "policies" / "kvp-smollm2-135m.safetensors"


def shipped_kvp() -> Scorer:
    """The shipped SmolLM2-135M policy (it has agents for that model's 30 x 3 KV heads only)."""
    return load_scorer(POLICY_FILE).eval()
