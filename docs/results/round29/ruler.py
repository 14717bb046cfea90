"""Scratch: RULER accuracy (question outside the compressed part) through the real cache, as the leaderboard computes
it, for a few policies at full-v2's budgets. usage: ruler.py OUT.json name=registered ..."""
import json, os, sys
import numpy as np, torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from kvp_gym import scorers
from kvp_gym.eval.downstream import compressed_length, record_prefill, recording_window, ruler_answers, ruler_prompt
from kvp_gym.eval.suite import get_suite, resolve_budget
from kvp_gym.models import load_model

out, *specs = sys.argv[1:]
pol = {item.split("=", 1)[0]: scorers.get(item.split("=", 1)[1]) for item in specs}
suite = get_suite("full-v2")
traces = suite.traces(only=("ruler", "ruler-512"), show_progress=False)
model, tok = load_model(suite.model)
window = recording_window(pol.values())
budgets = suite.budget_settings()
scores = {(p, str(b)): [] for p in pol for b in budgets}
scores.update({("full", "full"): []})
with torch.inference_mode():
    for key, ds in traces.items():
        for i in range(min(len(ds), int(os.environ.get("N", "999")))):
            tr = ds[i]
            n = compressed_length(tr, "outside")
            prefill = record_prefill(model, ruler_prompt(tok, tr)[:, :n], window)
            rows = [(None, None)] + [(s, resolve_budget(b, n, suite.sink, suite.recent)) for s in pol.values() for b in budgets]
            answers = ruler_answers(model, tok, tr, "outside", rows, suite.sink, suite.recent, suite.answer_tokens, prefill)
            labels = [("full", "full")] + [(p, str(b)) for p in pol for b in budgets]
            for label, (_, score) in zip(labels, answers):
                scores[label].append(score)
            print(key, i, flush=True)
print("full", np.mean(scores["full", "full"]))
for p in pol:
    print(f"{p:20s} " + " ".join(f"{b}: {np.mean(scores[p, str(b)]):.3f}" for b in budgets))
json.dump({f"{p}@{b}": v for (p, b), v in scores.items()}, open(out, "w"))
