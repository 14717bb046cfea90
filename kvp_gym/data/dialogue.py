"""Multi-turn dialogues: the project's user prompts, assistant turns sampled from the instruct model."""

from __future__ import annotations

from collections.abc import Iterator
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
) -> list[TextSample]:
    """The dialogues ``indices`` written together: each turn, the model answers all of them as one batch
    (one decoding step reads the weights once for the whole batch; each turn prefills the whole conversation
    again, and a batch decodes until its longest reply ends: 1.8x faster per dialogue at 12 on one CPU thread,
    ``benchmarks/dialogue_batch.py``). Seeded by the group: the same group gives the same dialogues, but they
    differ from ``make_dialogue``'s at the same indices (another random stream, and batched arithmetic)."""
    dialogues = [Dialogue(tokenizer, split, seed, index, target_tokens) for index in indices]
    sampling = _sampling(model, temperature, top_p)
    prompts = [dialogue.next_prompt() for dialogue in dialogues]
    turn = 0
    while active := [i for i, prompt_ids in enumerate(prompts) if prompt_ids is not None]:
        torch.manual_seed(torch_seed("dialogue group", split, seed, *indices, turn))
        limits = [min(max_new_tokens, dialogues[i].room(prompts[i])) for i in active]
        replies = _generate_batch(model, tokenizer, [prompts[i] for i in active], limits, sampling)
        for i, reply in zip(active, replies):
            dialogues[i].add_reply(reply)
            prompts[i] = dialogues[i].next_prompt()
        turn += 1
    return [dialogue.sample() for dialogue in dialogues]


def _sampling(model: Any, temperature: float, top_p: float) -> dict[str, Any]:
    """``generate``'s sampling settings for the replies; the model must be given (it writes them)."""
    if model is None:
        raise ValueError("model is required for source 'dialogue' (it writes the assistant turns)")
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


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
        shared = 0
        for held, wanted in zip(self.ids, prompt_ids[:-1]):
            if held != wanted:
                break
            shared += 1
        surplus = self.cache.get_seq_length() - shared
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


def _generate_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: list[int], sampling: dict[str, Any]
) -> list[str]:
    """Sampled replies to several rendered conversations ``prompts``, left-padded into one batch; reply i
    is cut to ``max_new_tokens[i]`` tokens."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = max(len(prompt_ids) for prompt_ids in prompts)
    input_ids = torch.tensor([[pad] * (width - len(prompt_ids)) + prompt_ids for prompt_ids in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(prompt_ids)) + [1] * len(prompt_ids) for prompt_ids in prompts],
                                  device=model.device)
    output = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max(max_new_tokens),
                            eos_token_id=eos, pad_token_id=pad, **sampling)
    return [tokenizer.decode(row[width : width + limit], skip_special_tokens=True).strip()
            for row, limit in zip(output, max_new_tokens)]
