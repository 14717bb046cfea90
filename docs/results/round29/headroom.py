"""Pooled perplexity [95% CI] per policy and budget, and headroom closed against the best heuristic with the
better oracle row as the bound (paired bootstrap over texts). usage: headroom.py VAL.json heuristic,... oracle,..."""
import json, sys
import numpy as np
d = json.load(open(sys.argv[1]))
heur = sys.argv[2].split(","); oracles = sys.argv[3].split(",")
full = np.array(d["full"]); n = len(full)
rng = np.random.default_rng(0); idx = rng.integers(0, n, (4000, n))
budgets = list(next(iter(d["res"].values())).keys())
print("full", f"{np.exp(full.mean()):.3f}")
for f in budgets:
    ppl = {p: np.exp(np.array(r[f])) for p, r in d["res"].items()}
    nll = {p: np.array(r[f]) for p, r in d["res"].items()}
    est = {p: float(np.exp(v.mean())) for p, v in nll.items()}
    bs = {p: np.exp(v[idx].mean(1)) for p, v in nll.items()}
    print(f"-- budget {f}: " + ", ".join(f"{p} {est[p]:.3f} [{np.percentile(bs[p],2.5):.3f},{np.percentile(bs[p],97.5):.3f}]" for p in est))
    best = min(heur, key=est.get); orc = min(oracles, key=est.get)
    for p in est:
        if p in oracles: continue
        h = (est[best] - est[p]) / (est[best] - est[orc])
        hs = (bs[best] - bs[p]) / (bs[best] - bs[orc])
        print(f"   headroom {p}: {h:+.2f} [{np.percentile(hs,2.5):+.2f},{np.percentile(hs,97.5):+.2f}]  (best heuristic {best}, oracle {orc})")
