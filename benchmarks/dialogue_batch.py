"""How fast the model writes a dialogue set: one dialogue at a time against a batch of them.

    python benchmarks/dialogue_batch.py                        # SmolLM2-135M, 1024-token dialogues, 3 alone, 12 together
    python benchmarks/dialogue_batch.py --batch 16 --alone 2
    python benchmarks/dialogue_batch.py --alone 0             # the group only, with the in-place and the stock cache

Dialogue sets were the slowest part of a recipe: the model answers every user turn, and decoding one token on a
CPU reads all the weights once (memory-bound). ``--dialogue-batch`` writes a group of dialogues as one streaming
batch: every step feeds each dialogue one token (of its prompt, or of its sampled reply), so each read of the
weights serves the whole group, no turn prefills its conversation again and no dialogue waits for another's
reply to end. This prints the seconds per dialogue both ways (this process's CPU time, one torch thread, as a
Ray worker runs), the group written twice, appending to its cache in place (``kvp_gym/models/growing_cache.py``)
and with transformers' stock cache, which copies itself to append a token (the same dialogues, checked). Round
16, idle machine: 15.6 s per dialogue together in place, 17.4 s with the stock cache (1.12x); in another run,
77.0 s one at a time against 17.9 s together (4.3x). Round 15, with the stock cache and two leaderboard workers
busy on the 2-core machine: 75.4 s alone, 30.0 s together (round 14's left-padded batches, which decoded to the
longest reply and prefilled every turn again: 1.8x, idle machine).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
from transformers import DynamicCache

from kvp_gym.data import make_dialogue, make_dialogue_group
from kvp_gym.models import DEFAULT_MODEL, growing_cache, load_model


def seconds_per_dialogue(write: Callable[[], Any], count: int) -> tuple[float, Any]:
    """(CPU seconds per dialogue, what ``write()`` returned)."""
    started = time.process_time()
    written = write()
    return (time.process_time() - started) / count, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--length", type=int, default=1024, help="Tokens per dialogue.")
    parser.add_argument("--alone", type=int, default=3, help="Dialogues written one at a time (0: none).")
    parser.add_argument("--batch", type=int, default=12, help="Dialogues written together.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    indices = list(range(args.batch))

    def group():
        return make_dialogue_group(model, tokenizer, "train", 0, indices, args.length)

    together, written = seconds_per_dialogue(group, args.batch)
    with mock.patch.object(growing_cache, "growing_cache", DynamicCache):  # the stock cache: torch.cat per step
        stock, stock_written = seconds_per_dialogue(group, args.batch)
    if [sample.text for sample in stock_written] != [sample.text for sample in written]:
        raise RuntimeError("the stock cache wrote other dialogues than the in-place one")
    tokens = sum(sample.meta["n_tokens"] for sample in written) / len(written)
    print(f"{args.model}, {args.length}-token dialogues (mean {tokens:.0f} tokens), one torch thread, CPU seconds per dialogue:")
    print(f"  {args.batch} together, cache in place: {together:6.1f} s   ({stock / together:.2f}x faster than the stock "
          f"cache's {stock:.1f} s, the same dialogues)")
    if args.alone > 0:
        alone, _ = seconds_per_dialogue(lambda: [make_dialogue(model, tokenizer, "train", 0, index, args.length)
                                                 for index in range(args.alone)], args.alone)
        print(f"  one at a time ({args.alone}):         {alone:6.1f} s   ({alone / together:.1f}x slower)")


if __name__ == "__main__":
    main()
