"""Recipes: one name for everything a good policy needs, ``kvp-gym train --recipe smollm2 --out DIR``.

A recipe makes its training and validation trace sets (once, into $KVP_GYM_HOME/recipes/<name>/, resumable) and
returns the TrainConfig that trains on them. ``smollm2`` distils the future-attention oracle into KVP's per-head
network reading keys, values, positions and the attention statistics the cache already has, the window's vote pooled
over neighbours included (``--agent distill --arch kvp-net --arch-opt inputs=kv+attention+last+pool``), validating
downstream perplexity every ``val_every`` steps and keeping the best checkpoint in ``DIR/best``. The loss is ListNet
on the future attention times the value norm (``I_i * ||v_i||``), width 112, 3000 steps: of the losses, targets,
widths and lengths compared in docs/learned-eviction.md, on texts of topics no training text has, the one whose
policy lost least perplexity and fits the 10 MB shipping budget (float16). The prefixes drawn are 256, 512 and 768
tokens and, on RULER tasks and dialogues, the question's first token: compressed where a server compresses before a
question, the target is what the question and its answer attend to, and that (with the last query's attention as an
input) is what taught the policy to keep the needle. They also include the answer's first token, where a server
compressing the whole prompt compresses the question with its context, which taught it to keep the needle then too
(study 8). The training traces are 64 prose texts, 128 windows of the standard library's docstrings, 96 RULER tasks
and 48 dialogues (the model answers every dialogue turn by turn, writing 12 dialogues at once as one streaming
batch, ``TrainSet(batch=12)``): twice study 4's data, whose policy lost less perplexity on dialogue and on prose of
the training topics, and as much on unseen topics and code (docs/learned-eviction.md, study 7). Plus 48 RULER tasks
of 512 tokens: with only 1k-token tasks the policy lost a short note buried under repeated filler, which TOVA keeps
(study 10). A set with a seed other than 0 is another set of that source (``ruler-train-s1``: other samples), so the
sets of the smaller recipe before it are reused as they are. With ``workers`` the dialogues and the importance
stores are made on that many Ray workers (the other trace sets in this process, on all its threads).
``smollm2-fast`` is the same without the normalised-H2O and pooled inputs (``inputs=kv+window+last``), on study 7's
trace sets: the cache then needs no attention sum, for a little perplexity (docs/learned-eviction.md, study 5); a
third of the scoring cost on a CPU until the cache summed the attention in the attention's own pass (round 19), about
the same since. The policies rank layer 0 by normalised H2O instead of by their agents (``h2o_layers``, round 18:
any ranking there beat the agents' on validation texts), so validation picks the best checkpoint in the form that
ships; training calls the network directly, never ``score``, so the weights are those without it (layer 0's
agents are trained and unused). ``smollm2-long`` adds 2k- and 4k-token prose and docs sets with prefixes up to
3072: on the ``long`` suite (4k tokens) its policy leads normalised H2O where the 1k-trained one loses
(docs/learned-eviction.md, round 13), and at 1k tokens it is as good (round 14): its seed 0's best checkpoint, on
dialogues written one at a time (``TrainSet(batch=1)``, 36 minutes of the recipe's 100 in round 13), was the shipped
``kvp`` until round 19; with the streamed dialogues it trains a policy of the same quality (docs/learned-eviction.md, round 15) in
49.6 minutes from an empty $KVP_GYM_HOME on this 2-core machine with ``--workers 2`` (round 17, README).
Since round 20 ``smollm2-long`` has a second stage (``finetune_config``): ``--agent finetune`` from the distilled best
checkpoint, 800 updates of the continuation's loss through the model on the 1k-token sets (23 minutes),
into ``DIR/finetune``; round 20's shipped ``kvp`` was that stage's final weights, run from the previous shipped weights
(docs/learned-eviction.md, round 20), and the shipped one is fine-tuned further since (``agents.shipped``).
``smollm2-quick`` is the same at demo size, without dialogues.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

from agents.distill import build_stores
from agents.train import BEST_DIR, TrainConfig, agent_config
from kvp_gym.paths import home_dir
from kvp_gym.scale import ray_session, wants_ray
from kvp_gym.traces import TraceDataset, generate_traces


DISTILL_OPTIONS = (("loss", "listnet"), ("target", "imp_vnorm"))


class TrainSet(NamedTuple):
    """A training trace set: ``n`` sequences of ``source`` drawn with ``seed``, of ``length`` tokens (None: the
    recipe's). A seed other than 0 is another set of that source (``ruler-train-s1``: other samples); another
    length names it too (``ruler512-train-s2``), and so does a dialogue set's ``batch`` (``dialogue-train-b12``:
    the model writes that many dialogues at once, other dialogues than one at a time)."""

    source: str
    n: int
    seed: int = 0
    length: int | None = None
    batch: int = 1

    def length_in(self, recipe_length: int) -> int:
        """The set's length in tokens: its own, else the recipe's."""
        return self.length or recipe_length

    def directory_name(self, recipe_length: int) -> str:
        length = self.length_in(recipe_length)
        return (f"{self.source}{'' if length == recipe_length else length}-train" + (f"-s{self.seed}" if self.seed else "")
                + (f"-b{self.batch}" if self.batch > 1 else ""))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Training sets, their default length, the validation set (source, sequences), and the run's settings."""

    name: str
    train_sets: tuple[TrainSet, ...]
    val_set: tuple[str, int]
    steps: int
    length: int = 1024
    model: str = "smollm2-135m"
    arch_options: tuple[tuple[str, Any], ...] = (("width", 112), ("inputs", "kv+attention+last+pool"), ("h2o_layers", (0,)))
    agent_options: tuple[tuple[str, str], ...] = (*DISTILL_OPTIONS, ("prefixes", "256,512,768,question"))
    val_every: int = 500
    val_seed: int = 7  # the train split's topics (never the test suites'), other windows than training's seed 0
    traces_of: str | None = None  # the recipe whose trace sets this one shares (None: its own)
    finetune_steps: int = 0  # > 0: a second stage, ``--agent finetune`` from the distilled best (``finetune_config``)

    def traces_root(self, root: str | Path | None = None) -> Path:
        """Where the trace sets go: ``root``, or $KVP_GYM_HOME/recipes/<name of the recipe whose sets these are>."""
        return home_dir() / "recipes" / (self.traces_of or self.name) if root is None else Path(root).expanduser()

    def trace_sets(self, show_progress: bool = True, root: str | Path | None = None, workers: int = 0) -> tuple[list[str], str]:
        """(training trace set directories, validation set directory), generated on first use under
        ``traces_root(root)``. With ``workers`` > 0 the dialogue sets are made on that many Ray workers; the
        other sets are prefilled here, with every torch thread: one two-thread process made the recipe's sets 11%
        sooner than two one-thread workers (17% on 2k-4k-token traces; docs/learned-eviction.md, round 17). Workers write one thread's
        files; more threads sum in another order, so a trace can differ from those in the last bits."""
        root = self.traces_root(root)
        train = [
            str(generate_traces(root / spec.directory_name(self.length), spec.source, spec.n, spec.length_in(self.length),
                                split="train", model_name=self.model, seed=spec.seed, show_progress=show_progress,
                                workers=workers if spec.source == "dialogue" else 0, dialogue_batch=spec.batch).directory)
            for spec in self.train_sets
        ]
        source, n = self.val_set
        val = generate_traces(root / f"{source}-val", source, n, self.length, split="train", model_name=self.model,
                              seed=self.val_seed, show_progress=show_progress)
        return train, str(val.directory)

    def config(self, out: str, seed: int = 0, progress: bool = True, traces_root: str | Path | None = None,
               workers: int = 0) -> TrainConfig:
        """The run's TrainConfig; its trace sets and their importance stores are made first (under
        ``traces_root``, on ``workers`` Ray workers in one Ray session if > 0, see ``trace_sets``)."""
        with ray_session(workers) if wants_ray(workers, None) else contextlib.nullcontext():
            train, val = self.trace_sets(show_progress=progress, root=traces_root, workers=workers)
            build_stores([TraceDataset(directory) for directory in train], agent_config("distill", dict(self.agent_options)),
                         show_progress=progress, workers=workers)
        return TrainConfig(
            agent="distill", traces=train, out=out, steps=self.steps, all_heads=True, seed=seed, arch="kvp-net",
            arch_options=dict(self.arch_options), agent_options=dict(self.agent_options), val_traces=val,
            val_every=self.val_every, val_texts=self.val_set[1], save_every=min(250, self.steps), progress=progress,
        )

    def finetune_config(self, distilled: TrainConfig) -> TrainConfig | None:
        """The second stage, None without one (``finetune_steps`` = 0): ``--agent finetune`` (the continuation's loss
        through the model) from the distilled run's best checkpoint, into ``<out>/finetune``, on its training sets of
        at most the recipe's length (a 4k-token continuation step would cost several 1k ones), at the same prefixes
        (the importance stores are the distilled run's)."""
        if not self.finetune_steps:
            return None
        short = [directory for spec, directory in zip(self.train_sets, distilled.traces)
                 if spec.length_in(self.length) <= self.length]
        out = Path(distilled.out)
        return dataclasses.replace(
            distilled, agent="finetune", traces=short, out=str(out / "finetune"), steps=self.finetune_steps,
            arch_options={}, init=str(out / BEST_DIR), agent_options={"prefixes": distilled.agent_options["prefixes"]},
            val_every=min(self.val_every, self.finetune_steps), save_every=min(100, self.finetune_steps),
        )


STUDY7_SETS = (TrainSet("prose", 64), TrainSet("docs", 128), TrainSet("ruler", 48), TrainSet("ruler", 48, seed=1),
               TrainSet("dialogue", 24, batch=12), TrainSet("dialogue", 24, seed=1, batch=12))
SMOLLM2 = Recipe("smollm2", train_sets=(*STUDY7_SETS, TrainSet("ruler", 48, seed=2, length=512)), val_set=("prose", 4),
                 steps=3000, agent_options=(*DISTILL_OPTIONS, ("prefixes", "256,512,768,question,answer")))
LONG_SETS = (TrainSet("prose", 24, length=2048), TrainSet("docs", 24, length=2048), TrainSet("prose", 12, length=4096),
             TrainSet("docs", 12, length=4096))
RECIPES: dict[str, Recipe] = {
    "smollm2": SMOLLM2,
    "smollm2-long": dataclasses.replace(SMOLLM2, name="smollm2-long", traces_of="smollm2", train_sets=(*SMOLLM2.train_sets, *LONG_SETS),
                                        agent_options=(*DISTILL_OPTIONS, ("prefixes", "256,512,768,1024,1536,2048,3072,question,answer")),
                                        finetune_steps=800),
    # the same without the normalised-H2O and pooled inputs: the cache needs no attention sum
    "smollm2-fast": dataclasses.replace(SMOLLM2, name="smollm2-fast", traces_of="smollm2", train_sets=STUDY7_SETS,
                                        arch_options=(("width", 112), ("inputs", "kv+window+last")),
                                        agent_options=(*DISTILL_OPTIONS, ("prefixes", "256,512,768,question"))),
    "smollm2-quick": Recipe("smollm2-quick", train_sets=(TrainSet("prose", 12), TrainSet("ruler", 8)), val_set=("prose", 2), steps=300,
                            val_every=150),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name]
