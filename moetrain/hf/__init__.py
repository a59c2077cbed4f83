"""Hugging Face interoperability: import HF MoE checkpoints, export back, start training from HF
weights, greedy generation. Torch + safetensors format only (no Ray, no transformers at runtime).

Modules: ``arch`` (supported architectures, config mapping), ``tensors`` (tensor names and exact
conversions), ``safetensors_io`` (streaming shard reads / writes over ``pyarrow.fs``),
``convert`` (import), ``export``, ``load`` (init_from, loading checkpoints), ``generate``.
"""

from moetrain.hf.arch import ARCHS, SUPPORTED, arch_of, hf_config_from_model, model_config_from_hf
from moetrain.hf.convert import ConvertReport, import_hf
from moetrain.hf.errors import HFError
from moetrain.hf.export import export_hf
from moetrain.hf.load import load_hf_weights, model_from_checkpoint, resolve_init_from

__all__ = [
    "ARCHS",
    "SUPPORTED",
    "ConvertReport",
    "HFError",
    "arch_of",
    "export_hf",
    "hf_config_from_model",
    "import_hf",
    "load_hf_weights",
    "model_config_from_hf",
    "model_from_checkpoint",
    "resolve_init_from",
]
