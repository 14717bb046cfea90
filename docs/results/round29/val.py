"""Scratch: per-text perplexity ratio - 1 (%) through the real cache, paired differences with bootstrap CIs.
usage: val.py TRACEDIR OUT.json name=spec[+SHARESFILE] ...   env: PREFIX (768), BUDGETS (0.1,0.25,0.5), THREADS, N
spec: a registered scorer name or a run dir/checkpoint; +FILE attaches those head shares (model scope)."""
import json, os, sys, math
import numpy as np, torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from kvp_gym import scorers
from kvp_gym.checkpoint import load_scorer
from kvp_gym.cache.head_shares import HeadShares
from kvp_gym.eval.downstream import continuation_nll, record_prefill, recording_window
from kvp_gym.models import load_model
from kvp_gym.traces import TraceDataset
from pathlib import Path

tdir, out, *specs = sys.argv[1:]
prefix = int(os.environ.get("PREFIX", "768"))
fracs = [float(x) for x in os.environ.get("BUDGETS", "0.1,0.25,0.5").split(",")]
ds = TraceDataset(tdir)
n = min(len(ds), int(os.environ.get("N", "999")))
pol = {}
for item in specs:
    name, spec = item.split("=", 1)
    spec, _, shares = spec.partition("+FILE:")
    if spec == "ORACLE":
        s = ("oracle", HeadShares.load(shares) if shares else None)
    else:
        s = load_scorer(spec) if Path(spec).exists() else scorers.get(spec)
        if shares:
            s.head_shares = HeadShares.load(shares)
    pol[name] = s
model, _ = load_model(ds.manifest["params"]["model"])
window = recording_window([s for s in pol.values() if not isinstance(s, tuple)])
from kvp_gym.eval.oracle import TraceOracle, trace_importance
res = {name: {f: [] for f in fracs} for name in pol}
full = []
with torch.inference_mode():
    for i in range(n):
        tr = ds[i]
        rec = record_prefill(model, tr.tokens[None, :prefix], window)
        nf, c = continuation_nll(model, tr, prefix, None, None, 4, 16, rec)
        full.append(nf / c)
        imp = None
        for name, s in pol.items():
            if isinstance(s, tuple):
                imp = imp if imp is not None else trace_importance(tr, prefix)
                s = TraceOracle(imp, s[1])
            for f in fracs:
                b = max(int(f * prefix), 20)
                nl, c = continuation_nll(model, tr, prefix, s, b, 4, 16, rec)
                res[name][f].append(nl / c)
        print(i, flush=True)
full = np.array(full)
summary = {}
rng = np.random.default_rng(0)
idx = rng.integers(0, n, (2000, n))
for name in pol:
    for f in fracs:
        r = (np.exp(np.array(res[name][f]) - full) - 1) * 100
        summary[f"{name}@{f}"] = float(r.mean())
names = list(pol)
print("policy " + " ".join(f"{f:>8}" for f in fracs))
for name in names:
    print(f"{name:30s} " + " ".join(f"{summary[f'{name}@{f}']:+8.2f}" for f in fracs))
for a in names:
    for b in names:
        if a >= b: continue
        cells = []
        for f in fracs:
            d = (np.exp(np.array(res[a][f]) - full) - np.exp(np.array(res[b][f]) - full)) * 100
            bs = d[idx].mean(1)
            cells.append(f"{d.mean():+.2f} [{np.percentile(bs, 2.5):+.2f},{np.percentile(bs, 97.5):+.2f}]")
        print(f"{a} - {b}: " + " / ".join(cells))
json.dump({"full": full.tolist(), "res": {k: {str(f): v for f, v in d.items()} for k, d in res.items()}, "summary": summary},
          open(out, "w"))
