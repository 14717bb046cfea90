"""How fast the model writes a dialogue set: one dialogue at a time against a batch of them.

    python benchmarks/dialogue_batch.py                        # SmolLM2-135M, 1024-token dialogues, 3 alone, 12 together
    python benchmarks/dialogue_batch.py --batch 16 --alone 2
    python benchmarks/dialogue_batch.py --alone 0             # the group's step cost only, both caches (a minute)

Dialogue sets are the slow part of a recipe: the model answers every user turn, and decoding one token on a
CPU reads all the weights once (memory-bound). ``--dialogue-batch`` writes a group of dialogues as one streaming
batch: every step feeds each dialogue one token (of its prompt, or of its sampled reply), so each read of the
weights serves the whole group, no turn prefills its conversation again and no dialogue waits for another's
reply to end. This prints the seconds per dialogue both ways (this process's CPU time, one torch thread, as a
Ray worker runs) and their ratio, measured in the same run on the train split's dialogues. Round 16, idle
machine: 77.0 s alone, 17.9 s at 12 together, 4.3x. Round 15, before the group's cache appended in place, with two
leaderboard workers busy on the 2-core machine: 75.4 s alone, 30.0 s together, 2.5x (round 14's left-padded
batches, which decoded to the longest reply and prefilled every turn again: 1.8x, idle machine). A 12-row step
costs 140 ms at 64 cached tokens and 223 ms at 1000 (364 ms when the stock cache copied itself to append a token,
``kvp_gym/models/growing_cache.py``), against 76-84 ms for one row: what grows with the context now is reading
the cache. The script prints those step costs too, the stock cache's and the in-place one's, in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from kvp_gym.data import make_dialogue, make_dialogue_group
from kvp_gym.models import DEFAULT_MODEL, load_model
from kvp_gym.models.growing_cache import growing_cache

STEP_CONTEXTS = (64, 512, 1000)


def step_ms(model, cache, rows: int, context: int, steps: int = 8) -> float:
    """CPU milliseconds of one decoding step of ``rows`` rows over ``context`` cached tokens (random ids)."""
    ids = torch.randint(100, 1000, (rows, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        mask = torch.ones(rows, context, dtype=torch.long)
        started = time.process_time()
        for step in range(steps):
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
            model(input_ids=ids[:, step : step + 1], attention_mask=mask, position_ids=torch.full((rows, 1), context + step),
                  cache=cache, use_cache=True, logits_to_keep=1)
    return (time.process_time() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--length", type=int, default=1024, help="Tokens per dialogue.")
    parser.add_argument("--alone", type=int, default=3, help="Dialogues written one at a time (0: step costs only).")
    parser.add_argument("--batch", type=int, default=12, help="Dialogues written together.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)

    print(f"{args.model}, one torch thread, CPU ms per decoding step of {args.batch} rows (one row: in place):")
    for context in STEP_CONTEXTS:
        stock, in_place = step_ms(model, DynamicCache(), args.batch, context), step_ms(model, growing_cache(), args.batch, context)
        one_row = step_ms(model, growing_cache(), 1, context)
        print(f"  {context:5d} cached tokens: stock cache {stock:5.0f} ms, in place {in_place:5.0f} ms "
              f"({stock / in_place:.2f}x faster); one row {one_row:4.0f} ms")
    if args.alone < 1:
        return

    started = time.process_time()
    for index in range(args.alone):
        make_dialogue(model, tokenizer, "train", 0, index, args.length)
    alone = (time.process_time() - started) / args.alone

    started = time.process_time()
    group = make_dialogue_group(model, tokenizer, "train", 0, list(range(args.batch)), args.length)
    together = (time.process_time() - started) / args.batch

    tokens = sum(sample.meta["n_tokens"] for sample in group) / len(group)
    print(f"{args.length}-token dialogues (mean {tokens:.0f} tokens), CPU seconds per dialogue:")
    print(f"  one at a time ({args.alone}): {alone:6.1f} s")
    print(f"  {args.batch} together:      {together:6.1f} s   ({alone / together:.1f}x faster)")


if __name__ == "__main__":
    main()
