"""Multi-turn dialogues: the project's user prompts, assistant turns sampled from the instruct model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from .common import (
    Message,
    check_request,
    content_starts,
    count_tokens,
    render_messages,
    sample_rng,
    split_of,
    torch_seed,
    truncate_to_tokens,
)
from .sample import TextSample
from .topics import TOPICS, Topic

MIN_REPLY_TOKENS = 16  # no new user turn unless the reply gets at least this many tokens


def dialogue_topics(split: str) -> list[Topic]:
    """The topics of a split (train and test share none)."""
    return [topic for topic in TOPICS if split_of(topic.title) == split]


def make_dialogues(
    model: Any, tokenizer: Any, n: int, split: str, seed: int, target_tokens: int, **options: Any
) -> list[TextSample]:
    """`n` dialogues of about `target_tokens` tokens (never more): ``make_dialogue`` at indices 0..n-1
    (``options``: its max_new_tokens, temperature, top_p).

    Each dialogue walks a seeded order of the split's topics, asking each topic's user turns in order;
    the model answers every turn (seeded sampling). Turns stop when the next reply would not get
    MIN_REPLY_TOKENS; the rendered text is then cut to `target_tokens`.
    question_start/answer_start point at the last user and assistant turns; meta["message_starts"]
    lists [role, char offset] for every turn.
    """
    check_request(n, split, target_tokens)
    return [make_dialogue(model, tokenizer, split, seed, index, target_tokens, **options) for index in range(n)]


def make_dialogue(
    model: Any,
    tokenizer: Any,
    split: str,
    seed: int,
    index: int,
    target_tokens: int,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
) -> TextSample:
    """Dialogue number ``index`` of ``make_dialogues`` (each is seeded by its index alone: a set can be made
    one dialogue at a time, and resumed)."""
    dialogue = Dialogue(tokenizer, split, seed, index, target_tokens)
    sampling = _sampling(model, temperature, top_p)
    conversation = ConversationCache()
    while (prompt_ids := dialogue.next_prompt()) is not None:
        torch.manual_seed(torch_seed("dialogue", split, seed, index, dialogue.turn))
        limit = min(max_new_tokens, dialogue.room(prompt_ids))
        dialogue.add_reply(_generate(model, tokenizer, prompt_ids, limit, sampling, conversation))
    return dialogue.sample()


def make_dialogue_group(
    model: Any,
    tokenizer: Any,
    split: str,
    seed: int,
    indices: list[int],
    target_tokens: int,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    on_tokens: Callable[[int], None] | None = None,
) -> list[TextSample]:
    """The dialogues ``indices`` written together, as one batch that streams: each step feeds every unfinished
    dialogue one token, the next of its open prompt or of its sampled reply (``_write_together``). So one weight
    read serves the whole group at every step, no turn prefills the conversation again and no dialogue waits for
    another's reply to end (``benchmarks/dialogue_batch.py``). Seeded by the group: the same group gives the same
    dialogues; sampled ones differ from ``make_dialogue``'s at the same indices (another random stream), greedy
    ones (``temperature=0``) are the same. ``on_tokens`` gets the tokens fed at every step (progress: the group
    feeds about ``len(indices) * target_tokens``)."""
    dialogues = [Dialogue(tokenizer, split, seed, index, target_tokens) for index in indices]
    sampling = _sampling(model, temperature, top_p)
    generator = torch.Generator().manual_seed(torch_seed("dialogue group", split, seed, *indices))
    _write_together(model, tokenizer, dialogues, max_new_tokens, sampling, generator, on_tokens)
    return [dialogue.sample() for dialogue in dialogues]


def _sampling(model: Any, temperature: float, top_p: float) -> dict[str, Any]:
    """``generate``'s settings for the replies (top-k 50 is its default); ``temperature=0`` is greedy. The
    model must be given (it writes them)."""
    if model is None:
        raise ValueError("model is required for source 'dialogue' (it writes the assistant turns)")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got temperature={temperature}, top_p={top_p}")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": 50, "top_p": top_p}


class Dialogue:
    """One dialogue being written: its user turns in a seeded topic order, the messages so far.
    ``next_prompt`` asks the next user turn; the caller's model answers it through ``add_reply``."""

    def __init__(self, tokenizer: Any, split: str, seed: int, index: int, target_tokens: int) -> None:
        check_request(index + 1, split, target_tokens)
        self.tokenizer, self.split, self.seed, self.index, self.target_tokens = tokenizer, split, seed, index, target_tokens
        self.user_turns: Iterator[tuple[str, str]] = _user_turns(split, seed, index)
        self.messages: list[Message] = []
        self.titles: list[str] = []
        self.turn = 0  # replies so far
        self.asked: tuple[str, list[Message]] | None = None  # (topic title, messages with the open user turn)

    def next_prompt(self) -> list[int] | None:
        """The conversation with the next user turn, rendered for the reply (token ids), or None when the
        turns are over or the next reply would get fewer than MIN_REPLY_TOKENS."""
        title, prompt = next(self.user_turns, (None, None))
        if title is None:
            return None
        asked = self.messages + [{"role": "user", "content": prompt}]
        prompt_ids = self.tokenizer(
            render_messages(self.tokenizer, asked, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        if self.room(prompt_ids) < MIN_REPLY_TOKENS:
            self.user_turns = iter(())  # over: a later, shorter turn must not slip in
            return None
        self.asked = (title, asked)
        return prompt_ids

    def room(self, prompt_ids: list[int]) -> int:
        """Tokens left for the reply to ``prompt_ids``."""
        return self.target_tokens - len(prompt_ids)

    def add_reply(self, reply: str) -> None:
        """The assistant's reply to the open user turn."""
        if self.asked is None:
            raise RuntimeError("add_reply without an open user turn: call next_prompt first")
        title, asked = self.asked
        self.messages, self.asked = asked + [{"role": "assistant", "content": reply}], None
        if title not in self.titles:
            self.titles.append(title)
        self.turn += 1

    def sample(self) -> TextSample:
        """The finished dialogue, rendered and cut to ``target_tokens``."""
        if not self.messages:
            raise ValueError(
                f"target_tokens={self.target_tokens} is too small for source 'dialogue': "
                f"the first user turn leaves no room for a reply of {MIN_REPLY_TOKENS} tokens"
            )
        full = render_messages(self.tokenizer, self.messages)
        starts = content_starts(full, self.messages)
        text = truncate_to_tokens(self.tokenizer, full, self.target_tokens)
        meta = {
            "seed": self.seed,
            "index": self.index,
            "target_tokens": self.target_tokens,
            "n_tokens": count_tokens(self.tokenizer, text),
            "topics": self.titles,
            "turns": len(self.messages) // 2,
            "message_starts": [[m["role"], s] for m, s in zip(self.messages, starts) if s <= len(text)],
        }
        question_start, answer_start = (min(start, len(text)) for start in starts[-2:])
        return TextSample(text, "dialogue", "dialogue", self.split, [], question_start, answer_start, meta)


def _user_turns(split: str, seed: int, index: int) -> Iterator[tuple[str, str]]:
    """(topic title, user prompt) in a seeded topic order, each topic's turns in sequence."""
    topics = dialogue_topics(split)
    sample_rng("dialogue", split, seed, index).shuffle(topics)
    for topic in topics:
        for turn in topic.turns:
            yield topic.title, turn


class ConversationCache:
    """The model's KV cache of the conversation so far and the token ids it holds, so that each turn
    prefills only what it adds: the replies of a fresh prefill per turn (all 48 of the smollm2 recipe's, byte for
    byte) in 6-19% less time."""

    def __init__(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.ids: list[int] = []

    def for_prompt(self, prompt_ids: list[int]) -> Any:
        """The cache, cut back to the longest prefix of ``prompt_ids`` it holds (leaving at least one token to prefill)."""
        surplus = self.cache.get_seq_length() - _shared_prefix(self.ids, prompt_ids[:-1])
        if surplus > 0:
            self.cache.crop(-surplus)
        return self.cache


def _generate(
    model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int, sampling: dict[str, Any],
    conversation: ConversationCache,
) -> str:
    """One sampled assistant reply to the rendered conversation `prompt_ids`, continuing ``conversation``'s cache."""
    input_ids = torch.tensor([prompt_ids], device=model.device)
    eos = tokenizer.eos_token_id
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        cache=conversation.for_prompt(prompt_ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        **sampling,
    )
    conversation.ids = output[0].tolist()
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def _write_together(
    model: Any, tokenizer: Any, dialogues: list[Dialogue], max_new_tokens: int, sampling: dict[str, Any],
    generator: torch.Generator, on_tokens: Callable[[int], None] | None = None,
) -> None:
    """Writes every reply of ``dialogues`` in one streaming batch. Each step, every open row feeds one token at
    the next position of its own sequence: a prompt token (forced) or the reply token sampled from its last step.
    A finished reply goes to its dialogue, whose next prompt re-renders the conversation: the row keeps the
    cache slots that prompt shares with what it holds and masks the rest out (re-tokenizing a reply may differ
    from the sampled ids). A finished dialogue leaves the batch."""
    from kvp_gym.models.growing_cache import growing_cache

    rows = [row for row in (_Row(dialogue, tokenizer, max_new_tokens) for dialogue in dialogues) if row.ask()]
    tokens = [row.pending.pop(0) for row in rows]
    cache = growing_cache()
    mask = torch.zeros(len(rows), 0, dtype=torch.long, device=model.device)
    while rows:
        column = mask.shape[1]
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long, device=model.device)], dim=1)
        positions = torch.tensor([[len(row.held)] for row in rows], device=model.device)
        for row, token in zip(rows, tokens):
            row.held.append(token)
            row.columns.append(column)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(tokens, device=model.device)[:, None], attention_mask=mask,
                           position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits
        sampled = _sample(logits[:, -1].float(), sampling, generator).tolist()
        if on_tokens is not None:
            on_tokens(len(rows))
        tokens, kept = [], []
        for i, row in enumerate(rows):
            token = row.next_token(sampled[i])
            if token is not None:
                mask[i, row.dropped] = 0
                tokens.append(token)
                kept.append(i)
        if len(kept) < len(rows):
            rows = [rows[i] for i in kept]
            mask = mask[kept]
            if rows:
                cache.batch_select_indices(torch.tensor(kept, device=model.device))


class _Row:
    """One dialogue in a streaming batch: the token ids its live cache slots hold and their columns, the prompt
    tokens still to feed, and the reply being sampled."""

    def __init__(self, dialogue: Dialogue, tokenizer: Any, max_new_tokens: int) -> None:
        self.dialogue, self.tokenizer, self.max_new_tokens = dialogue, tokenizer, max_new_tokens
        self.held: list[int] = []
        self.columns: list[int] = []
        self.dropped: list[int] = []  # columns masked out by the last prompt
        self.pending: list[int] = []
        self.reply: list[int] = []
        self.limit = 0

    def ask(self) -> bool:
        """Opens the dialogue's next turn (False when it is over): keeps the slots the new prompt shares with
        what the row holds (at least one prompt token is left to feed), drops the rest."""
        prompt_ids = self.dialogue.next_prompt()
        if prompt_ids is None:
            return False
        shared = _shared_prefix(self.held, prompt_ids[:-1])
        self.dropped = self.columns[shared:]
        del self.held[shared:], self.columns[shared:]
        self.pending, self.reply = prompt_ids[shared:], []
        self.limit = min(self.max_new_tokens, self.dialogue.room(prompt_ids))
        return True

    def next_token(self, sampled: int) -> int | None:
        """The token to feed next, given the one sampled after the last fed; None when the dialogue is over."""
        self.dropped = []
        if self.pending:
            return self.pending.pop(0)
        if sampled != self.tokenizer.eos_token_id:
            self.reply.append(sampled)
            if len(self.reply) < self.limit:
                return sampled
        self.dialogue.add_reply(self.tokenizer.decode(self.reply, skip_special_tokens=True).strip())
        return self.pending.pop(0) if self.ask() else None


def _sample(logits: torch.Tensor, sampling: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] as ``generate`` samples it: temperature, then top-k, then top-p
    (the smallest set of the most likely tokens whose probability reaches top_p); argmax when greedy. -> [B]"""
    if not sampling["do_sample"]:
        return logits.argmax(dim=-1)
    top = (logits / sampling["temperature"]).topk(min(sampling["top_k"], logits.shape[-1]), dim=-1)
    probs = top.values.softmax(dim=-1)
    outside = probs.cumsum(dim=-1) - probs >= sampling["top_p"]
    probs = probs.masked_fill(outside, 0)
    return top.indices.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)


def _shared_prefix(held: list[int], wanted: list[int]) -> int:
    """How many leading ids ``held`` and ``wanted`` have in common."""
    shared = 0
    for a, b in zip(held, wanted):
        if a != b:
            break
        shared += 1
    return shared
