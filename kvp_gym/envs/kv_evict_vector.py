"""The native vector env of KVEvict-v0: a whole batch of episodes as tensors.

``gym.make_vec("KVEvict-v0", num_envs=B, vectorization_mode="vector_entry_point", **kwargs)`` builds
it. Observations, rewards and infos of all B envs come from one ``KVEvictCore`` with B rows (one
gather per observation key, one sort per step), with no Python loop over envs.

Autoreset: Gymnasium's SAME_STEP mode (``metadata["autoreset_mode"]``). Every KVEvict episode is
one step, so every step returns terminated = True for all envs together with the observations of
the next episodes; ``info["final_info"]`` holds the finished episodes' results (cost_ratio, ...)
and ``info["final_obs"]`` their observations (a batched dict, not an object array).
The generic machinery is ``core.CoreVectorEnv``.
"""

from __future__ import annotations

from typing import Any

from kvp_gym.envs.core import CoreVectorEnv
from kvp_gym.envs.episodes import check_vector
from kvp_gym.envs.kv_evict import KVEvictCore


class KVEvictVectorEnv(CoreVectorEnv):
    """KVEvict-v0 as a native vector env of ``num_envs`` envs.

    ``group_size=G``: each run of G consecutive envs shares one episode (same observation; G
    actions scored on it: GRPO groups, leave-one-out baselines). ``as_torch``: torch in and out.
    Every other argument is KVEvictEnv's.
    """

    def __init__(self, num_envs: int = 1, traces: Any = None, *, group_size: int = 1, as_torch: bool = False,
                 **kwargs: Any) -> None:
        check_vector(num_envs, group_size, as_torch)
        super().__init__(KVEvictCore(traces, num_rows=num_envs, group_size=group_size, **kwargs), num_envs, as_torch)
