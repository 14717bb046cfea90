"""Tests of the text sources (kvp_gym.data): lengths, splits, determinism, answers, chat format, errors."""

from __future__ import annotations

import collections
import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvp_gym.data import (
    TASKS,
    TextSample,
    count_tokens,
    dialogue_topics,
    encode_sample,
    make_dialogues,
    make_prose,
    make_ruler,
    make_samples,
    prose_topics,
    score_answer,
)
from kvp_gym.data.prose import prose_corpus
from kvp_gym.data.ruler import FILLER, plain_sentences, vocabulary

TARGET = 1024


@pytest.fixture(scope="module")
def tiny_llama():
    """A random 2-layer Llama with SmolLM2's vocabulary: gibberish text, real generation mechanics."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ruler_samples(smol_tokenizer):
    """One sample of every task for each split (filler haystack)."""
    return {
        split: make_ruler(smol_tokenizer, len(TASKS), split, seed=0, target_tokens=TARGET)
        for split in ("train", "test")
    }


def _check_layout(sample: TextSample, tokenizer, target: int) -> None:
    """Length within target, offsets consistent, chat template used."""
    n_tokens = count_tokens(tokenizer, sample.text)
    assert n_tokens == sample.meta["n_tokens"]
    assert 0.95 * target <= n_tokens <= target
    assert 0 < sample.question_start < sample.answer_start <= len(sample.text)
    assert sample.text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n" in sample.text
    assert sample.prompt == sample.text[: sample.answer_start]
    assert sample.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------- ruler


def test_ruler_cycles_through_every_task(ruler_samples):
    for samples in ruler_samples.values():
        assert [s.task for s in samples] == list(TASKS)
        assert all(s.source == "ruler" and s.answer for s in samples)


@pytest.mark.parametrize("split", ["train", "test"])
def test_ruler_layout_length_and_answers_in_context(ruler_samples, smol_tokenizer, split):
    for sample in ruler_samples[split]:
        assert sample.split == split
        _check_layout(sample, smol_tokenizer, TARGET)
        context = sample.text[: sample.question_start]
        assert all(answer in context for answer in sample.answer), sample.task
        assert sample.text[sample.question_start :].startswith(("What", "Question", "Answer"))
        reply = sample.text[sample.answer_start :]
        assert score_answer(reply, sample) == 1.0


def test_ruler_haystack_is_repeated_filler(ruler_samples):
    sample = ruler_samples["train"][0]
    assert sample.text.count(FILLER[0]) > 20


def test_ruler_prose_haystack_uses_split_documentation(smol_tokenizer):
    for split, other in (("train", "test"), ("test", "train")):
        (sample,) = make_ruler(smol_tokenizer, 1, split, 0, TARGET, tasks=["qa"], haystack="prose")
        _check_layout(sample, smol_tokenizer, TARGET)
        assert FILLER[0] not in sample.text
        context = sample.text[: sample.question_start]
        lines = [line for line in context.split("\n") if len(line) > 40 and not line.startswith("The ")]
        assert sum(line in prose_corpus(split).text for line in lines) > len(lines) // 2
        assert sum(line in prose_corpus(other).text for line in lines) < len(lines) // 2
        assert sample.meta["haystack"] == "prose"


def test_ruler_repeat_haystack_repeats_one_sentence_of_its_split(smol_tokenizer):
    assert not set(plain_sentences("train")) & set(plain_sentences("test"))
    for split in ("train", "test"):
        samples = make_ruler(smol_tokenizer, 3, split, 0, TARGET, tasks=["niah_single"], haystack="repeat")
        for sample in samples:
            _check_layout(sample, smol_tokenizer, TARGET)
            sentence = next(s for s in plain_sentences(split) if s in sample.text)
            assert sample.text.count(sentence) == sample.meta["haystack_units"] > 10
            assert sample.meta["haystack"] == "repeat"
        assert len({next(s for s in plain_sentences(split) if s in sample.text) for sample in samples}) > 1


def test_ruler_is_deterministic_and_seeded(smol_tokenizer, ruler_samples):
    again = make_ruler(smol_tokenizer, len(TASKS), "train", 0, TARGET)
    assert [s.text for s in again] == [s.text for s in ruler_samples["train"]]
    other_seed = make_ruler(smol_tokenizer, len(TASKS), "train", 1, TARGET)
    assert all(a.text != b.text for a, b in zip(other_seed, again))
    # sample i does not depend on n
    assert make_ruler(smol_tokenizer, 1, "train", 0, TARGET)[0].text == again[0].text


def test_ruler_needle_depth_varies(smol_tokenizer):
    samples = make_ruler(smol_tokenizer, 6, "train", 0, 512, tasks=["niah_single"])
    depths = {s.meta["depths"][0] for s in samples}
    assert len(depths) == 6 and min(depths) < 0.5 < max(depths)


def test_ruler_splits_use_disjoint_vocabularies(ruler_samples):
    train, test = vocabulary("train"), vocabulary("test")
    for name in ("adjectives", "nouns", "list_words", "names"):
        assert getattr(train, name) and getattr(test, name)
        assert not set(getattr(train, name)) & set(getattr(test, name))
    keys = {
        split: {key for s in samples if "keys" in s.meta for key in s.meta["keys"]}
        for split, samples in ruler_samples.items()
    }
    answers = {split: {a for s in samples for a in s.answer} for split, samples in ruler_samples.items()}
    assert not keys["train"] & keys["test"]
    assert not answers["train"] & answers["test"]


def test_ruler_multikey_asks_one_of_many_keys(ruler_samples):
    sample = ruler_samples["train"][list(TASKS).index("niah_multikey")]
    assert len(sample.meta["keys"]) > 4 and len(sample.answer) == 1
    for key in sample.meta["keys"]:
        assert f"for {key} is:" in sample.text


def test_ruler_multivalue_and_multiquery_answers(ruler_samples):
    by_task = {s.task: s for s in ruler_samples["test"]}
    multivalue, multiquery = by_task["niah_multivalue"], by_task["niah_multiquery"]
    assert len(set(multivalue.meta["keys"])) == 1 and len(multivalue.answer) > 1
    assert len(multiquery.meta["asked"]) == len(multiquery.answer) > 1
    question = multiquery.text[multiquery.question_start : multiquery.answer_start]
    assert all(key in question for key in multiquery.meta["asked"])


def test_ruler_variable_tracking_chain(ruler_samples):
    sample = ruler_samples["train"][list(TASKS).index("vt")]
    context = sample.text[: sample.question_start]
    bindings = dict(re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", context))

    def resolve(name: str) -> str:
        while bindings[name] in bindings:
            name = bindings[name]
        return bindings[name]

    value = sample.meta["value"]
    assert sorted(name for name in bindings if resolve(name) == value) == sorted(sample.answer)
    assert len(bindings) > len(sample.answer)  # a distractor chain is there too


def test_ruler_common_words_are_the_most_frequent(ruler_samples):
    sample = ruler_samples["test"][list(TASKS).index("cwe")]
    context = sample.text[: sample.question_start]
    counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", context))
    top = {word for word, _ in counts.most_common(len(sample.answer))}
    assert top == set(sample.answer)
    assert min(counts[w] for w in sample.answer) > max(c for w, c in counts.items() if w not in top)


def test_ruler_qa_answer_is_the_asked_fact(ruler_samples):
    sample = ruler_samples["train"][list(TASKS).index("qa")]
    name, attribute = sample.meta["asked"]
    assert f"The {attribute} of {name} is {sample.answer[0]}." in sample.text[: sample.question_start]
    assert f"What is the {attribute} of {name}?" in sample.text[sample.question_start :]


def test_ruler_without_chat_template(smol_tokenizer, monkeypatch):
    monkeypatch.setattr(smol_tokenizer, "chat_template", None)
    (sample,) = make_ruler(smol_tokenizer, 1, "train", 0, 300, tasks=["niah_single"])
    assert sample.text.startswith("User: ") and "<|im_start|>" not in sample.text
    assert sample.prompt.endswith("Assistant: ")
    assert count_tokens(smol_tokenizer, sample.text) <= 300


# ---------------------------------------------------------------------------- scoring, encoding


def test_score_answer_is_case_insensitive_fraction():
    sample = TextSample("t", "ruler", "niah_multivalue", "train", ["12", "Teal", "34"], 0, 1)
    assert score_answer("12 and TEAL and 34", sample) == 1.0
    assert score_answer("only teal", sample) == pytest.approx(1 / 3)
    assert score_answer("nothing", {"answer": ["x"]}) == 0.0
    with pytest.raises(ValueError, match="no expected answers"):
        score_answer("x", TextSample("t", "prose", "prose", "train", [], 1, 1))


def test_encode_sample_maps_offsets_to_tokens(ruler_samples, smol_tokenizer):
    sample = ruler_samples["train"][0]
    encoded = encode_sample(smol_tokenizer, sample)
    assert len(encoded.input_ids) == sample.meta["n_tokens"]
    prompt_ids = smol_tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    assert encoded.answer_token == len(prompt_ids)
    assert encoded.input_ids[: encoded.answer_token] == prompt_ids
    question = smol_tokenizer.decode(encoded.input_ids[encoded.question_token : encoded.answer_token])
    assert question.startswith("What are all the special magic numbers")


def test_samples_are_json_serialisable(ruler_samples):
    sample = ruler_samples["test"][0]
    data = json.loads(json.dumps(sample.to_dict()))
    assert data["prompt"] == sample.prompt
    assert TextSample.from_dict(data) == sample


# ---------------------------------------------------------------------------- prose


def test_prose_windows(smol_tokenizer):
    samples = make_prose(smol_tokenizer, 3, "test", 0, 512)
    assert samples == make_prose(smol_tokenizer, 3, "test", 0, 512)
    assert samples[0].text != make_prose(smol_tokenizer, 1, "test", 1, 512)[0].text
    for sample in samples:
        assert (sample.source, sample.task, sample.answer) == ("prose", "prose", [])
        assert sample.answer_start == sample.question_start == len(sample.text)
        assert 0.95 * 512 <= count_tokens(smol_tokenizer, sample.text) <= 512
        assert sample.text in prose_corpus("test").text
        assert set(sample.meta["topics"]) <= set(prose_topics("test"))


def test_prose_topics_split_disjoint():
    train, test = set(prose_topics("train")), set(prose_topics("test"))
    assert train and test and not train & test
    assert len(test) < len(train)


# ---------------------------------------------------------------------------- dialogue


def test_dialogue_topics_split_disjoint():
    train, test = dialogue_topics("train"), dialogue_topics("test")
    assert len(train) + len(test) >= 60
    assert 0.1 <= len(test) / (len(train) + len(test)) <= 0.3
    assert not {t.title for t in train} & {t.title for t in test}
    assert all(len(t.turns) >= 3 for t in train + test)


def test_dialogue_mechanics_with_tiny_model(tiny_llama, smol_tokenizer):
    target = 200
    kwargs = dict(n=1, split="test", seed=0, target_tokens=target, model=tiny_llama, max_new_tokens=12)
    (sample,) = make_samples("dialogue", smol_tokenizer, **kwargs)
    assert (sample.source, sample.task, sample.split, sample.answer) == ("dialogue", "dialogue", "test", [])
    assert count_tokens(smol_tokenizer, sample.text) <= target
    assert sample.meta["turns"] >= 2
    assert sample.text.count("<|im_start|>assistant\n") == sample.meta["turns"]
    test_titles = {t.title for t in dialogue_topics("test")}
    assert set(sample.meta["topics"]) <= test_titles
    first_topic = next(t for t in dialogue_topics("test") if t.title == sample.meta["topics"][0])
    assert sample.text[sample.meta["message_starts"][0][1] :].startswith(first_topic.turns[0])
    assert sample.text[: sample.question_start].endswith("<|im_start|>user\n")
    assert sample.text[: sample.answer_start].endswith("<|im_start|>assistant\n")
    assert sample.question_start < sample.answer_start
    (again,) = make_samples("dialogue", smol_tokenizer, **kwargs)
    assert again.text == sample.text


def test_dialogue_turns_continue_the_cache_with_the_fresh_prefills_replies(tiny_llama, smol_tokenizer, monkeypatch):
    """Each turn prefills only what it adds to the conversation's cache; the replies are those of a fresh
    prefill of the whole conversation at every turn."""
    from kvp_gym.data import dialogue

    kwargs = dict(n=1, split="test", seed=0, target_tokens=200, model=tiny_llama, max_new_tokens=12)
    held = []
    continue_cache = dialogue.ConversationCache.for_prompt
    monkeypatch.setattr(dialogue.ConversationCache, "for_prompt",
                        lambda self, ids: held.append(self.cache.get_seq_length()) or continue_cache(self, ids))
    (continued,) = make_samples("dialogue", smol_tokenizer, **kwargs)
    assert held[0] == 0 and all(length > 0 for length in held[1:]) and len(held) >= 2  # turns 2+ reuse the cache
    monkeypatch.setattr(dialogue.ConversationCache, "for_prompt", lambda self, ids: type(self)().cache)
    (fresh,) = make_samples("dialogue", smol_tokenizer, **kwargs)
    assert fresh.text == continued.text and fresh.meta == continued.meta


def test_a_dialogue_group_writes_each_dialogue_as_if_alone(tiny_llama, smol_tokenizer, monkeypatch):
    """Greedy, the streaming batch writes every dialogue of the group exactly as it is written alone, though
    its rows drop re-tokenized slots and leave the batch at different steps; sampled, a group is the same on
    every run and follows its own indices' topic orders within the token budget."""
    from transformers import Cache

    from kvp_gym.data import dialogue, make_dialogue, make_dialogue_group

    target, indices = 200, [0, 1, 2]
    dropped, left = [], []
    ask, select = dialogue._Row.ask, Cache.batch_select_indices
    monkeypatch.setattr(dialogue._Row, "ask", lambda self: ask(self) and (dropped.append(len(self.dropped)) or True))
    monkeypatch.setattr(Cache, "batch_select_indices", lambda self, kept: left.append(len(kept)) or select(self, kept))
    greedy = make_dialogue_group(tiny_llama, smol_tokenizer, "test", 0, indices, target, max_new_tokens=12, temperature=0)
    alone = [make_dialogue(tiny_llama, smol_tokenizer, "test", 0, index, target, max_new_tokens=12, temperature=0)
             for index in indices]
    assert [sample.text for sample in greedy] == [sample.text for sample in alone]
    assert [sample.meta for sample in greedy] == [sample.meta for sample in alone]
    assert any(dropped), "no prompt re-tokenized a reply differently: the slot-dropping path went untested"
    assert left[:2] == [2, 1], "the rows should leave the batch one at a time"

    group = make_dialogue_group(tiny_llama, smol_tokenizer, "test", 0, indices, target, max_new_tokens=12)
    for index, sample in zip(indices, group):
        assert sample.meta["index"] == index and sample.meta["topics"][0] == alone[index].meta["topics"][0]
        assert count_tokens(smol_tokenizer, sample.text) <= target and sample.meta["turns"] >= 2
        assert sample.text.count("<|im_start|>assistant\n") == sample.meta["turns"]
    assert [sample.text for sample in group] != [sample.text for sample in greedy]
    again = make_dialogue_group(tiny_llama, smol_tokenizer, "test", 0, indices, target, max_new_tokens=12)
    assert [sample.text for sample in again] == [sample.text for sample in group]


@pytest.mark.slow
def test_dialogue_one_turn_with_smollm2(smol_tokenizer, smol_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)
    (sample,) = make_dialogues(model.eval(), smol_tokenizer, 1, "train", 0, 80, max_new_tokens=16)
    assert sample.meta["turns"] == 1
    reply = sample.text[sample.answer_start :]
    assert len(reply.split()) >= 3 and count_tokens(smol_tokenizer, sample.text) <= 80


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "wiki"}, "source must be one of"),
        ({"split": "validation"}, "split must be one of"),
        ({"n": 0}, "n must be a positive integer"),
        ({"target_tokens": 0}, "target_tokens must be a positive integer"),
        ({"target_tokens": 100}, "target_tokens=100 is too small for task 'niah_multikey'"),
        ({"tasks": ["niah_huge"]}, "tasks must be"),
        ({"haystack": "web"}, "haystack must be one of"),
        ({"source": "dialogue"}, "model is required"),
        ({"source": "prose", "target_tokens": 10**7}, "target_tokens=10000000 exceeds"),
    ],
)
def test_bad_requests_raise_clear_errors(smol_tokenizer, kwargs, match):
    request = {"source": "ruler", "n": 1, "split": "train", "seed": 0, "target_tokens": 512}
    request.update(kwargs)
    if request["source"] == "ruler" and "tasks" not in request:
        request["tasks"] = ["niah_multikey"]
    with pytest.raises(ValueError, match=match):
        make_samples(tokenizer=smol_tokenizer, **request)


def test_dialogue_target_too_small(tiny_llama, smol_tokenizer):
    with pytest.raises(ValueError, match="target_tokens=20 is too small for source 'dialogue'"):
        make_dialogues(tiny_llama, smol_tokenizer, 1, "train", 0, 20)
