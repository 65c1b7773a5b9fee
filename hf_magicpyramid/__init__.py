"""hf-magicpyramid: early exits and token pruning for any BERT-family encoder, driven through stock Transformers modules.

Importing the package registers `MagicPyramidConfig` (model_type "magic_pyramid") with `AutoConfig`, `AutoModel` and
`AutoModelForSequenceClassification`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .adapters import ADAPTERS
from .configuration_magic_pyramid import MagicPyramidConfig
from .pipelines import register_text_classification_pipeline
from .quantization import load_quantized, quantize_model
from .modeling_magic_pyramid import (
    MagicPyramidClassifierOutput,
    MagicPyramidForSequenceClassification,
    MagicPyramidModel,
    MagicPyramidModelOutput,
    MagicPyramidPreTrainedModel,
)

__version__ = "0.1.0"

SUPPORTED_BACKBONES = tuple(sorted(ADAPTERS))

AutoConfig.register(MagicPyramidConfig.model_type, MagicPyramidConfig, exist_ok=True)
AutoModel.register(MagicPyramidConfig, MagicPyramidModel, exist_ok=True)
AutoModelForSequenceClassification.register(MagicPyramidConfig, MagicPyramidForSequenceClassification, exist_ok=True)

# `pipeline("text-classification", ...)` then takes the per-call speed knobs (exit_threshold=..., keep_ratio_scale=...).
register_text_classification_pipeline()

# So that save_pretrained / push_to_hub write the custom code and an `auto_map` for loading with trust_remote_code=True.
MagicPyramidConfig.register_for_auto_class()
MagicPyramidModel.register_for_auto_class("AutoModel")
MagicPyramidForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "MagicPyramidConfig",
    "MagicPyramidModel",
    "MagicPyramidForSequenceClassification",
    "MagicPyramidPreTrainedModel",
    "MagicPyramidClassifierOutput",
    "MagicPyramidModelOutput",
    "SUPPORTED_BACKBONES",
    "predict_file",
    "predict_texts",
    "quantize_model",
    "load_quantized",
]


def __getattr__(name):
    # `predict_file` / `predict_texts` load on first use: they need `datasets` (through .data), which the model does not.
    if name in ("predict_file", "predict_texts"):
        from . import predict

        return getattr(predict, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
