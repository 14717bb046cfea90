"""Export: the inference cache. ``EvictingCache`` evicts for real inside ``model.generate`` with any Scorer."""

from kvp_gym.cache.attention import ATTN_IMPLEMENTATION
from kvp_gym.cache.evicting_cache import CacheReport, EvictingCache
from kvp_gym.cache.head_shares import HeadShares

__all__ = ["ATTN_IMPLEMENTATION", "CacheReport", "EvictingCache", "HeadShares"]
