"""What evicting costs and saves: prefill vs scoring + compaction time, decode speed, bytes kept.

    python benchmarks/cache_overhead.py                  # SmolLM2-135M at 1k and 2k prompt tokens
    python benchmarks/cache_overhead.py --tiny           # a tiny random GQA Llama (e.g. on a GPU box)
    python benchmarks/cache_overhead.py --kvp-widths 112 64 32 --policies h2o-norm kvp   # cost by network width
    python benchmarks/cache_overhead.py --policies kvp runs/kvp                         # a trained run too
    python benchmarks/cache_overhead.py --policies h2o-norm kvp kvp-fast                 # with and without the H2O input

For each prompt length and policy: the stock prefill (sdpa, DynamicCache); the hand-off, what the
evicting prefill takes beyond a stock prefill run right before it (paired: the machine drifts by several
percent between runs): positions and padding, the query window for SnapKV/TOVA, and for H2O-style inputs
the attention each entry receives, by default in one pass with the attention's output (path ``torch/2p``:
sdpa plus a second pass for the sums, as before round 19); the scoring + compaction of all layers at a 25%
budget (``cache.flush()``, torch path, and Triton on CUDA); their sum relative to the stock prefill (goal
<= 2%). ``--kvp-widths`` adds an untrained ``kvp-net`` of each width with the
shipped policy's inputs (``kvp-wW``), and the network's share of the prefill's FLOPs next to it: what the
scoring costs at best, and how much of the measured time is the implementation. Then decode tokens/s with
the full cache and with 25% and 10% budgets, and the K/V bytes kept. Timings are medians over ``--repeats`` runs after a warm-up: wall
time on CUDA, this process's CPU time on CPU (so that other jobs on a shared box do not count).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvp_gym import scorers
from kvp_gym.cache import EvictingCache
from kvp_gym.checkpoint import load_scorer


def clock(device: torch.device) -> Callable[[], float]:
    """Wall time (synchronised) on CUDA; this process's CPU time on CPU, robust to other jobs on the box."""
    if device.type == "cuda":
        def wall() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return wall
    return time.process_time


def load(tiny: bool, device: torch.device) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """The model and a long token sequence (Python's documentation prose, or random ids for --tiny)."""
    if tiny:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, attn_implementation="sdpa",
        )
        return LlamaForCausalLM(config).eval().to(device), torch.randint(3, 4096, (1, 8192))
    import pydoc_data.topics

    from kvp_gym.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    text = "\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    return model.to(device), tokenizer(text[:60000], return_tensors="pt").input_ids


def make_scorer(name: str, model: LlamaForCausalLM):
    config = model.config
    shape = {"num_layers": config.num_hidden_layers, "num_kv_heads": config.num_key_value_heads, "head_dim": config.head_dim}
    if name.startswith("kvp-w"):  # an untrained kvp-net of that width, reading what the shipped policy reads
        return scorers.get("kvp-net", **shape, width=int(name[len("kvp-w"):]), inputs=scorers.get("kvp").inputs).to(model.device)
    if name == "kvp-fast":  # `--recipe smollm2-fast`'s network, untrained (the same cost): no normalised-H2O input
        return scorers.get("kvp-net", **shape, width=scorers.get("kvp").width, inputs="kv+window+last").to(model.device)
    if name == "mlp":  # the per-head MLP agent, untrained weights: same cost as a trained one
        return scorers.get("mlp", **shape).to(model.device)
    if name == "kvp":  # the shipped policy; on another model, an untrained network of its shape (the same cost)
        shipped = scorers.get("kvp")
        if all(shipped.config()[key] == value for key, value in shape.items()):
            return shipped.to(model.device)
        return scorers.get("kvp-net", **shape, width=shipped.width, inputs=shipped.inputs).to(model.device)
    if Path(name).exists():  # a run directory or checkpoint file
        return load_scorer(name).to(model.device)
    return scorers.get(name)


def flop_share(scorer, model: LlamaForCausalLM, length: int) -> str:
    """A kvp network's multiply-adds per scored entry, over all heads (its projections and hidden layers), as
    a share of the prefill's per token (the linear layers and the LM head, plus causal attention at
    ``length``); "" for other policies."""
    width = getattr(scorer, "width", None)
    if width is None:
        return ""
    config = model.config
    network = config.num_hidden_layers * config.num_key_value_heads * (2 * config.head_dim * width + 2 * width * width)
    linear = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight")) + model.lm_head.weight.numel()
    attention = config.num_hidden_layers * 2 * config.num_attention_heads * config.head_dim * length / 2
    return f"{network / (linear + attention):>10.2%}"


def stock_prefill(model, ids) -> float:
    """One prefill on transformers' own sdpa attention and DynamicCache."""
    now = clock(ids.device)
    model.set_attn_implementation("sdpa")
    start = now()
    model(ids, cache=DynamicCache(config=model.config))
    return now() - start


def compression_cost(model, ids, scorer, budget, use_triton, one_pass, repeats) -> tuple[float, float]:
    """Medians (hand-off: the evicting prefill minus a stock prefill run right before it; scoring + compaction
    of all layers), after a warm-up. Paired, so that the machine's drift between runs cancels."""
    now = clock(ids.device)
    hand_offs, flushes = [], []
    for _ in range(repeats + 1):
        stock = stock_prefill(model, ids)
        cache = EvictingCache(scorer, budget, config=model.config, use_triton=use_triton, one_pass_attention=one_pass)
        start = now()
        model(ids, cache=cache)
        hand_offs.append(now() - start - stock)
        start = now()
        cache.flush()
        flushes.append(now() - start)
    return statistics.median(hand_offs[1:]), statistics.median(flushes[1:])


def decode_speed(model, ids, make_cache: Callable[[], object], steps: int) -> tuple[float, object]:
    """Greedy decode tokens/s after a prefill (prefill excluded), and the cache."""
    now = clock(ids.device)
    cache = make_cache()
    token = model(ids, cache=cache).logits[:, -1:].argmax(-1)
    start = now()
    for _ in range(steps):
        token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    return steps / (now() - start), cache


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random GQA Llama instead of SmolLM2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--policies", nargs="+", default=["knorm", "streamingllm", "snapkv", "tova", "h2o-norm", "kvp"])
    parser.add_argument("--kvp-widths", type=int, nargs="*", default=[],
                        help="add an untrained kvp-net of each width (rows kvp-wW), with its FLOP share")
    parser.add_argument("--decode-policy", default="knorm")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: no spin-waiting in CPU time)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model, tokens = load(args.tiny, device)
    paths = [False, True] if device.type == "cuda" else [False]
    print(f"model: {'tiny random GQA Llama' if args.tiny else 'SmolLM2-135M'} on {device}, "
          f"{model.config.num_hidden_layers} layers x {model.config.num_key_value_heads} KV heads, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{'wall' if device.type == 'cuda' else 'process CPU'} time, median of {args.repeats}")
    for length in args.lengths:
        ids = tokens[:, :length].to(device)
        budget = length // 4
        stock = statistics.median([stock_prefill(model, ids) for _ in range(args.repeats + 1)][1:])
        print(f"\n== prompt {length} tokens: stock prefill {stock * 1e3:.0f} ms; budget {budget} (25%) ==")
        print(f"{'policy':<14}{'path':<10}{'hand-off':>10}{'score+compact':>15}{'overhead':>10}{'net FLOPs':>10}")
        for name in [*args.policies, *(f"kvp-w{width}" for width in args.kvp_widths)]:
            scorer = make_scorer(name, model)
            passes = [True, False] if "attention" in scorer.needs else [True]  # one-pass attention, and sdpa + sums
            for use_triton in paths:
                for one_pass in passes:
                    hand_off, flush = compression_cost(model, ids, scorer, budget, use_triton, one_pass, args.repeats)
                    label = Path(name).name if Path(name).exists() else name
                    path = ("triton" if use_triton else "torch") + ("" if one_pass else "/2p")
                    print(f"{label:<14}{path:<10}{hand_off * 1e3:>8.1f}ms{flush * 1e3:>13.1f}ms"
                          f"{(hand_off + flush) / stock:>10.2%}{flop_share(scorer, model, length)}")
        model.set_attn_implementation("sdpa")
        full_speed, full_cache = decode_speed(model, ids, lambda: DynamicCache(config=model.config), args.decode_steps)
        full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full_cache.layers)
        print(f"decode ({args.decode_steps} tokens, greedy): full cache {full_speed:.1f} tok/s, "
              f"K/V {full_bytes / 1e6:.2f} MB")
        for fraction in (0.25, 0.10):
            for use_triton in paths:
                def evicting(fraction=fraction, use_triton=use_triton):
                    return EvictingCache(make_scorer(args.decode_policy, model), int(length * fraction),
                                         config=model.config, use_triton=use_triton)

                speed, cache = decode_speed(model, ids, evicting, args.decode_steps)
                report = cache.report()
                print(f"  {args.decode_policy} budget {fraction:.0%} ({'triton' if use_triton else 'torch'}): "
                      f"{speed:.1f} tok/s, K/V {report.bytes_stored / 1e6:.2f} MB of {report.bytes_full / 1e6:.2f} MB "
                      f"({report.saved_fraction:.1%} saved)")


if __name__ == "__main__":
    main()
