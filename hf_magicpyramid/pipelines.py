"""A `text-classification` pipeline that takes Magic Pyramid's per-call speed knobs.

The stock `TextClassificationPipeline` hands every keyword it does not know to the tokenizer, which ignores unknown ones
silently: `pipe(texts, exit_threshold=0.0)` would give the default scores. This subclass routes the knobs to the
model's forward instead (as `forward_params`, per call: the next call without them runs at the model's own speed):

    from transformers import pipeline
    from hf_magicpyramid.pipelines import MagicPyramidTextClassificationPipeline

    pipe = pipeline("text-classification", model=model, tokenizer=tokenizer,
                    pipeline_class=MagicPyramidTextClassificationPipeline)
    pipe(texts, exit_threshold=0.2, keep_ratio_scale=2.0)

Everything else (`top_k`, `function_to_apply`, tokenizer options, batching) is the stock pipeline's.
"""

from __future__ import annotations

import difflib
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
        return self.model(**model_inputs, **speed)


__all__ = ["MagicPyramidTextClassificationPipeline", "SPEED_KNOBS"]
