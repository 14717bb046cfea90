"""How fast the model writes a dialogue set: one dialogue at a time against a batch of them.

    python benchmarks/dialogue_batch.py                        # SmolLM2-135M, 1024-token dialogues, 3 alone, 12 together
    python benchmarks/dialogue_batch.py --batch 16 --alone 2

Dialogue sets are the slow part of a recipe: the model answers every user turn, and decoding one token on a
CPU reads all the weights once (memory-bound). ``--dialogue-batch`` writes a group of dialogues as one streaming
batch: every step feeds each dialogue one token (of its prompt, or of its sampled reply), so each read of the
weights serves the whole group, no turn prefills its conversation again and no dialogue waits for another's
reply to end. This prints the seconds per dialogue both ways (this process's CPU time, one torch thread, as a
Ray worker runs) and their ratio, measured in the same run on the train split's dialogues. Round 15, with two
leaderboard workers busy on the 2-core machine: 75.4 s alone, 30.0 s at 12 together, 2.5x (round 14's
left-padded batches, which decoded to the longest reply and prefilled every turn again: 1.8x, idle machine).
What is left is the model: a 12-row step costs about 3x a one-row step at short contexts and grows with the
cache (the sdpa path copies the cache to append a token and repeats the grouped keys for every query head).
"""

from __future__ import annotations

import argparse
import time

import torch

from kvp_gym.data import make_dialogue, make_dialogue_group
from kvp_gym.models import DEFAULT_MODEL, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--length", type=int, default=1024, help="Tokens per dialogue.")
    parser.add_argument("--alone", type=int, default=3, help="Dialogues written one at a time.")
    parser.add_argument("--batch", type=int, default=12, help="Dialogues written together.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)

    started = time.process_time()
    for index in range(args.alone):
        make_dialogue(model, tokenizer, "train", 0, index, args.length)
    alone = (time.process_time() - started) / args.alone

    started = time.process_time()
    group = make_dialogue_group(model, tokenizer, "train", 0, list(range(args.batch)), args.length)
    together = (time.process_time() - started) / args.batch

    tokens = sum(sample.meta["n_tokens"] for sample in group) / len(group)
    print(f"{args.model}, {args.length}-token dialogues (mean {tokens:.0f} tokens), one torch thread, CPU seconds per dialogue:")
    print(f"  one at a time ({args.alone}): {alone:6.1f} s")
    print(f"  {args.batch} together:      {together:6.1f} s   ({alone / together:.1f}x faster)")


if __name__ == "__main__":
    main()
