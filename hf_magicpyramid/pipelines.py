"""A `text-classification` pipeline that takes Magic Pyramid's per-call speed knobs.

The stock `TextClassificationPipeline` hands every keyword it does not know to the tokenizer, which ignores unknown ones
silently: `pipe(texts, exit_threshold=0.0)` would give the default scores. This subclass routes the knobs to the
model's forward instead (as `forward_params`, per call: the next call without them runs at the model's own speed).
`import hf_magicpyramid` makes it the implementation of the `text-classification` task, so the plain call works:

    import hf_magicpyramid
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model, tokenizer=tokenizer)
    pipe(texts, exit_threshold=0.2, keep_ratio_scale=2.0)

Everything else (`top_k`, `function_to_apply`, tokenizer options, batching) is the stock pipeline's.
"""

from __future__ import annotations

import difflib
import importlib
import inspect

from transformers.pipelines import TextClassificationPipeline

SPEED_KNOBS = ("exit_threshold", "patience", "keep_ratio_scale", "prune_threshold_offset")


class MagicPyramidTextClassificationPipeline(TextClassificationPipeline):
    """`TextClassificationPipeline` plus the speed knobs of `MagicPyramidForSequenceClassification.forward`."""

    def _sanitize_parameters(self, exit_threshold=None, patience=None, keep_ratio_scale=None, prune_threshold_offset=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        knobs = dict(
            exit_threshold=exit_threshold, patience=patience, keep_ratio_scale=keep_ratio_scale, prune_threshold_offset=prune_threshold_offset
        )
        knobs = {name: value for name, value in knobs.items() if value is not None}
        # A misspelt knob would otherwise reach the tokenizer, which ignores it.
        for name in preprocess_params:
            close = difflib.get_close_matches(name, SPEED_KNOBS, n=1)
            if close:
                raise TypeError(f"The pipeline got an unexpected keyword argument {name!r}; did you mean {close[0]!r}?")
        if knobs:
            accepted = inspect.signature(self.model.forward).parameters
            refused = [name for name in knobs if name not in accepted]
            if refused:
                raise ValueError(
                    f"{', '.join(refused)} is a Magic Pyramid speed knob, but {type(self.model).__name__} does not take it; "
                    "load a MagicPyramidForSequenceClassification model."
                )
        forward_params.update(knobs)
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, **speed):
        if not speed:
            return super()._forward(model_inputs)
        return self.model(**model_inputs, **speed)


def register_text_classification_pipeline() -> None:
    """Make `pipeline("text-classification", ...)` build this class, so the plain call takes the speed knobs too.

    Only the implementation of the existing task entry is swapped (its default model and model classes stay). For any
    model called without the knobs the subclass is the stock pipeline; given the knobs, a model that does not take them
    is refused instead of silently running at its default.
    """
    from transformers.pipelines import PIPELINE_REGISTRY

    entry = PIPELINE_REGISTRY.supported_tasks.get("text-classification")
    if entry is None:
        return
    impl = entry["impl"]
    if isinstance(impl, str):  # transformers 5 keeps dotted paths, resolved at call time
        module, _, name = impl.rpartition(".")
        impl = getattr(importlib.import_module(module), name)
    # Only the stock class is replaced: another plugin's own registration is left as it is.
    if impl is TextClassificationPipeline:
        entry["impl"] = MagicPyramidTextClassificationPipeline


__all__ = ["MagicPyramidTextClassificationPipeline", "SPEED_KNOBS", "register_text_classification_pipeline"]
