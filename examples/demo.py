"""The whole kvp-gym story on the embedded SmolLM2-135M, end to end (8.9 minutes on 2 CPU cores with the
model already converted, measured).

    python examples/demo.py [--out demo] [--budget 96]

1. traces:      run SmolLM2 over Python's documentation prose and RULER-style tasks and record the
                post-RoPE Q/K/V of every layer (the train split of the ``smollm2-quick`` recipe);
2. train:       the recipe: KVP's per-head network reading keys, values, positions and the attention
                statistics the cache has, distilled from the future-attention oracle and validated by
                downstream perplexity with the compressed cache (best checkpoint in OUT/policy/best);
3. leaderboard: on the held-out ``quick`` suite, real perplexity and RULER accuracy with the compressed
                cache at 10% and 25% budgets: StreamingLLM (the floor), kvpress's normalised H2O, SnapKV,
                ExpectedAttention with its budget split across heads by shares tuned for it (the strongest
                heuristic in our measurements), the shipped ``kvp`` policy with equal budgets and with its own
                tuned split, and the policy trained in step 2, between the full cache and the future oracle
                (an upper bound: it reads the future);
4. generate:    SmolLM2 answering a note's question at the same KV budget with the full cache, the
                heuristics and the learned policy evicting its cache, on 8 notes with other codes: the
                note stated four times, the question after the compressed note or inside it; then the
                note stated once before 20 repeated filler sentences, the whole prompt compressed (there
                TOVA, the last query's vote, is the heuristic that answers).

Every step shows progress and reuses what an earlier run already made: rerunning is cheap.
"""

import argparse
import random
import shutil
import time
from pathlib import Path

import torch

from agents.recipes import RECIPES
from agents.train import BEST_DIR, train
from kvp_gym import scorers
from kvp_gym.checkpoint import FILE_NAME, checkpoint_file, read_header
from kvp_gym.data.common import render_messages
from kvp_gym.eval.downstream import prefilled_cache
from kvp_gym.eval.leaderboard import run_leaderboard
from kvp_gym.eval.report import ranking_table, write_report
from kvp_gym.eval.suite import get_suite
from kvp_gym.models import load_model
from kvp_gym.traces.dataset import sha256_of

RECIPE = "smollm2-quick"
# the floor, kvpress's normalised H2O, a classic, the strongest (ExpectedAttention at its tuned split)
HEURISTICS = ["streamingllm", "h2o-norm", "snapkv", "expected-attention+tuned"]
GENERATION_HEURISTICS = [*HEURISTICS, "tova"]  # + the one heuristic that keeps a note buried under filler
SHIPPED = "kvp"  # the registered policy shipped with kvp-gym (agents/shipped.py)
SHIPPED_TUNED = "kvp+tuned"  # the same, its budget split across heads by the shares tuned for it
TRAINED = "kvp-demo"  # the leaderboard name of the policy this demo trains
SECTIONS = ("Perplexity", "RULER accuracy", "Headroom closed")  # of the report, printed here
QUESTION = "What is the locker code, and when is the meeting?"
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
NOTES = 8  # locker notes answered per policy and placement
# the question after the compressed note (where the leaderboard's RULER asks it: compress a document once,
# then ask), or inside the compressed part (the whole prompt is compressed but its last token)
PLACEMENTS = ("after the compressed note (as the leaderboard's RULER)", "inside the compressed part")
FILLER = "The weather was mild and the trains ran on time. " * 20

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default="demo", help="where the traces, the policy and the leaderboard go")
parser.add_argument("--budget", type=int, default=96, help="KV entries kept per head when generating")
args = parser.parse_args()
out = Path(args.out)
started = time.perf_counter()


def elapsed() -> str:
    return f"[{(time.perf_counter() - started) / 60:.1f} min]"


recipe = RECIPES[RECIPE]
print(f"== 1/4 traces: SmolLM2 over real text, Q/K/V of every layer (recipe {RECIPE}: "
      f"{', '.join(f'{spec.n} {spec.source}' for spec in recipe.train_sets)}, {recipe.val_set[1]} {recipe.val_set[0]} "
      f"for validation) ==")
config = recipe.config(str(out / "policy"), progress=True, traces_root=out / "traces")

print(f"== 2/4 train: KVP's network distilled from the future-attention oracle, {recipe.steps} steps {elapsed()} ==")
result = train(config)


def ratios(metrics: dict[str, float]) -> str:
    """The validation's perplexity / full-cache perplexity per budget (share of the prefix kept)."""
    return ", ".join(f"{float(key.split('@')[1]):.0%} kept: {value:.3f}" for key, value in sorted(metrics.items())
                     if key.startswith("val/ppl_ratio@"))


print(f"validation (perplexity with the compressed cache / full-cache perplexity on {recipe.val_set[1]} validation "
      f"{recipe.val_set[0]} texts, not trained on; 1 = lossless):")
for step, metrics in sorted(result.evaluations.items()):
    print(f"  step {step}: {ratios(metrics)}")
best_file = checkpoint_file(out / "policy" / BEST_DIR)
best = read_header(best_file).training
print(f"trained in {result.seconds:.0f} s; best checkpoint (step {best['step']}: {ratios(best['validation'])}): {best_file}")

# the leaderboard names a checkpoint after its directory: the best one goes to OUT/kvp-demo
trained = out / TRAINED / FILE_NAME
if not trained.exists() or sha256_of(trained) != sha256_of(best_file):
    trained.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best_file, trained)

suite = get_suite("quick")
print(f"== 3/4 leaderboard: held-out suite {suite.id}, real perplexity and RULER accuracy with the compressed cache "
      f"{elapsed()} ==")
results = run_leaderboard(suite, out / "leaderboard", policy_names=[*HEURISTICS, SHIPPED, SHIPPED_TUNED],
                          checkpoints=[trained.parent])
report = write_report(results, out / "leaderboard", title="kvp-gym demo leaderboard")
print("\nRanking quality on the env (cost ratio, 1 = the future-attention oracle, lower is better):")
for row in ranking_table(results):
    print(f"  {row['policy']:<24}{row['cost_ratio']:>8.3f}")
text = report.read_text()
for section in text.split("\n## ")[1:]:
    if section.startswith(SECTIONS):
        print("\n## " + section.rstrip())
print(f"\nfull report: {report} {elapsed()}")

print(f"== 4/4 generate: SmolLM2 keeping {args.budget} entries per KV head, question after or inside the compressed part ==")
model, tokenizer = load_model()
sink, recent = suite.sink, suite.recent
rng = random.Random(0)
codes = [("4821", "Thursday")] + [("".join(rng.choice("123456789") for _ in range(4)), rng.choice(DAYS))
                                 for _ in range(NOTES - 1)]


def chat_text(text: str) -> str:
    """``text`` as the user's message in the chat template, ready for the assistant's answer."""
    return render_messages(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


def token_ids(text: str) -> torch.Tensor:
    """Token ids [1, n] of already rendered text (the template wrote the special tokens)."""
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def note_prompt(code: str, day: str) -> tuple[torch.Tensor, int]:
    """Token ids [1, n] of a note stated four times and its question, and how many precede the question."""
    note = (f"Here is a note: the locker code is {code} and the meeting moved to {day} at 3 pm in room 12B. "
            "Python's list.sort() is stable; sorted() returns a new list.")
    rendered = chat_text(f"{note} " * 4 + QUESTION)
    return token_ids(rendered), token_ids(rendered[:rendered.rindex(note) + len(note)]).shape[1]


def filler_prompt(code: str, day: str) -> torch.Tensor:
    """Token ids [1, n] of a note stated once, 20 repeated filler sentences and the question."""
    return token_ids(chat_text(f"Here is a note: the locker code is {code} and the meeting moved to {day}. {FILLER}{QUESTION}"))


@torch.inference_mode()
def answer(ids: torch.Tensor, compressed: int, policy: str | None) -> str:
    """Greedy answer after prefilling ids[:, :compressed] into a cache evicted to the budget by ``policy``."""
    cache = prefilled_cache(model, ids[:, :compressed], None if policy is None else scorers.get(policy),
                            None if policy is None else args.budget, sink, recent)
    output = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=24, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def print_answers(prompts: list[tuple[torch.Tensor, int]], title: str) -> None:
    """One row per policy: how many of the (ids, tokens compressed) prompts it answers with their code."""
    print(f"\n{title}:")
    for label, policy in rows:
        answers = [answer(ids, compressed, policy) for ids, compressed in prompts]
        right = sum(code in text for text, (code, _) in zip(answers, codes))
        print(f"  {label:<46}{right}/{NOTES} right  {answers[0][:60]!r}")


notes = [note_prompt(code, day) for code, day in codes]
first, before = notes[0]
print(f"prompt ({first.shape[1]} tokens, {before} before the question): 4 x the note "
      f"\"Here is a note: the locker code is 4821 and the meeting moved to Thursday ...\" + \"{QUESTION}\"; "
      f"right = the code in the answer, over {NOTES} notes with other codes (this one first)")
rows = [("full cache", None), *((f"{name}, {args.budget} per KV head", name) for name in GENERATION_HEURISTICS),
        (f"{SHIPPED} (learned, shipped), {args.budget} per KV head", SHIPPED),
        (f"{SHIPPED_TUNED} (learned, shipped), {args.budget} per KV head", SHIPPED_TUNED)]
print_answers(notes, f"question {PLACEMENTS[0]}")
print_answers([(ids, ids.shape[1] - 1) for ids, _ in notes], f"question {PLACEMENTS[1]}")
fillers = [filler_prompt(code, day) for code, day in codes]
print(f"\nprompt ({fillers[0].shape[1]} tokens): the note once + 20 x \"{FILLER[:49]}\" + \"{QUESTION}\"")
print_answers([(ids, ids.shape[1] - 1) for ids in fillers], "question inside the compressed part")
print(f"\ndone {elapsed()}")
