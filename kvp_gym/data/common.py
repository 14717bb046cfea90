"""Helpers shared by the text sources: splits, seeds, token counting, chat rendering, length fitting."""

from __future__ import annotations

import bisect
import hashlib
import random
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

SPLITS: tuple[str, ...] = ("train", "test")
_TEST_ONE_IN = 5  # about one key in five goes to the test split
_FIT_PROBE_UNITS = 16
_FIT_MAX_STEPS = 24
_FIT_MAX_GROWTH = 16  # extrapolate at most this factor beyond the last fitting k
_PARAGRAPH_BREAK = re.compile(r"\n\n+")

Message = dict[str, str]


def split_of(key: str) -> str:
    """The split a key (word, name, topic title) belongs to: stable across runs and Python versions."""
    return "test" if zlib.crc32(key.encode("utf-8")) % _TEST_ONE_IN == 0 else "train"


def keys_in_split(keys: Iterable[str], split: str) -> list[str]:
    """The keys assigned to `split`, in their given order."""
    return [key for key in keys if split_of(key) == split]


class JoinedCorpus(NamedTuple):
    """Named parts of a source (prose topics, modules, plays, files) joined into one text, with the char offset
    where each part starts."""

    text: str
    names: tuple[str, ...]
    starts: tuple[int, ...]

    def names_between(self, start: int, stop: int) -> list[str]:
        """Names of the parts overlapping text[start:stop]."""
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_left(self.starts, stop)
        return list(self.names[first:last])


def join_corpus(names: Sequence[str], parts: Sequence[str], separator: str) -> JoinedCorpus:
    """The parts joined by ``separator`` in the given order, part k named ``names[k]``."""
    starts, position = [], 0
    for part in parts:
        starts.append(position)
        position += len(part) + len(separator)
    return JoinedCorpus(separator.join(parts), tuple(names), tuple(starts))


def paragraph_starts(text: str) -> list[int]:
    """Char offsets in ``text`` of every paragraph that follows a blank line."""
    return [match.end() for match in _PARAGRAPH_BREAK.finditer(text)]


def check_request(n: int, split: str, target_tokens: int) -> None:
    """Raise ValueError naming the bad argument of a make_* call."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(target_tokens, int) or target_tokens < 1:
        raise ValueError(f"target_tokens must be a positive integer, got {target_tokens!r}")


def sample_rng(source: str, split: str, seed: int, index: int) -> random.Random:
    """The random stream of one sample: independent of n, different per split and source."""
    return random.Random(f"{source}:{split}:{seed}:{index}")


def torch_seed(*parts: Any) -> int:
    """A 63-bit seed for torch.manual_seed derived from `parts`."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens of `text`. No special tokens are added: the chat template already wrote them."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_to_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest prefix of `text`, cut at a token boundary, that has at most `max_tokens` tokens."""
    while True:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= max_tokens:
            return text
        text = text[: enc["offset_mapping"][max_tokens - 1][1]] if max_tokens > 0 else ""


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return getattr(tokenizer, "chat_template", None) is not None


def render_messages(
    tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False
) -> str:
    """The conversation as one string: the chat template, or "Role: content" blocks without one."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return text + ("Assistant: " if add_generation_prompt else "")


def content_starts(text: str, messages: Sequence[Message]) -> list[int]:
    """Char offset in `text` where each message's content begins (messages are found in order)."""
    starts, position = [], 0
    for message in messages:
        start = text.find(message["content"], position)
        if start < 0:
            raise ValueError(
                f"the chat template altered a {message['role']} message; cannot locate it in the text"
            )
        starts.append(start)
        position = start + len(message["content"])
    return starts


def fit_units(count: Callable[[int], int], target: int, what: str, max_units: int | None = None) -> int:
    """About the largest number of filler units k with count(k) <= target.

    `count(k)` is the exact token length of the sample built with k filler units; it must grow with k.
    Extrapolates until the target is bracketed, then interpolates (bisecting when a side stalls);
    stops within ~0.5% of the target, usually after a handful of tokenizations.
    """
    base = count(0)
    if base > target:
        raise ValueError(
            f"target_tokens={target} is too small for {what}: it needs more than {base} tokens"
        )
    tolerance = max(2, target // 200)
    lo, lo_tokens = 0, base
    hi, hi_tokens = (None, None) if max_units is None else (max_units + 1, None)
    guess, last_fit = _FIT_PROBE_UNITS, None
    for _ in range(_FIT_MAX_STEPS):
        if hi is not None:
            guess = min(guess, hi - 1)
        if guess <= lo or target - lo_tokens <= tolerance:
            break
        tokens = count(guess)
        fits = tokens <= target
        if fits:
            lo, lo_tokens = guess, tokens
        else:
            hi, hi_tokens = guess, tokens
        if hi_tokens is None:
            tokens_per_unit = max((lo_tokens - base) / lo, 1e-3)
            guess = min(lo + int((target - lo_tokens) / tokens_per_unit), _FIT_MAX_GROWTH * lo)
        elif fits == last_fit:
            guess = (lo + hi) // 2
        else:
            guess = lo + max(1, int((target - lo_tokens) * (hi - lo) / (hi_tokens - lo_tokens)))
        last_fit = fits
    return lo


def corpus_windows(
    tokenizer: Any,
    text: str,
    boundaries: Iterable[int],
    source: str,
    split: str,
    seed: int,
    n: int,
    target_tokens: int,
    describe: Callable[[int, int], dict[str, Any]],
) -> list[Any]:
    """`n` windows of `text` of about `target_tokens` tokens (never more), each starting at the first token
    at or after a seeded character position of `boundaries` (or at token 0), as TextSamples of `source`.

    `describe(char_start, char_stop)` adds source-specific fields to each window's meta.
    """
    from .sample import TextSample

    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if target_tokens > len(offsets):
        raise ValueError(f"target_tokens={target_tokens} exceeds the {split} {source} corpus ({len(offsets)} tokens)")
    token_starts = [start for start, _ in offsets]
    candidates = sorted({bisect.bisect_left(token_starts, char) for char in (0, *boundaries)})
    starts = [token for token in candidates if token + target_tokens <= len(offsets)] or [0]
    samples = []
    for index in range(n):
        first = sample_rng(source, split, seed, index).choice(starts)
        char_start = offsets[first][0]
        window = truncate_to_tokens(tokenizer, text[char_start : offsets[first + target_tokens - 1][1]], target_tokens)
        meta = {
            "seed": seed,
            "index": index,
            "target_tokens": target_tokens,
            "n_tokens": count_tokens(tokenizer, window),
            "char_start": char_start,
            **describe(char_start, char_start + len(window)),
        }
        samples.append(TextSample(window, source, source, split, [], len(window), len(window), meta))
    return samples
