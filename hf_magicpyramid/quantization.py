"""int8 for CPU inference: dynamic quantization of every `nn.Linear` of a classifier, Magic Pyramid or stock.

Which library, and why: `torch.ao.quantization.quantize_dynamic` (int8 weights, activations quantized on the fly per
call, fbgemm/x86 kernels). Checked with the pinned torch 2.13 (CPU wheel) on the fine-tuned all-MiniLM-L6-v2, batch 32 ×
32 tokens, one thread, on a loaded machine (rough, the lead re-measures on an idle one):

| path | median time | max logit change vs fp32 |
| --- | --- | --- |
| fp32 | 0.28 s | - |
| `torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, torch.qint8)` | 0.16 s (1.7x) | 0.38 |
| torchao 0.18 `quantize_(model, Int8DynamicActivationInt8WeightConfig())`, eager | 0.35 s (0.8x: slower) | 0.06 |

torchao is the announced successor, and more accurate, but in eager mode on CPU it has no fast int8 kernel: its tensor
subclass dequantizes, so it is slower than fp32 (it is meant to be paired with `torch.compile`; whether compiling pays
for our variable-shape layer loop on CPU is what the bench command's compiled lines measure). It is not installed here
and not a dependency. `torch.ao.quantization`
warns that it is deprecated (it is still in torch 2.13); the warning is silenced inside `quantize_model` only, and a
future torch without it gives a clear error here, not an `AttributeError` deep in a call.

int8 moves the exits' confidences: calibrate the quantized model (`hf-magicpyramid sweep --quantize int8`), which stores
its own speed point (see calibration.py) so that an fp32 load never uses int8-calibrated thresholds silently.

A quantized model is for inference only: it cannot be trained or saved with `save_pretrained` (packed int8 weights).
Save the fp32 model and quantize after loading (`load_quantized`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

QUANTIZATION_METHODS = ("int8",)
_QUANTIZED_ATTRIBUTE = "quantization"  # set on the returned model: which method produced it


def check_method(method: str | None) -> str | None:
    """`method` if it is a known quantization method (or None for none), else a one-line `ValueError`."""
    if method is None or method in QUANTIZATION_METHODS:
        return method
    raise ValueError(f"Unknown quantization method {method!r}: use one of {', '.join(QUANTIZATION_METHODS)} (or none).")


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """A quantized copy of `model` for CPU inference; `model` itself is left unchanged.

    `method="int8"`: every `nn.Linear` (attention projections, feed-forward, pooler, exit heads, classifier) gets int8
    weights and dynamically quantized activations; embeddings and LayerNorms stay fp32. Works on
    `MagicPyramidForSequenceClassification` (exits and token pruning run as before: the importance scores read the
    quantized q/K projections' outputs) and on any stock `AutoModelForSequenceClassification`. The copy is in eval mode
    and has `.quantization == method`.
    """
    check_method(method)
    if method is None:
        raise ValueError("quantize_model needs a method: use one of " + ", ".join(QUANTIZATION_METHODS) + ".")
    if getattr(model, _QUANTIZED_ATTRIBUTE, None):
        raise ValueError(f"This model is already quantized ({getattr(model, _QUANTIZED_ATTRIBUTE)}): quantize the fp32 model once.")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError(f"int8 dynamic quantization runs on CPU only; the model is on {next(model.parameters()).device}: call .cpu() first.")
    quantize_dynamic = getattr(getattr(torch, "ao", None), "quantization", None)
    quantize_dynamic = getattr(quantize_dynamic, "quantize_dynamic", None)
    if quantize_dynamic is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic: int8 needs torch <= 2.13.")
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.ao")
        quantized = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
    model.train(was_training)
    quantized.eval()
    setattr(quantized, _QUANTIZED_ATTRIBUTE, method)
    return quantized


def quantization_of(model: nn.Module) -> str | None:
    """The method `model` was quantized with by `quantize_model`, or None for an fp32 model."""
    return getattr(model, _QUANTIZED_ATTRIBUTE, None)


def load_quantized(path, method: str = "int8", **from_pretrained_kwargs) -> nn.Module:
    """Load a saved classifier (Magic Pyramid or stock) with `AutoModelForSequenceClassification` and quantize it.

    A Magic Pyramid folder swept with `hf-magicpyramid sweep --quantize int8` holds a speed calibrated for the int8
    model (`calibration_int8.json`): it is applied here, while config.json keeps the fp32 model's default for fp32 loads.
    Without one, the fp32-calibrated default speed is used, with a warning (int8 moves the exits' confidences, so the
    accuracy that speed was chosen for may not hold). Returns the quantized model, eval mode, on CPU.
    """
    from transformers import AutoModelForSequenceClassification

    check_method(method)
    model = AutoModelForSequenceClassification.from_pretrained(path, **from_pretrained_kwargs)
    quantized = quantize_model(model, method)
    apply_quantized_speed(quantized, path, method)
    return quantized


def apply_quantized_speed(quantized: nn.Module, path, method: str = "int8") -> None:
    """Give a Magic Pyramid model quantized from the folder `path` the speed calibrated for `method` there
    (`calibration_int8.json`, written by `sweep --quantize int8`); without one, keep the fp32 default and warn when it
    exits early. Stock models are left as they are."""
    from .calibration import quantized_default

    if not hasattr(quantized, "set_speed"):
        return
    setting = quantized_default(path, method)
    if setting is not None:
        quantized.set_speed(**setting)
    elif quantized.config.exit_threshold is not None or quantized.config.patience is not None:
        logger.warning(
            f"{path} has no speed calibrated for the {method} model (calibration_{method}.json): using the fp32 "
            f"default {quantized.config.exit_threshold=}, {quantized.config.patience=}. int8 moves the exits' "
            f"confidences; run `hf-magicpyramid sweep --model {path} --quantize {method} --max_drop ...` to calibrate it."
        )


__all__ = ["QUANTIZATION_METHODS", "check_method", "quantize_model", "quantization_of", "load_quantized", "apply_quantized_speed"]
