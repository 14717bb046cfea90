"""The policy that ships with kvp-gym: registry name ``kvp``, ready to use with no training.

    kvp-gym generate --policy kvp --budget 128 --prompt "..."
    EvictingCache(kvp_gym.scorers.get("kvp"), budget, config=model.config)

It is KVP's per-head network for SmolLM2-135M-Instruct reading keys, values, positions and the
attention statistics of the cache, the last query's and the window's vote pooled over neighbours
included (``agents.kvp_scorer``, ``inputs="kv+attention+last+pool"``), distilled from the future-attention
oracle (``agents.distill``) by ``kvp-gym train --recipe smollm2-long`` (since round 14: texts of 512 to 4096
tokens; the best checkpoint of seed 0); its checkpoint header records how it was trained. Since round 18 it
ranks layer 0 by normalised H2O instead of its agents there (``h2o_layers=[0]`` in its config, chosen on
validation texts: ``examples/layer_fallback.py``). Since round 20 those weights are fine-tuned on the continuation's
loss through the model with a softly evicted cache (``agents.finetune``, ``kvp-gym train --agent finetune --init``,
800 updates on the recipe's 1k-token sets; docs/learned-eviction.md, round 20). Round 22 shipped the mean of two
further fine-tunes from those, 600 updates each with prose drawn 3 times as often, one anchored to distillation's
loss (``python -m agents.shipped RUN1 RUN2``). Since round 24 they are the unanchored one of the two carried three
600-update runs further, the last with RULER tasks under one repeated sentence in its mix (``python -m agents.shipped
runs/e6``; docs/learned-eviction.md, rounds 22-24).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from agents.kvp_scorer import PerHeadKVPScorer
from kvp_gym.checkpoint import load_scorer, read_header, save_scorer
from kvp_gym.scorers import Scorer

POLICY_FILE = Path(__file__).parent / "policies" / "kvp-smollm2-135m.safetensors"


def shipped_kvp() -> Scorer:
    """The shipped SmolLM2-135M policy (it has agents for that model's 30 x 3 KV heads only)."""
    return load_scorer(POLICY_FILE).eval()


def ship(runs: str | Path | Sequence[str | Path], out: str | Path = POLICY_FILE, h2o_layers: list[int] | None = None) -> Path:
    """Write the trained scorer of ``runs`` (a run directory or checkpoint file) as the shipped policy: the
    same header, the weights in float16 (half the size; they load back as float32). Several runs of one
    architecture (fine-tuned from the same weights) ship as the mean of their weights, with the first's header and
    ``training["average_of"]`` naming them. ``h2o_layers``, if given, sets the layers a ``kvp-net`` ranks by
    normalised H2O instead of its agents (``PerHeadKVPScorer.with_h2o_layers``)."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    header, scorer = read_header(runs[0]), load_scorer(runs[0])
    training = header.training
    if len(runs) > 1:
        others = [(run, read_header(run), load_scorer(run)) for run in runs[1:]]
        for run, other, _ in others:
            if (other.registry_name, other.config) != (header.registry_name, header.config):
                raise ValueError(f"runs to average must share one architecture: {runs[0]} holds {header.registry_name!r} "
                                 f"{header.config}, {run} holds {other.registry_name!r} {other.config}")
        states = [scorer.state_dict(), *(weights.state_dict() for _, _, weights in others)]
        scorer.load_state_dict({name: sum(state[name] for state in states) / len(states) if tensor.is_floating_point()
                                else tensor for name, tensor in states[0].items()})  # integer buffers: the architecture's
        training = {**training, "average_of": [str(run) for run in runs]}
    config = header.config
    if h2o_layers is not None:
        if not isinstance(scorer, PerHeadKVPScorer):
            raise ValueError(f"h2o_layers needs a kvp-net run; {runs[0]} holds {header.registry_name!r}")
        scorer = scorer.with_h2o_layers(h2o_layers)
        config = scorer.config()
    return save_scorer(scorer, out, registry_name=header.registry_name, config=config, model_spec=header.model_spec,
                       protected=header.protected, training=training, env=header.env, weights_dtype=torch.float16)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Ship a trained run as the registered `kvp` policy (float16 weights).")
    parser.add_argument("runs", type=Path, nargs="+",
                        help="run directory (or its best/) or checkpoint file; several: the mean of their weights")
    parser.add_argument("--h2o-layers", type=int, nargs="*", default=None,
                        help="layers ranked by normalised H2O instead of the agents (default: as the run's config)")
    parser.add_argument("--out", type=Path, default=POLICY_FILE, help="where to write it (default: the shipped `kvp`)")
    args = parser.parse_args()
    print(f"wrote {ship(args.runs, args.out, h2o_layers=args.h2o_layers)}")
