"""Heuristic KV-cache eviction scorers, all implementing ``kvp_gym.scorers.Scorer``.

Each is a small dataclass with its published defaults (kvpress as the primary reference), a
``needs`` set naming the optional ScoringView inputs it reads, and ``score(view) -> [B, H, N]``
(higher = keep). They are registered under the ``kvp_gym.scorers`` entry points, so
``kvp_gym.scorers.get("snapkv", window_size=32)`` builds one by name.
"""

from baselines.expected_attention import ExpectedAttention
from baselines.h2o import H2O
from baselines.keydiff import KeyDiff
from baselines.knorm import KNorm
from baselines.lagkv import LagKV
from baselines.observed_attention import ObservedAttention
from baselines.oracle import Oracle
from baselines.random_scorer import RandomScorer
from baselines.snapkv import SnapKV
from baselines.streamingllm import StreamingLLM
from baselines.tova import TOVA

__all__ = ["ExpectedAttention", "H2O", "ObservedAttention", "KNorm", "KeyDiff", "LagKV", "Oracle", "RandomScorer", "SnapKV", "StreamingLLM", "TOVA"]
