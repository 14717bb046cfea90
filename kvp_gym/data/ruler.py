"""RULER-style synthetic long-context tasks with exact answers (Hsieh et al., 2024).

Each sample hides needles (or builds a word list) in a haystack grown until the chat-formatted text
reaches about `target_tokens` tokens (never more). The user turn holds instruction, context and
question; the assistant turn holds the answer. Train and test draw keys, names, values and numbers
from disjoint vocabularies and use different random streams.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from . import words
from .common import (
    check_request,
    content_starts,
    count_tokens,
    fit_units,
    keys_in_split,
    render_messages,
    sample_rng,
    split_of,
)
from .prose import prose_corpus
from .sample import TextSample

FILLER: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
HAYSTACKS: tuple[str, ...] = ("filler", "prose", "repeat")
DEFAULT_HAYSTACK = "filler"

MULTIKEY_NEEDLES = 8  # one asked, the rest distractors
MULTIVALUE_VALUES = 4
MULTIQUERY_KEYS = 4
VT_HOPS = 4  # a chain of VT_HOPS + 1 variables; one distractor chain of the same length
QA_FACTS = 8  # one asked, the rest distractors
CWE_TOP_K = 10

_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the numbers afterwards."
)


@dataclass(frozen=True)
class Haystack:
    """Filler units cycled from `start`, joined by `sep`, with needles inserted at fractional depths."""

    units: Sequence[str]
    sep: str
    start: int = 0

    def build(self, n_units: int, needles: Sequence[tuple[float, str]]) -> str:
        """`n_units` filler units with each (depth, needle) inserted at round(depth * n_units)."""
        slots: list[list[str]] = [[] for _ in range(n_units + 1)]
        for depth, needle in needles:
            slots[round(depth * n_units)].append(needle)
        parts: list[str] = []
        for i, slot in enumerate(slots):
            parts.extend(slot)
            if i < n_units:
                parts.append(self.units[(self.start + i) % len(self.units)])
        return self.sep.join(parts)


@dataclass(frozen=True)
class Vocabulary:
    """The words, names and fact values one split may use."""

    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    list_words: tuple[str, ...]
    names: tuple[str, ...]
    facts: dict[str, tuple[str, ...]]


@lru_cache(maxsize=None)
def vocabulary(split: str) -> Vocabulary:
    """The split's share of every word list (train and test are disjoint)."""

    def part(items: Sequence[str]) -> tuple[str, ...]:
        return tuple(keys_in_split(items, split))

    return Vocabulary(
        adjectives=part(words.ADJECTIVES),
        nouns=part(words.NOUNS),
        list_words=part(sorted(set(words.ADJECTIVES) | set(words.NOUNS) | set(words.VERBS))),
        names=part(words.FIRST_NAMES),
        facts={attribute: part(values) for attribute, values in words.QA_ATTRIBUTES.items()},
    )


@dataclass(frozen=True)
class _Request:
    """What a task builder draws from: the sample's random stream, split, vocabulary and haystack."""

    rng: random.Random
    split: str
    vocab: Vocabulary
    haystack: Haystack
    target_tokens: int
    count: Callable[[str], int]


@dataclass(frozen=True)
class _Task:
    """A drawn task instance; `context(k)` is its context with k filler units."""

    instruction: str
    question: str
    answer: list[str]
    reply: str
    context: Callable[[int], str]
    max_units: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- random draws


def _distinct(draw: Callable[[], str], n: int) -> list[str]:
    """`n` distinct values from `draw`, in drawing order."""
    values: list[str] = []
    while len(values) < n:
        value = draw()
        if value not in values:
            values.append(value)
    return values


def _number(req: _Request, digits: int) -> str:
    """A random `digits`-digit number belonging to the request's split."""
    while True:
        value = str(req.rng.randrange(10 ** (digits - 1), 10**digits))
        if split_of(value) == req.split:
            return value


def _key(req: _Request) -> str:
    """A needle key such as "tender-lantern"."""
    return f"{req.rng.choice(req.vocab.adjectives)}-{req.rng.choice(req.vocab.nouns)}"


def _variable(req: _Request) -> str:
    """A five-letter upper-case variable name belonging to the request's split."""
    while True:
        name = "".join(req.rng.choices(string.ascii_uppercase, k=5))
        if split_of(name) == req.split:
            return name


def _place(req: _Request, needles: Sequence[str], ordered: bool = False) -> list[tuple[float, str]]:
    """(depth, needle) pairs at random depths in [0, 1]; depths ascend with `ordered` (chains)."""
    depths = [req.rng.random() for _ in needles]
    if ordered:
        depths.sort()
    return list(zip(depths, needles))


def _depths(placed: Sequence[tuple[float, str]]) -> list[float]:
    return [round(depth, 4) for depth, _ in placed]


def _niah_task(req: _Request, pairs: Sequence[tuple[str, str]], asked: Sequence[str]) -> _Task:
    """Needles `pairs` (key, value); the answer is every value of the `asked` keys."""
    placed = _place(req, [_NEEDLE.format(key=key, value=value) for key, value in pairs])
    answer = [value for key, value in pairs if key in asked]
    keys = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + f" and {asked[-1]}"
    numbers_are = "number" + (" is" if len(answer) == 1 else "s are")
    return _Task(
        instruction=_NIAH_INSTRUCTION,
        question=f"What are all the special magic numbers for {keys} mentioned in the provided text?",
        answer=answer,
        reply=f"The special magic {numbers_are} {', '.join(answer)}.",
        context=lambda k: req.haystack.build(k, placed),
        meta={"keys": [key for key, _ in pairs], "asked": list(asked), "depths": _depths(placed)},
    )


# ---------------------------------------------------------------------------- tasks


def _niah_single(req: _Request) -> _Task:
    key = _key(req)
    return _niah_task(req, [(key, _number(req, 7))], [key])


def _niah_multikey(req: _Request) -> _Task:
    keys = _distinct(lambda: _key(req), MULTIKEY_NEEDLES)
    values = _distinct(lambda: _number(req, 7), MULTIKEY_NEEDLES)
    return _niah_task(req, list(zip(keys, values)), [req.rng.choice(keys)])


def _niah_multivalue(req: _Request) -> _Task:
    key = _key(req)
    values = _distinct(lambda: _number(req, 7), MULTIVALUE_VALUES)
    return _niah_task(req, [(key, value) for value in values], [key])


def _niah_multiquery(req: _Request) -> _Task:
    keys = _distinct(lambda: _key(req), MULTIQUERY_KEYS)
    values = _distinct(lambda: _number(req, 7), MULTIQUERY_KEYS)
    return _niah_task(req, list(zip(keys, values)), keys)


def _vt(req: _Request) -> _Task:
    names = _distinct(lambda: _variable(req), 2 * (VT_HOPS + 1))
    value, distractor = _distinct(lambda: _number(req, 5), 2)
    chains = [names[: VT_HOPS + 1], names[VT_HOPS + 1 :]]
    placed: list[tuple[float, str]] = []
    for chain, start in zip(chains, (value, distractor)):
        statements = [f"VAR {chain[0]} = {start}."] + [
            f"VAR {name} = VAR {previous}." for previous, name in zip(chain, chain[1:])
        ]
        placed += _place(req, statements, ordered=True)
    answer = chains[0]
    return _Task(
        instruction="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        question=f"Question: Find all variables that are assigned the value {value} in the text above.",
        answer=answer,
        reply=(
            "According to the chain(s) of variable assignment in the text above, "
            f"{len(answer)} variables are assigned the value {value}, they are: {' '.join(answer)}"
        ),
        context=lambda k: req.haystack.build(k, placed),
        meta={"value": value, "chains": chains, "depths": _depths(placed)},
    )


def _qa(req: _Request) -> _Task:
    people = [(name, attribute) for name in req.vocab.names for attribute in req.vocab.facts]
    facts = [
        (name, attribute, req.rng.choice(req.vocab.facts[attribute]))
        for name, attribute in req.rng.sample(people, QA_FACTS)
    ]
    name, attribute, value = req.rng.choice(facts)
    placed = _place(req, [f"The {a} of {n} is {v}." for n, a, v in facts])
    instruction = (
        "Answer the question based on the given documents. "
        "Only give me the answer and do not output any other words."
    )
    return _Task(
        instruction=instruction + "\n\nThe following are given documents.",
        question=f"{instruction}\n\nQuestion: What is the {attribute} of {name}?",
        answer=[value],
        reply=value,
        context=lambda k: req.haystack.build(k, placed),
        meta={
            "facts": [list(fact) for fact in facts],
            "asked": [name, attribute],
            "depths": _depths(placed),
        },
    )


def _cwe(req: _Request) -> _Task:
    vocab = list(req.vocab.list_words)
    req.rng.shuffle(vocab)
    common, pool = vocab[:CWE_TOP_K], vocab[CWE_TOP_K:]
    shuffle_seed = req.rng.random()
    tokens_per_item = req.count(_numbered(pool[:100])) / min(100, len(pool))
    common_freq, rare_freq = _cwe_frequencies(req.target_tokens / tokens_per_item, len(pool))

    def context(n_rare: int) -> str:
        items = common * common_freq + pool[:n_rare] * rare_freq
        random.Random(shuffle_seed).shuffle(items)
        return _numbered(items)

    return _Task(
        instruction=(
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often."
        ),
        question=f"Question: What are the {CWE_TOP_K} most common words in the above list?",
        answer=common,
        reply=f"The top {CWE_TOP_K} words that appear most often in the list are: {', '.join(common)}",
        context=context,
        max_units=len(pool),
        meta={"common_freq": common_freq, "rare_freq": rare_freq},
    )


def _numbered(items: Sequence[str]) -> str:
    return " ".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def _cwe_frequencies(n_items: float, n_pool: int) -> tuple[int, int]:
    """(common, rare) word frequencies: RULER's 30 and 3, scaled down for short lists and up when
    the rare-word pool alone cannot fill the list."""
    rare = max(3, math.ceil(0.7 * n_items / n_pool))
    common = max(rare + 3, min(10 * rare, round(0.3 * n_items / CWE_TOP_K)))
    return common, rare


TASKS: dict[str, Callable[[_Request], _Task]] = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "niah_multiquery": _niah_multiquery,
    "vt": _vt,
    "cwe": _cwe,
    "qa": _qa,
}


# ---------------------------------------------------------------------------- sampling


def make_ruler(
    tokenizer: Any,
    n: int,
    split: str,
    seed: int,
    target_tokens: int,
    tasks: Sequence[str] | None = None,
    haystack: str = DEFAULT_HAYSTACK,
) -> list[TextSample]:
    """`n` RULER samples of about `target_tokens` tokens, cycling through `tasks` (default: all of TASKS).

    haystack: "filler" (RULER's repeated "The grass is green. ..."), "prose" (the split's
    `pydoc_data.topics` text) or "repeat" (one plain sentence of that text, drawn per sample, repeated: the
    filler a model may echo once much of it is kept). cwe ignores it: its context is the word list.
    """
    check_request(n, split, target_tokens)
    names = check_ruler_options(tasks, haystack)
    return [
        _make_one(tokenizer, names[index % len(names)], split, seed, index, target_tokens, haystack)
        for index in range(n)
    ]


def score_answer(prediction: str, sample: TextSample | dict[str, Any]) -> float:
    """RULER string match: the fraction of expected answers found in `prediction`, case-insensitive.

    `sample` is a TextSample or a dict with an "answer" list (e.g. a trace's meta).
    """
    answers = sample.answer if isinstance(sample, TextSample) else sample["answer"]
    if not answers:
        raise ValueError("sample has no expected answers to score (only ruler samples have them)")
    found = sum(answer.lower() in prediction.lower() for answer in answers)
    return found / len(answers)


def check_ruler_options(tasks: Sequence[str] | None, haystack: str) -> list[str]:
    """The task names `make_ruler` cycles through (default: all of TASKS); a ValueError naming a wrong task list or
    haystack."""
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in TASKS]
    if not names or unknown:
        raise ValueError(f"tasks must be a non-empty list drawn from {sorted(TASKS)}, got {tasks!r}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    return names


@lru_cache(maxsize=None)
def plain_sentences(split: str) -> tuple[str, ...]:
    """The sentences of 5-24 plain words (letters, digits, commas, apostrophes) in the split's documentation and
    not in the other split's (train and test share a few)."""

    def sentences(name: str) -> set[str]:
        found = re.split(r"(?<=\.)\s+", prose_corpus(name).text)
        return {s for s in found if re.fullmatch(r"[A-Z][A-Za-z0-9 ,']*[a-z]\.", s) and 5 <= len(s.split()) <= 24}

    return tuple(sorted(sentences(split) - sentences("test" if split == "train" else "train")))


def _make_haystack(kind: str, split: str, rng: random.Random) -> Haystack:
    if kind == "filler":
        return Haystack(FILLER, " ")
    if kind == "repeat":
        return Haystack((rng.choice(plain_sentences(split)),), " ")
    lines = prose_corpus(split).text.split("\n")
    return Haystack(lines, "\n", rng.randrange(len(lines)))


def _make_one(
    tokenizer: Any, name: str, split: str, seed: int, index: int, target_tokens: int, haystack: str
) -> TextSample:
    rng = sample_rng("ruler", split, seed, index)
    req = _Request(
        rng=rng,
        split=split,
        vocab=vocabulary(split),
        haystack=_make_haystack(haystack, split, rng),
        target_tokens=target_tokens,
        count=lambda text: count_tokens(tokenizer, text),
    )
    task = TASKS[name](req)

    def render(n_units: int) -> tuple[str, int, int]:
        user = f"{task.instruction}\n\n{task.context(n_units)}\n\n{task.question}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": task.reply}]
        text = render_messages(tokenizer, messages)
        user_start, answer_start = content_starts(text, messages)
        return text, user_start + len(user) - len(task.question), answer_start

    n_units = fit_units(
        lambda k: req.count(render(k)[0]), target_tokens, f"task {name!r}", task.max_units
    )
    text, question_start, answer_start = render(n_units)
    meta = {
        "seed": seed,
        "index": index,
        "haystack": "list" if name == "cwe" else haystack,
        "haystack_units": n_units,
        "target_tokens": target_tokens,
        "n_tokens": req.count(text),
        **task.meta,
    }
    return TextSample(text, "ruler", name, split, task.answer, question_start, answer_start, meta)
