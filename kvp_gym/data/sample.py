"""`TextSample`, the unit every text source produces, and its tokenization for later stages."""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True)
class TextSample:
    """One text fed to the model.

    text: the full string (context + question + answer; chat-formatted when the tokenizer has a template).
    source: "ruler", "dialogue", "prose", "docs" or "code"; task: e.g. "niah_single" (the source's name for the others).
    answer: the exact expected answers (empty for dialogue, prose and code).
    question_start: char offset in `text` where the question begins (dialogue: the last user turn;
        prose, code: len(text)). answer_start: char offset where the assistant answer begins (dialogue:
        the last assistant turn; prose, code: len(text)).
    meta: JSON-serialisable details (seed, index, token count, needle depths, topics, ...).
    """

    text: str
    source: str
    task: str
    split: str
    answer: list[str]
    question_start: int
    answer_start: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """What the model is given at evaluation: the text up to the answer."""
        return self.text[: self.answer_start]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields plus `prompt`."""
        return {**dataclasses.asdict(self), "prompt": self.prompt}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextSample:
        """Inverse of `to_dict` (the derived `prompt` is ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


class EncodedSample(NamedTuple):
    """Token ids of a sample and the token indices of its question and answer starts."""

    input_ids: list[int]
    question_token: int
    answer_token: int


def encode_sample(tokenizer: Any, sample: TextSample) -> EncodedSample:
    """Tokenize `sample.text` (no special tokens added) and map its char offsets to token indices.

    The token index of an offset is the first token ending after it (len(input_ids) for len(text)).
    Needs a fast tokenizer (offset mapping).
    """
    enc = tokenizer(sample.text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for _, end in enc["offset_mapping"]]
    return EncodedSample(
        input_ids=list(enc["input_ids"]),
        question_token=bisect.bisect_right(ends, sample.question_start),
        answer_token=bisect.bisect_right(ends, sample.answer_start),
    )
