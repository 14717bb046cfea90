"""Traces: post-RoPE Q/K/V of a real model over real text, stored as safetensors + a JSON manifest."""

from kvp_gym.traces.dataset import Trace, TraceDataset, TraceError
from kvp_gym.data import SOURCES
from kvp_gym.traces.generate import generate_traces

__all__ = ["SOURCES", "Trace", "TraceDataset", "TraceError", "generate_traces"]
