"""Scale-out on Ray (the optional extra ``kvp-gym[ray]``): trace generation, importance stores, training sweeps
and the leaderboard's units on Ray workers, locally (``--workers N``) or on a cluster (``--address``).

Without Ray, or without ``--workers`` / ``--address``, every command runs serially as before. The
distributed paths compute the same units as the serial ones and the *driver* writes every manifest
and record (workers write only whole trace and store files, atomically), so the outputs are the serial path's.

- ``kvp_gym.scale.runtime``: ``ray_session(workers, address)`` (a local Ray with ``workers`` CPUs and one
  torch thread per worker, or a cluster), ``run_unordered`` (units on actors, results as they finish,
  Ctrl-C cancels cleanly), the test hook ``crash_once``.
- ``kvp_gym.scale.traces``: ``trace_on_workers`` and ``dialogues_on_workers`` (actors that load the model once).
- ``kvp_gym.scale.store``: ``statistics_on_workers`` (importance-store files, actors that open the trace set once).
- ``kvp_gym.scale.leaderboard``: ``compute_missing_units`` (ranking and downstream units).
- ``agents/sweep.py`` (``kvp-gym sweep``): training runs as Ray tasks.
"""

from kvp_gym.scale.runtime import RAY_MISSING, crash_once, ray_available, ray_session, run_unordered, wants_ray

__all__ = ["RAY_MISSING", "crash_once", "ray_available", "ray_session", "run_unordered", "wants_ray"]
