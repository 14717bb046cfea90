"""Train an eviction agent: ``kvp-gym train`` (agents/cli.py) and ``train(TrainConfig(...))`` from Python.

A run lives in one directory (``--out``):

    run.json            the settings that define the run (a rerun with other settings is refused)
    scorer.safetensors  the trained scorer (kvp_gym.checkpoint format), rewritten at every checkpoint
    state.safetensors   the last checkpoint: step, scorer weights, the agent's optimiser / scheduler
                        (and SB3 model) state, the sha256 of the scorer file of that step and its
                        evaluation; safetensors + JSON (kvp_gym.checkpoint.save_state), never a pickle
    tb/                 TensorBoard logs (training metrics, evaluation, throughput)

A checkpoint writes the scorer first, then the state that names it (each atomically), so the state
never names a scorer that was not written. Resume: rerunning the same command continues from the
state's step. A scorer file that is not the one the state names (a kill between the two writes
left a newer one) is rewritten at the next checkpoint, or at once from the state's weights when the
state's step already reached ``steps``. A ``state.pt`` (a pickle, from older versions) is refused,
never loaded. Reproducibility: at every checkpoint
boundary (steps 0, k, 2k, ...) every random stream (torch, numpy, python, the env's episode sampling,
the agent's action noise) restarts from ``seed_for(seed, step)``, so the RNG state at a checkpoint is a
function of (seed, step) and is not stored: a run killed and resumed produces the same weights as an
uninterrupted one (same machine and library versions).

Heads: ``layer`` + ``kv_head`` trains one agent (the env fixes that head); ``layer`` alone trains the
KV heads of one layer; ``all_heads`` trains every (layer, KV head) of the model at once: episodes of
all heads share one vector env and one backward pass updates all heads' weights (the per-head MLP is
one batched einsum).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from agents.common import seed_for
from agents.distill import DistillAgent, DistillConfig
from agents.finetune import FinetuneAgent, FinetuneConfig
from agents.grpo import GRPOAgent, GRPOConfig
from agents.kvp import KVPAgent, KVPConfig
from agents.pairwise import PairwiseAgent, PairwiseConfig
from agents.mlp_scorer import PerHeadMLPScorer
from agents.sb3_agents import SB3Agent, SB3Config
from agents.validation import DownstreamValidator
from kvp_gym import scorers
from kvp_gym.checkpoint import checkpoint_file, load_scorer, load_state, read_header, save_scorer, save_state
from kvp_gym.envs.episodes import TraceSource
from kvp_gym.envs.kv_evict import KVEvictCore
from kvp_gym.eval.ranking import RankingEvaluator
from kvp_gym.models.spec import ModelSpec
from kvp_gym.progress import progress_bar
from kvp_gym.io import remove_temp_files, write_json_atomic
from kvp_gym.traces.dataset import TraceDataset, sha256_of

# name -> (agent class, default hyperparameters)
AGENTS: dict[str, tuple[type, Any]] = {
    "kvp": (KVPAgent, KVPConfig()),
    "grpo": (GRPOAgent, GRPOConfig()),
    "grpo-stream": (GRPOAgent, GRPOConfig(stream=True)),
    "pairwise": (PairwiseAgent, PairwiseConfig()),
    "pairwise-stream": (PairwiseAgent, PairwiseConfig(stream=True)),
    "distill": (DistillAgent, DistillConfig()),
    "finetune": (FinetuneAgent, FinetuneConfig()),
    "ppo": (SB3Agent, SB3Config(algo="ppo")),
    "a2c": (SB3Agent, SB3Config(algo="a2c")),
    "trpo": (SB3Agent, SB3Config(algo="trpo")),
    "ars": (SB3Agent, SB3Config(algo="ars")),
    "recurrent-ppo": (SB3Agent, SB3Config(algo="recurrent-ppo", envs=16, n_steps=16)),
}
EVAL_MIN_PREFIX = 64  # evaluation episodes leave room for the 64-query window SnapKV / TOVA read
BEST_DIR = "best"  # the checkpoint with the best downstream validation (with --val-traces)
RUN_FILE, STATE_FILE, PICKLED_STATE = "run.json", "state.safetensors", "state.pt"


@dataclasses.dataclass
class TrainConfig:
    """One training run. ``agent_options`` override the agent's hyperparameters (e.g. {"lr": "1e-3"});
    ``env_options`` are extra keyword arguments of the training env (e.g. {"max_tokens": 256})."""

    agent: str
    traces: str | list[str]
    out: str
    steps: int
    layer: int | None = None
    kv_head: int | None = None
    all_heads: bool = False
    seed: int = 0
    hidden: int = 64
    arch: str = "mlp"
    arch_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    init: str | None = None
    agent_options: dict[str, str] = dataclasses.field(default_factory=dict)
    env_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_traces: str | list[str] | None = None
    eval_every: int = 50
    val_traces: str | None = None
    val_every: int = 100
    val_texts: int = 4
    eval_episodes: int = 128
    save_every: int = 50
    progress: bool = True

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share (evaluation and display settings may change)."""
        keep = ("agent", "traces", "steps", "layer", "kv_head", "all_heads", "seed", "hidden", "arch", "arch_options",
                "init", "agent_options", "env_options", "save_every")
        return {key: getattr(self, key) for key in keep}


@dataclasses.dataclass
class TrainResult:
    """What a run produced: the scorer file, the evaluations this invocation made ({step: metrics};
    step 0 is the initial policy), the last evaluation (empty without eval traces), timings."""

    scorer_path: Path
    evaluations: dict[int, dict[str, float]]
    seconds: float
    env_steps: int

    @property
    def evaluation(self) -> dict[str, float]:
        return self.evaluations[max(self.evaluations)] if self.evaluations else {}


def agent_config(name: str, options: dict[str, str]) -> Any:
    """The agent's default hyperparameters with ``options`` (strings, as typed on the command line) applied."""
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; choose one of {', '.join(AGENTS)}")
    config = AGENTS[name][1]
    fields = {field.name: field for field in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for key, text in options.items():
        if key not in fields:
            raise ValueError(f"--set {key}: agent {name!r} has no such option; options: {', '.join(fields)}")
        default = getattr(config, key)
        try:
            if isinstance(default, bool):
                if str(text).lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                changes[key] = str(text).lower() in ("true", "1")
            else:
                changes[key] = type(default)(text)
        except ValueError:
            raise ValueError(f"--set {key}={text}: expected a {type(default).__name__}") from None
    return dataclasses.replace(config, **changes)


def select_heads(spec: ModelSpec, layer: int | None, kv_head: int | None, all_heads: bool) -> tuple[list[tuple[int, int]] | None, dict[str, int]]:
    """(heads for the scorer, None = all; the env's fixed layer / kv_head) from the command-line choice."""
    if all_heads:
        if layer is not None or kv_head is not None:
            raise ValueError("give either --all-heads or --layer [--kv-head], not both")
        return None, {}
    if layer is None:
        raise ValueError("choose the heads to train: --layer L --kv-head H (one head), --layer L (its KV heads) or --all-heads")
    if not 0 <= layer < spec.num_layers:
        raise ValueError(f"--layer {layer} is out of range [0, {spec.num_layers}) for model {spec.name!r}")
    if kv_head is None:
        return [(layer, head) for head in range(spec.num_kv_heads)], {"layer": layer}
    if not 0 <= kv_head < spec.num_kv_heads:
        raise ValueError(f"--kv-head {kv_head} is out of range [0, {spec.num_kv_heads}) for model {spec.name!r}")
    return [(layer, kv_head)], {"layer": layer, "kv_head": kv_head}


def evaluator(traces: str | list[str], env_kwargs: dict[str, Any], episodes: int = 128, seed: int = 12345) -> RankingEvaluator:
    """The same ``episodes`` KVEvict-v0 episodes at every evaluation of a run (``env_kwargs``: KVEvictEnv's)."""
    return RankingEvaluator(KVEvictCore(traces, num_rows=episodes, **env_kwargs), seed)


def _make_scorer(config: TrainConfig, source: TraceSource, heads: list[tuple[int, int]] | None) -> Any:
    """A fresh trainable scorer of architecture ``config.arch`` for ``heads``, or the ``--init`` checkpoint."""
    spec = source.spec
    if config.init is None:
        if not scorers.is_trainable(config.arch):
            raise ValueError(f"--arch {config.arch!r} is not a trainable architecture")
        options = {"hidden": config.hidden} if config.arch == PerHeadMLPScorer.registry_name else {}
        scorer = scorers.get(config.arch, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                             head_dim=spec.head_dim, heads=heads, seed=config.seed, **options, **config.arch_options)
        if hasattr(scorer, "fit_normalization"):
            scorer.fit_normalization(source.traces)
        return scorer
    scorer = load_scorer(config.init, expect_spec=spec)
    if not getattr(scorer, "trainable", False):
        raise ValueError(f"--init {config.init}: not a trainable scorer checkpoint ({type(scorer).__name__})")
    every_head = {(layer, head) for layer in range(spec.num_layers) for head in range(spec.num_kv_heads)}
    if not (every_head if heads is None else set(heads)) <= set(scorer.heads):
        raise ValueError(f"--init {config.init} has agents for {scorer.heads}, not for every head this run trains")
    return scorer.train()


def _check_run(out: Path, config: TrainConfig) -> None:
    """Write run.json, or check that an existing run in ``out`` has the same settings."""
    run_file = out / RUN_FILE
    identity = json.loads(json.dumps(config.identity()))  # as JSON stores it (tuples become lists)
    if run_file.exists():
        saved = {"arch": "mlp", "arch_options": {}, **json.loads(run_file.read_text())}  # runs made before --arch
        if saved != identity:
            changed = sorted(key for key in identity if saved.get(key) != identity[key])
            raise ValueError(
                f"{out} already holds a run with other settings ({', '.join(changed)} differ); "
                f"rerun with the same settings to resume, or choose another --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, identity)


def _save_state(path: Path, step: int, agent: Any, scorer_file: Path, evaluation: dict[str, float]) -> None:
    save_state(path, {"step": step, "scorer": agent.scorer.state_dict(), "agent": agent.state_dict(),
                      "scorer_sha256": sha256_of(scorer_file), "evaluation": evaluation})


def _load_state(out: Path) -> dict[str, Any] | None:
    """The run's last checkpoint state, or None; a pickled ``state.pt`` is refused unread."""
    if (out / PICKLED_STATE).exists():
        raise ValueError(
            f"{out / PICKLED_STATE} is a pickle (it could run code when loaded), so it is never loaded; this "
            f"version keeps its resume state in {STATE_FILE}: delete {PICKLED_STATE} to restart the run"
        )
    if not (out / STATE_FILE).exists():
        return None
    state = load_state(out / STATE_FILE)
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("scorer_sha256"), str)):
        raise ValueError(f"{out / STATE_FILE} is not a training state of this version; delete it to restart the run")
    return state


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) ``config``; returns where the scorer is and its last evaluation."""
    if config.steps < 1 or config.save_every < 1 or config.eval_every < 1:
        raise ValueError("--steps, --save-every and --eval-every must be positive")
    out = Path(config.out).expanduser()
    train_source = TraceSource(config.traces)
    spec = train_source.spec
    heads, head_kwargs = select_heads(spec, config.layer, config.kv_head, config.all_heads)
    hyper = agent_config(config.agent, config.agent_options)

    agent_class = AGENTS[config.agent][0]
    env_kwargs = {"cache_gb": 4.0, **config.env_options, **head_kwargs}
    torch.manual_seed(seed_for(config.seed, 0))
    agent = agent_class(_make_scorer(config, train_source, heads), train_source.sets, env_kwargs, hyper, config.steps)
    _check_run(out, config)  # after every argument check, so that a failed start leaves no run behind
    remove_temp_files(out)  # what a killed checkpoint write left
    start, state = 0, _load_state(out)
    if state is not None:
        try:
            agent.scorer.load_state_dict(state["scorer"])
            agent.load_state_dict(state["agent"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise ValueError(f"{out / STATE_FILE} does not fit this run ({error}); delete it to restart the run") from None
        start = state["step"]
    evaluate = None
    if config.eval_traces is not None:
        eval_kwargs = {"min_prefix": EVAL_MIN_PREFIX, "cache_gb": 2.0, **head_kwargs}
        if agent.env_id == "KVEvict-v0" and "max_tokens" in config.env_options:
            eval_kwargs["max_tokens"] = config.env_options["max_tokens"]
        evaluate = evaluator(config.eval_traces, eval_kwargs, config.eval_episodes).summary
    protected = agent.protected
    validate = None
    if config.val_traces is not None:
        validate = DownstreamValidator(TraceDataset(config.val_traces), protected, texts=config.val_texts)
    training = {"agent": config.agent, "hyperparameters": dataclasses.asdict(hyper), **config.identity(),
                "trace_model": spec.name}

    def save_checkpoint_scorer(step: int, evaluation: dict[str, float]) -> Path:
        return save_scorer(agent.scorer, out, registry_name=agent.scorer.registry_name, config=agent.scorer.config(),
                           model_spec=spec, protected=protected.to_dict(),
                           training={**training, "step": step, "evaluation": evaluation}, env=agent.env_id)

    best_file = checkpoint_file(out / BEST_DIR)
    best = read_header(best_file).training["validation"]["val/ppl_ratio"] if best_file.exists() else math.inf

    def validate_and_keep_best(step: int) -> dict[str, float]:
        """Downstream validation at ``step``; the scorer goes to ``best/`` when its perplexity ratio is the lowest yet."""
        nonlocal best
        metrics = validate(agent.scorer)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        if metrics["val/ppl_ratio"] < best:
            best = metrics["val/ppl_ratio"]
            save_scorer(agent.scorer, out / BEST_DIR, registry_name=agent.scorer.registry_name, config=agent.scorer.config(),
                        model_spec=spec, protected=protected.to_dict(),
                        training={**training, "step": step, "validation": metrics}, env=agent.env_id)
        return metrics

    def checkpoint(step: int, evaluation: dict[str, float]) -> Path:
        file = save_checkpoint_scorer(step, evaluation)  # first the scorer, then the state that names it
        _save_state(out / STATE_FILE, step, agent, file, evaluation)
        return file

    if state is not None and start >= config.steps:
        file = checkpoint_file(out)
        if not file.exists() or sha256_of(file) != state["scorer_sha256"]:
            file = save_checkpoint_scorer(start, state["evaluation"])  # the state's weights are the run's result
            _save_state(out / STATE_FILE, start, agent, file, state["evaluation"])
        evaluation = state["evaluation"]
        return TrainResult(file, {start: evaluation} if evaluation else {}, 0.0, 0)

    writer = SummaryWriter(str(out / "tb"), purge_step=start)
    evaluations: dict[int, dict[str, float]] = {}
    last = {} if state is None else state["evaluation"]  # the newest evaluation, saved with each checkpoint
    env_steps, started = 0, time.perf_counter()
    with progress_bar(total=config.steps, description=f"train {config.agent}", enabled=config.progress) as bar:
        bar.advance(start)
        if evaluate is not None and start == 0:
            evaluations[0] = evaluate(agent.scorer)
            for key, value in evaluations[0].items():
                writer.add_scalar(f"eval/{key}", value, 0)
        if validate is not None and start == 0:  # the starting point: training keeps a checkpoint only if it does better
            evaluations.setdefault(0, {}).update(validate_and_keep_best(0))
        for step in range(start, config.steps):
            if step % config.save_every == 0:
                seed = seed_for(config.seed, step)
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)
                agent.reseed(seed)
            metrics = agent.update()
            env_steps += int(metrics.pop("env_steps"))
            for key, value in metrics.items():
                writer.add_scalar(key, value, step + 1)
            elapsed = time.perf_counter() - started
            writer.add_scalar("perf/env_steps_per_s", env_steps / elapsed, step + 1)
            writer.add_scalar("perf/updates_per_s", (step + 1 - start) / elapsed, step + 1)
            done = step + 1
            if evaluate is not None and (done % config.eval_every == 0 or done == config.steps):
                evaluations[done] = evaluate(agent.scorer)
                for key, value in evaluations[done].items():
                    writer.add_scalar(f"eval/{key}", value, done)
            if validate is not None and (done % config.val_every == 0 or done == config.steps):
                evaluations.setdefault(done, {}).update(validate_and_keep_best(done))
            if evaluations:
                last = evaluations[max(evaluations)]
            if done % config.save_every == 0 or done == config.steps:
                checkpoint(done, last)
            first = next(iter(metrics))
            status = f"{first.split('/')[-1]} {metrics[first]:.3f}"
            if "cost_ratio" in last:
                status += f" | eval cost {last['cost_ratio']:.3f}"
            bar.advance(1, status=status)
    writer.close()
    return TrainResult(checkpoint_file(out), evaluations, time.perf_counter() - started, env_steps)
