"""Stable-Baselines3 / sb3-contrib algorithms with the per-head scorer as the actor.

PPO and A2C (SB3) and TRPO (sb3-contrib) train on KVEvict-v0, RecurrentPPO (sb3-contrib) on
KVEvictStream-v0, and ARS (sb3-contrib) on KVEvict-v0, all through the SB3 VecEnv adapter
(``kvp_gym.envs.sb3.SB3VecEnv``). What is and isn't the same scorer:

- actor (every algorithm): the scores are ``PerHeadMLPScorer`` outputs, exactly the module that is
  saved and used by the envs and the cache. PPO / A2C / TRPO / RecurrentPPO explore with a diagonal
  Gaussian over the N scores, mean = the scorer's scores, one learned log-std (``MaskedDiagGaussian``).
  Padded and protected entries get a fixed N(0, 1) that depends on no parameter and is left out of
  the log-probability and the entropy, so they add no noise to the gradient, the ratios or TRPO's KL.
- critic (PPO / A2C / TRPO): a small pooled network, ``TokenSummary`` (LayerNorm + Linear + tanh on
  each ranked entry's (k, v, position features), masked mean over entries, plus an embedding of the
  (layer, KV head)) followed by a 2-layer MLP. It is trained but not saved with the scorer.
- RecurrentPPO: the same per-token actor, which is not recurrent; the critic runs sb3-contrib's LSTM
  over the ``TokenSummary`` of each step. sb3-contrib always builds an actor LSTM too (its rollout
  buffer reads the state shapes from it): here that LSTM is frozen and unused, its states pass through.
- ARS: sb3-contrib perturbs ``policy.parameters()``; ``ScorerARSPolicy`` holds only the scorer, so the
  random search runs over the scorer's weights (the trained heads' slots only) and the action is the
  scores themselves (ARS has no action noise). ``zero_policy=False``: a 2-layer MLP at zero weights has
  no first-order response to perturbations, so the search starts from the scorer's initialisation.

The envs declare every finite float32 as a valid score (``kvp_gym.envs.core.score_space``), so SB3's
clipping of sampled actions to the declared bounds changes no score.

One ``update()`` = one SB3 iteration (collect a rollout, then train on it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib import ARS, TRPO, RecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import set_random_seed
from torch import nn

from agents.mlp_scorer import POSITION_FEATURES, PerHeadMLPScorer, position_features
from kvp_gym.envs.adapters import obs_to_view, ranked_entries
from kvp_gym.envs.sb3 import SB3VecEnv, env_names
from kvp_gym.models.spec import ModelSpec
from kvp_gym.scorers import ScoringView, score_one_head

ALGORITHMS = ("ppo", "a2c", "trpo", "ars", "recurrent-ppo")


# ----------------------------------------------------------------------------- observations


def view_and_ranked(obs: dict[str, torch.Tensor], spec: ModelSpec, scorer: PerHeadMLPScorer) -> tuple[ScoringView, torch.Tensor]:
    """SB3 observations (adapter names, float32 in rollout buffers) -> (ScoringView with H = 1, ranked [B, N]).

    Rows that are all padding (RecurrentPPO pads its sequences with zeros) are pointed at the
    scorer's first head, so that a scorer trained for a subset of heads can score them; they have no
    ranked entry and so no influence on any loss.
    """
    view = obs_to_view(env_names(obs), spec)
    empty = ~view.mask.any(dim=-1)
    if empty.any():
        layer, head = scorer.heads[0]
        view.layer = view.layer.masked_fill(empty, layer)
        view.kv_heads = view.kv_heads.masked_fill(empty[:, None], head)
    return view, ranked_entries(obs)


class TokenSummary(BaseFeaturesExtractor):
    """The critic's input: [B, hidden] = masked mean over ranked entries of tanh(W LayerNorm(x_i)) + head embedding.

    x_i = (k_i, v_i, position features) as the scorer sees them, before its per-head standardisation.
    """

    def __init__(self, observation_space: spaces.Dict, spec: ModelSpec, hidden: int = 64) -> None:
        super().__init__(observation_space, features_dim=hidden)
        self.spec = spec
        width = 2 * spec.head_dim + POSITION_FEATURES
        self.embed = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.Tanh())
        self.head_embedding = nn.Embedding(spec.num_layers * spec.num_kv_heads, hidden)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        obs = env_names(obs)
        mask = obs["mask"].bool()
        ranked = ranked_entries(obs).float()
        x = torch.cat([obs["keys"], obs["values"], position_features(obs["positions"].long(), mask)], dim=-1)
        pooled = (self.embed(x) * ranked[..., None]).sum(1) / ranked.sum(1, keepdim=True).clamp_min(1.0)
        head = obs["layer"].long().reshape(-1) * self.spec.num_kv_heads + obs["kv_head"].long().reshape(-1)
        return pooled + self.head_embedding(head)


class MaskedDiagGaussian(DiagGaussianDistribution):
    """N(mean_i, exp(log_std)) on the ranked entries; a fixed N(0, 1) elsewhere, outside log_prob and entropy."""

    def proba_distribution(self, mean_actions: torch.Tensor, log_std: torch.Tensor, ranked: torch.Tensor) -> MaskedDiagGaussian:
        self.ranked = ranked
        mean = torch.where(ranked, mean_actions, torch.zeros_like(mean_actions))
        std = torch.where(ranked, log_std.exp().expand_as(mean), torch.ones_like(mean))
        self.distribution = torch.distributions.Normal(mean, std)
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """[B]: sum over the ranked entries."""
        return torch.where(self.ranked, self.distribution.log_prob(actions), 0.0).sum(dim=-1)

    def entropy(self) -> torch.Tensor:
        """[B]: sum over the ranked entries."""
        return torch.where(self.ranked, self.distribution.entropy(), 0.0).sum(dim=-1)


# ----------------------------------------------------------------------------- policies


class ScorerActor:
    """What the PPO-family policies share: the per-head scorer as the mean of a ``MaskedDiagGaussian``
    over the N scores, one learned log-std, and a ``TokenSummary`` features extractor for the critic.
    Mixed in before an SB3 actor-critic policy class, which calls ``_build`` from its constructor."""

    def __init__(
        self, observation_space: spaces.Dict, action_space: spaces.Box, lr_schedule: Any, *,
        scorer_config: dict[str, Any], spec: ModelSpec, critic_hidden: int = 64, **kwargs: Any,
    ) -> None:
        self.scorer_config, self.spec, self.critic_hidden = scorer_config, spec, critic_hidden
        kwargs.setdefault("features_extractor_class", TokenSummary)
        kwargs.setdefault("features_extractor_kwargs", {"spec": spec, "hidden": critic_hidden})
        super().__init__(observation_space, action_space, lr_schedule, ortho_init=False, **kwargs)

    def _value_head(self) -> nn.Module:
        raise NotImplementedError

    def _build(self, lr_schedule: Any) -> None:
        self.scorer = PerHeadMLPScorer(**self.scorer_config)
        self.log_std = nn.Parameter(torch.tensor(float(self.log_std_init)))
        self.value_net = self._value_head()
        self.action_dist = MaskedDiagGaussian(self.action_space.shape[0])
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _distribution(self, obs: dict[str, torch.Tensor]) -> MaskedDiagGaussian:
        view, ranked = view_and_ranked(obs, self.spec, self.scorer)
        return self.action_dist.proba_distribution(score_one_head(self.scorer, view), self.log_std, ranked)


class ScorerActorCriticPolicy(ScorerActor, ActorCriticPolicy):
    """PPO / A2C / TRPO policy: the per-head scorer as the Gaussian mean, a pooled critic (see the module docstring)."""

    def _value_head(self) -> nn.Module:
        hidden = self.critic_hidden
        return nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, obs: dict[str, torch.Tensor], deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        distribution = self._distribution(obs)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, self.predict_values(obs), distribution.log_prob(actions)

    def evaluate_actions(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        distribution = self._distribution(obs)
        return self.predict_values(obs), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: dict[str, torch.Tensor]) -> MaskedDiagGaussian:
        return self._distribution(obs)

    def predict_values(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.value_net(self.features_extractor(obs))

    def _predict(self, observation: dict[str, torch.Tensor], deterministic: bool = False) -> torch.Tensor:
        return self._distribution(observation).get_actions(deterministic=deterministic)


class ScorerRecurrentPolicy(ScorerActor, RecurrentActorCriticPolicy):
    """RecurrentPPO policy: the (non-recurrent) per-head scorer as actor, an LSTM over ``TokenSummary`` as critic."""

    def __init__(self, *args: Any, critic_hidden: int = 64, **kwargs: Any) -> None:
        kwargs.setdefault("lstm_hidden_size", critic_hidden)
        super().__init__(*args, critic_hidden=critic_hidden, **kwargs)
        self.lstm_actor.requires_grad_(False)  # built by sb3-contrib for the state shapes; unused

    def _value_head(self) -> nn.Module:
        return nn.Linear(self.lstm_output_dim, 1)

    def _values(self, obs: dict[str, torch.Tensor], states: tuple[torch.Tensor, torch.Tensor],
                episode_starts: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        latent, states = self._process_sequence(self.features_extractor(obs), states, episode_starts, self.lstm_critic)
        return self.value_net(latent), states

    def forward(self, obs: dict[str, torch.Tensor], lstm_states: RNNStates, episode_starts: torch.Tensor,
                deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RNNStates]:
        values, critic_states = self._values(obs, lstm_states.vf, episode_starts)
        distribution = self._distribution(obs)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, values, distribution.log_prob(actions), RNNStates(lstm_states.pi, critic_states)

    def get_distribution(self, obs: dict[str, torch.Tensor], lstm_states: tuple[torch.Tensor, torch.Tensor],
                         episode_starts: torch.Tensor) -> tuple[MaskedDiagGaussian, tuple[torch.Tensor, torch.Tensor]]:
        return self._distribution(obs), lstm_states

    def predict_values(self, obs: dict[str, torch.Tensor], lstm_states: tuple[torch.Tensor, torch.Tensor],
                       episode_starts: torch.Tensor) -> torch.Tensor:
        return self._values(obs, lstm_states, episode_starts)[0]

    def evaluate_actions(self, obs: dict[str, torch.Tensor], actions: torch.Tensor, lstm_states: RNNStates,
                         episode_starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values, _ = self._values(obs, lstm_states.vf, episode_starts)
        distribution = self._distribution(obs)
        return values, distribution.log_prob(actions), distribution.entropy()

    def _predict(self, observation: dict[str, torch.Tensor], lstm_states: tuple[torch.Tensor, torch.Tensor],
                 episode_starts: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return self._distribution(observation).get_actions(deterministic=deterministic), lstm_states


class ScorerARSPolicy(BasePolicy):
    """ARS policy: the action is the scorer's scores; ``parameters()`` are the scorer's weights only."""

    def __init__(self, observation_space: spaces.Dict, action_space: spaces.Box, *,
                 scorer_config: dict[str, Any], spec: ModelSpec) -> None:
        super().__init__(observation_space, action_space)
        self.scorer_config, self.spec = scorer_config, spec
        self.scorer = PerHeadMLPScorer(**scorer_config)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {"observation_space": self.observation_space, "action_space": self.action_space,
                "scorer_config": self.scorer_config, "spec": self.spec}

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        view, _ = view_and_ranked(obs, self.spec, self.scorer)
        return score_one_head(self.scorer, view)

    def _predict(self, observation: dict[str, torch.Tensor], deterministic: bool = True) -> torch.Tensor:
        return self(observation)


# ----------------------------------------------------------------------------- SB3's private state
# SB3 offers no public way to restart the rollout from new observations (``learn(reset_num_timesteps=True)``
# also zeroes the step counter and the episode statistics) nor to restore the update counter of a
# resumed run. These two functions are the only places that write its private fields.


def restart_rollouts(model: Any, obs: Any) -> None:
    """Make the next rollout start from ``obs`` with fresh episodes (and zero LSTM states for RecurrentPPO)."""
    model._last_obs = obs
    model._last_episode_starts = np.ones(model.env.num_envs, dtype=bool)
    if isinstance(model, RecurrentPPO):
        model._last_lstm_states = RNNStates(*(
            tuple(torch.zeros_like(tensor) for tensor in pair) for pair in model._last_lstm_states
        ))


def restore_update_count(model: Any, n_updates: int) -> None:
    """The update counter SB3 logs as train/n_updates, as saved by a checkpoint."""
    model._n_updates = n_updates


# ----------------------------------------------------------------------------- the agent


@dataclasses.dataclass
class SB3Config:
    """Per-iteration sizes: one update sees ``envs`` x ``n_steps`` env steps (64 episodes on KVEvict-v0).

    The learning rate is constant (SB3's default; ``update()`` calls ``learn`` once per iteration, so
    SB3's progress-based schedules would not see the whole run).
    """

    algo: str = "ppo"
    envs: int = 64
    n_steps: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    n_epochs: int = 4
    log_std_init: float = -1.0
    critic_hidden: int = 64
    ars_delta_std: float = 0.02
    ars_n_delta: int = 4


class SB3Agent:
    """An SB3 / sb3-contrib algorithm driven one iteration at a time; ``scorer`` is the actor's scorer.

    ``scorer`` gives the initial weights (copied into the policy); ``total_steps`` is not used (the
    learning rate is constant), it is part of every agent's constructor.
    """

    def __init__(
        self, scorer: PerHeadMLPScorer, traces: Any, env_kwargs: dict[str, Any], config: SB3Config, total_steps: int
    ) -> None:
        if config.algo not in ALGORITHMS:
            raise ValueError(f"algo must be one of {ALGORITHMS}, got {config.algo!r}")
        self.config = config
        self.env_id = "KVEvictStream-v0" if config.algo == "recurrent-ppo" else "KVEvict-v0"
        # ARS evaluates 2 n_delta candidates per update, each on one episode per env
        envs = config.envs if config.algo != "ars" else max(1, config.envs // (2 * config.ars_n_delta))
        self.env = gym.make_vec(self.env_id, num_envs=envs, vectorization_mode="vector_entry_point",
                                traces=traces, **env_kwargs)
        self.spec = self.env.unwrapped.model_spec
        self.protected = self.env.unwrapped.protected  # what the checkpoint records as always kept
        self.venv = SB3VecEnv(self.env)
        policy_kwargs: dict[str, Any] = {"scorer_config": scorer.config(), "spec": self.spec}
        self.model = self._make_model(policy_kwargs)
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self.model.policy.scorer.load_state_dict(scorer.state_dict())
        if config.algo == "ars":
            self.model.weights = torch.nn.utils.parameters_to_vector(self.model.policy.parameters()).detach()
        self.scorer = self.model.policy.scorer

    def _make_model(self, policy_kwargs: dict[str, Any]) -> Any:
        config = self.config
        if config.algo == "ars":
            return ARS(ScorerARSPolicy, self.venv, n_delta=config.ars_n_delta, delta_std=config.ars_delta_std,
                       learning_rate=config.lr, zero_policy=False, n_eval_episodes=self.venv.num_envs,
                       policy_kwargs=policy_kwargs, device="cpu")
        critic = {"critic_hidden": config.critic_hidden, "log_std_init": config.log_std_init}
        common = dict(learning_rate=config.lr, n_steps=config.n_steps, policy_kwargs={**policy_kwargs, **critic}, device="cpu")
        if config.algo == "ppo":
            return PPO(ScorerActorCriticPolicy, self.venv, batch_size=config.batch_size, n_epochs=config.n_epochs, **common)
        if config.algo == "a2c":
            return A2C(ScorerActorCriticPolicy, self.venv, **common)
        if config.algo == "trpo":
            return TRPO(ScorerActorCriticPolicy, self.venv, batch_size=config.batch_size, **common)
        return RecurrentPPO(ScorerRecurrentPolicy, self.venv, batch_size=config.batch_size, n_epochs=config.n_epochs, **common)

    @property
    def episodes_per_update(self) -> int:
        if self.config.algo == "ars":
            return 2 * self.config.ars_n_delta * self.venv.num_envs
        return self.config.n_steps * self.venv.num_envs

    def reseed(self, seed: int) -> None:
        """Restart torch / numpy / python RNGs and the env's episode sampling from ``seed``."""
        set_random_seed(seed)
        self.venv.seed(seed)
        restart_rollouts(self.model, self.venv.reset())

    def update(self) -> dict[str, float]:
        """One SB3 iteration (rollout + training) through ``learn``; returns the rollout's mean reward."""
        self.model.learn(total_timesteps=self.episodes_per_update, reset_num_timesteps=False)
        if self.config.algo == "ars":
            rewards = np.array([info["r"] for info in self.model.ep_info_buffer])
        else:
            rewards = self.model.rollout_buffer.rewards
        metrics = {"env_steps": float(self.episodes_per_update)}
        if self.env_id == "KVEvict-v0":
            metrics["train/cost_ratio"] = float(-rewards.mean())
        else:
            metrics["train/step_reward"] = float(rewards.mean())
        for key, value in self.model.logger.name_to_value.items():
            if key.startswith("train/"):
                metrics[key] = float(value)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"parameters": self.model.get_parameters(), "num_timesteps": self.model.num_timesteps,
                "n_updates": self.model._n_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.set_parameters(state["parameters"], exact_match=True)
        self.model.num_timesteps = state["num_timesteps"]
        restore_update_count(self.model, state["n_updates"])
