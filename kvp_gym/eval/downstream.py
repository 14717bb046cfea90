"""Downstream quality: the real model generating with a compressed cache (EvictingCache).

Compression happens once, after the prefill, as KVP evaluates. Every number here comes from a real
forward pass of the model over held-out test traces' tokens:

- perplexity: prefill the first ``ppl_prefix`` tokens, compress to the budget, then score the rest
  of the trace (teacher forcing) with the compressed cache;
- RULER accuracy: greedy answer after compressing either the context alone (the question comes
  after the compression: "outside") or the context plus the question ("inside"). As in RULER, the
  prompt ends with the answer's prefix (the assistant text before the first expected answer, e.g.
  "The special magic number is"), so the model answers rather than restates the question.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from kvp_gym.cache import EvictingCache
from kvp_gym.cache.evicting_cache import DEFAULT_QUERY_WINDOW
from kvp_gym.data import score_answer
from kvp_gym.scorers import Scorer
from kvp_gym.traces import Trace

QUESTION_PLACEMENTS = ("outside", "inside")


def prefilled_cache(
    model: PreTrainedModel, prompt: torch.Tensor, scorer: Scorer | None, budget: int | None, sink: int, recent: int,
    prefill: EvictingCache | None = None,
) -> Cache:
    """A cache holding the prefill of ``prompt`` [1, n], compressed (lazily, at the next forward) to ``budget``
    entries per KV head by ``scorer``; the full cache if ``scorer`` is None.

    ``prefill``: a recording cache (``EvictingCache.recording``) that already ran this prompt; it is forked
    instead of running the prefill again (the same entries are evicted, see ``EvictingCache.fork``).
    """
    if prefill is not None:
        return prefill.fork(scorer, budget, sink=sink, recent=recent)
    cache = DynamicCache(config=model.config) if scorer is None else EvictingCache(
        scorer, budget, config=model.config, sink=sink, recent=recent)
    model(prompt, cache=cache, use_cache=True)
    return cache


def recording_window(policies: Iterable[Scorer]) -> int:
    """Queries a shared prefill records: the widest query window any of the policies reads."""
    return max([DEFAULT_QUERY_WINDOW, *(getattr(scorer, "window_size", DEFAULT_QUERY_WINDOW) for scorer in policies)])


@torch.inference_mode()
def record_prefill(model: PreTrainedModel, prompt: torch.Tensor, query_window: int) -> EvictingCache:
    """Run ``prompt`` [1, n] once into a recording cache, to fork for every policy and budget."""
    cache = EvictingCache.recording(model.config, query_window)
    model(prompt, cache=cache, use_cache=True)
    return cache


@torch.inference_mode()
def continuation_nll(
    model: PreTrainedModel, trace: Trace, prefix: int, scorer: Scorer | None, budget: int | None, sink: int, recent: int,
    prefill: EvictingCache | None = None,
) -> tuple[float, int]:
    """(sum of NLL, token count) of tokens[prefix + 1:] after compressing the first ``prefix`` tokens.

    Token ``prefix`` itself is predicted by the prefill's last logits, identical for every policy, so
    it is left out: every counted token was predicted through the compressed cache. ``prefill``: the
    recording of tokens[:prefix] to fork (see ``prefilled_cache``).
    """
    tokens = trace.tokens[None]
    cache = prefilled_cache(model, tokens[:, :prefix], scorer, budget, sink, recent, prefill)
    logits = model(tokens[:, prefix:-1], cache=cache, use_cache=True).logits[0]
    nll = torch.nn.functional.cross_entropy(logits.float(), tokens[0, prefix + 1 :], reduction="sum")
    return float(nll), int(tokens.shape[1] - prefix - 1)


@torch.inference_mode()
def ruler_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    trace: Trace,
    placement: str,
    rows: list[tuple[Scorer | None, int | None]],
    sink: int,
    recent: int,
    max_new_tokens: int,
    prefill: EvictingCache,
) -> list[tuple[str, float]]:
    """(greedy answer, RULER string-match score) of a RULER test trace for each (scorer, budget) row (None,
    None: the full cache), its cache forked from ``prefill``, the recording of the compressed part
    (``ruler_prompt(...)[:, :compressed_length(...)]``).

    Rows decode together: those whose stored lengths are within a factor ``STACK_SPREAD`` stack into one
    batch (``EvictingCache.stack``; shorter rows are padded with slots no query attends, which costs the
    difference); a scorer with head shares (ragged heads) decodes alone. Batched matmuls may differ from a lone
    row's in the last bits, so an answer can depend on the batch where two tokens nearly tie."""
    prompt = ruler_prompt(tokenizer, trace)
    compressed = prompt[:, : compressed_length(trace, placement)]
    stored = [compressed.shape[1] if budget is None else min(budget, compressed.shape[1]) for _, budget in rows]
    answers: list[tuple[str, float]] = [("", 0.0)] * len(rows)
    ragged = {i for i, (scorer, _) in enumerate(rows) if getattr(scorer, "head_shares", None) is not None}
    for group in decode_groups(stored, ragged):
        caches = [prefilled_cache(model, compressed, *rows[i], sink, recent, prefill) for i in group]
        cache = caches[0] if group[0] in ragged else EvictingCache.stack(caches)
        decoded = _greedy_answers(model, tokenizer, trace, prompt.expand(len(group), -1), cache, max_new_tokens)
        for i, answer in zip(group, decoded):
            answers[i] = answer
    return answers


STACK_SPREAD = 2  # rows stack while the longest stores at most this many times the shortest's entries


def decode_groups(lengths: list[int], alone: set[int]) -> list[list[int]]:
    """Row indices grouped by stored length (ascending): a group ends where a length exceeds ``STACK_SPREAD``
    times its first. The rows in ``alone`` (ragged heads, which do not stack) come last, one per group."""
    groups: list[list[int]] = []
    for index in sorted(set(range(len(lengths))) - alone, key=lengths.__getitem__):
        if not groups or lengths[index] > STACK_SPREAD * lengths[groups[-1][0]]:
            groups.append([])
        groups[-1].append(index)
    return groups + [[index] for index in sorted(alone)]


def _greedy_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, trace: Trace, prompt: torch.Tensor,
                    cache: Cache, max_new_tokens: int) -> list[tuple[str, float]]:
    """(answer, score) per row of ``prompt`` [R, n], greedy after the part ``cache`` [R rows] holds."""
    output = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        cache=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    answers = tokenizer.batch_decode(output[:, prompt.shape[1] :], skip_special_tokens=True)
    return [(answer, score_answer(answer, trace.meta)) for answer in answers]


def ruler_prompt(tokenizer: PreTrainedTokenizerBase, trace: Trace) -> torch.Tensor:
    """[1, n]: a RULER trace's tokens up to the answer's prefix (the model's greedy answer follows)."""
    return trace.tokens[: answer_prefix_end(tokenizer, trace)][None]


def compressed_length(trace: Trace, placement: str) -> int:
    """Tokens of a RULER prompt that are prefilled and compressed: the context alone ("outside": the
    question comes after the compression) or the context and the question ("inside")."""
    if placement not in QUESTION_PLACEMENTS:
        raise ValueError(f"placement must be one of {QUESTION_PLACEMENTS}, got {placement!r}")
    # generate needs at least one uncached prompt token, so "inside" leaves the last one for it.
    return trace.meta["question_token"] if placement == "outside" else trace.meta["answer_token"] - 1


def answer_prefix_end(tokenizer: PreTrainedTokenizerBase, trace: Trace) -> int:
    """Index of the first token of the first expected answer inside the trace's assistant turn."""
    start, tokens, first = trace.meta["answer_token"], trace.tokens, trace.meta["answer"][0]
    offset = tokenizer.decode(tokens[start:]).find(first)
    if offset < 0:
        raise ValueError(f"the answer {first!r} is not in the assistant turn of {trace!r}")
    return next(end for end in range(start, trace.length) if len(tokenizer.decode(tokens[start : end + 1])) > offset)


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else float("nan")
