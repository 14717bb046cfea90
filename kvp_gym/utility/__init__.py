"""Utility: the future attention each cached token receives, and the golden eviction schedule."""

from kvp_gym.utility.golden import GoldenSchedule, block_future_scores, golden_eviction_schedule, num_stream_steps
from kvp_gym.utility.importance import (
    AGGREGATIONS,
    attention_probs,
    attention_received,
    future_importance,
    importance_from_table,
    importance_rows,
    importance_table,
    received_rows,
)

__all__ = [
    "AGGREGATIONS",
    "GoldenSchedule",
    "attention_probs",
    "attention_received",
    "block_future_scores",
    "future_importance",
    "golden_eviction_schedule",
    "importance_from_table",
    "importance_rows",
    "importance_table",
    "num_stream_steps",
    "received_rows",
]
