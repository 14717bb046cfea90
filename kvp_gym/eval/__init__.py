"""Evaluation: the leaderboard (ranking quality on the env, downstream quality with the real model)."""
