"""Models: load the embedded SmolLM2 (or a local checkpoint) and capture its post-RoPE Q/K/V."""

from kvp_gym.models.capture import CapturedQKV, capture_qkv, enable_capture
from kvp_gym.models.loading import DEFAULT_MODEL, embedded_gguf_path, load_model, model_name
from kvp_gym.models.spec import ModelSpec

__all__ = [
    "DEFAULT_MODEL",
    "CapturedQKV",
    "ModelSpec",
    "capture_qkv",
    "embedded_gguf_path",
    "enable_capture",
    "load_model",
    "model_name",
]
