"""Learned eviction policies for kvp-gym.

- ``agents.mlp_scorer.PerHeadMLPScorer``: the scorer every agent trains (registry name ``"mlp"``), one
  small MLP per (layer, KV head) over (key, value, position), batched as one einsum.
- Algorithms, one readable file each: ``agents.kvp`` (KVP: Plackett-Luce REINFORCE with a
  leave-one-out baseline), ``agents.grpo`` (GRPO on the one-step and the streaming env),
  ``agents.pairwise`` (ForesightKV's supervised pairwise hinge), ``agents.sb3_agents`` (PPO, A2C,
  TRPO, ARS, RecurrentPPO through Stable-Baselines3 / sb3-contrib).
- ``agents.train.train(TrainConfig(...))`` and the ``kvp-gym train`` command (``agents.cli``): progress
  bar, TensorBoard, periodic evaluation, resumable checkpoints; the result is a scorer checkpoint
  (``kvp_gym.checkpoint.save_scorer`` / ``load_scorer``).

kvp_gym never imports this package: it reaches the scorer through the ``kvp_gym.scorers`` entry point.
"""
