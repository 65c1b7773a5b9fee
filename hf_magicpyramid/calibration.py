"""Calibrating the speed knobs of a trained Magic Pyramid model on validation data, and the `calibration.json` format.

One forward with `output_all_exits=True` gives every exit's logits for every sample, so the whole exit-threshold grid
is simulated offline with the model's own exit rule (`exits.exit_decision`, exit by exit, for every problem type): a
sample's exit depends only on its own logits at each exit. Token pruning changes the hidden states, so each pruning knob
value gets its own forward. Per grid point: the metric, mean exit layer, kept-token fraction, FLOPs ratio vs the stock
model (`flops.py`), and for the speed/accuracy frontier the measured wall-clock speedup against the stock fine-tuned
model on the same batches.

The metric ("accuracy" in the file, a percentage) is, by problem type:
- single-label classification: accuracy, the share of samples whose argmax is the label;
- multi-label classification: exact match (subset accuracy), the share of samples with every label right
  (logit > 0 ⇔ label 1). The report says which under "metric";
- regression: not calibrated (no percentage to choose by); `calibrate` refuses it with a message.

`calibrate(model, dataset, tokenizer, ...)` returns the report; `calibrate_folder(dir, dataset, ...)` writes
`calibration.json`, with `max_drop` stores the chosen setting as the model's default speed (only `config.json` is
rewritten; weights are never touched), and then draws `calibration.png` (skipped, with a note, without matplotlib).

This module owns the calibration file: its constants, `validate_calibration`, `save_calibration`, `load_calibration`,
`frontier` and `choose_point`. `hub.py` reads it to show a speed/accuracy table on the model card.

Calibration result (`calibration.json`, beside config.json). One JSON object (comments here only):

    {
      "format": "hf-magicpyramid-calibration",      # required, with "version": 1
      "version": 1,
      "num_samples": 1390,                          # optional: samples measured (the reader judges accuracy noise by it)
      "batch_size": 32,                             # optional: batch size of the speed measurement
      "dataset": "Rotten Tomatoes snippets, test",  # optional, free text; "device" likewise
      "metric": "accuracy",                         # optional: what "accuracy" measures: "accuracy" (single-label,
                                                    #   the default) or "exact_match" (multi-label: every label right)
      "stock": {"accuracy": 84.2},                  # optional: the stock fine-tuned model on the same data (percent)
      "reference_accuracy": 84.2,                   # optional: what max_drop is counted from (the stock accuracy)
      "max_drop": 0.5,                              # optional: the budget in points below the reference; null = none
      "chosen": {...},                              # optional: the point stored as the model's default speed (a copy
                                                    #   of one of "points"); null when no max_drop was given
      "budget_met": true,                           # optional: whether "chosen" is within max_drop of the reference;
                                                    #   false = no point was, and "chosen" is the most accurate point
                                                    #   measured (the fallback; `choose_point`); null without max_drop
      "points": [                                   # one per speed setting measured, any order
        {
          "setting": {                              # the knobs, as `set_speed` takes them:
            "exit_threshold": 0.3,                  #   "exit_threshold" (entropy / confidence) or "patience";
                                                    #   null = never exit early
            "keep_ratio_scale": 1.0                 #   "keep_ratio_scale" (topk; 0 = pruning off) or
          },                                        #   "prune_threshold_offset" (threshold; -1 = pruning off)
          "accuracy": 83.8,                         # percent (the metric above)
          "mean_exit_layer": 3.2,                   # mean 1-based layer at which samples exited
          "kept_token_fraction": 0.71,              # token-layers run / token-layers without pruning, in [0, 1]
          "flops_ratio": 0.41,                      # FLOPs / the stock model's (0.41 = 59% fewer)
          "difference": -0.4,                       # optional: points vs the reference, paired over the same samples
          "difference_interval": 1.1,               # optional: that difference's 95% half-width (`paired_difference`)
          "measured_speedup": 2.2                   # optional: stock wall-clock time / this setting's, when measured
        }
      ]
    }

Also read: knobs given flat in the point instead of under "setting", and "speedup" for "measured_speedup". Other
keys are kept and ignored; `calibrate` also writes "exit_criterion", "token_pruning", "pruning_knob", "torch_threads",
per point "early_exit", "pruning", "mean_flops_ratio", "flops_speedup", "seconds_batch", "ms_per_sample_batch1",
"measured_speedup_batch1", and in "stock" "model", "seconds_batch", "flops", "ms_per_sample_batch1". A plot may lie
beside it as `calibration.png`; the model card shows both.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from .configuration_magic_pyramid import EXIT_CRITERIA
from .exits import PatienceState, exit_decision, exit_rule_can_fire, resolve_problem_type
from .flops import full_model_flops, sample_flops
from .modeling_magic_pyramid import MagicPyramidForSequenceClassification
from .quantization import check_method, quantize_model

CALIBRATION_JSON = "calibration.json"
CALIBRATION_PNG = "calibration.png"
FORMAT_NAME = "hf-magicpyramid-calibration"
FORMAT_VERSION = 1
EXIT_KNOBS = ("exit_threshold", "patience")
PRUNING_KNOBS = ("keep_ratio_scale", "prune_threshold_offset")
POINT_MEASURES = ("accuracy", "mean_exit_layer", "kept_token_fraction", "flops_ratio")  # every point has these numbers
# Two accuracies closer than this are equal: for the frontier and for the budget (accuracies are rounded to 0.001).
ACCURACY_TOLERANCE = 1e-9

ENTROPY_GRID = (None, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CONFIDENCE_GRID = (None, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
TOPK_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # 0: ratio ** 0 = 1, pruning off
THRESHOLD_OFFSET_FACTORS = (-0.5, 0.0, 0.5, 1.0, 2.0, 4.0)  # times the mean learned threshold; plus -1 (pruning off)
METRICS = {"single_label_classification": "accuracy", "multi_label_classification": "exact_match"}
METRIC_LABELS = {"accuracy": "accuracy", "exact_match": "exact match (every label right)"}


# ---------------------------------------------------------------------------------------------------------------------
# The calibration.json format
# ---------------------------------------------------------------------------------------------------------------------


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)


def validate_calibration(data, source: str = "calibration") -> dict:
    """Check a calibration result (the format in this module's docstring) and return it in one shape: every point with
    its knobs under "setting" and its wall-clock speedup (or None) under "measured_speedup". Raises `ValueError`
    naming the bad entry."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a calibration result is a JSON object with a 'points' list, not {type(data).__name__}.")
    if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{source}: format={data.get('format')!r}, version={data.get('version')!r} is not supported; this version "
            f"reads format {FORMAT_NAME!r}, version {FORMAT_VERSION}."
        )
    points = data.get("points")
    if not isinstance(points, list) or not points:
        raise ValueError(f"{source}: 'points' must be a non-empty list of measured speed settings.")
    knobs = EXIT_KNOBS + PRUNING_KNOBS
    normalized = []
    for i, raw in enumerate(points):
        where = f"{source}: points[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must be an object, not {type(raw).__name__}.")
        setting = raw.get("setting")
        if setting is None:
            setting = {knob: raw[knob] for knob in knobs if knob in raw}
        if not isinstance(setting, dict) or not setting:
            raise ValueError(f"{where} names no speed knob: give a 'setting' with one of {', '.join(knobs)}.")
        unknown = sorted(set(setting) - set(knobs))
        if unknown:
            raise ValueError(f"{where}.setting has unknown knobs {unknown}; knobs are {', '.join(knobs)}.")
        if all(knob in setting for knob in EXIT_KNOBS) or all(knob in setting for knob in PRUNING_KNOBS):
            raise ValueError(f"{where} gives two knobs of one kind: use one of {EXIT_KNOBS} and at most one of {PRUNING_KNOBS}.")
        for knob, value in setting.items():
            if value is not None and not _number(value):
                raise ValueError(f"{where}: {knob}={value!r} must be a number (or null for an exit knob: never exit early).")
        for measure in POINT_MEASURES:
            if not _number(raw.get(measure)):
                raise ValueError(f"{where} lacks a number for {measure!r} (got {raw.get(measure)!r}); every point needs {POINT_MEASURES}.")
        if not 0 <= raw["accuracy"] <= 100:
            raise ValueError(f"{where}: accuracy={raw['accuracy']!r} must be a percentage in [0, 100].")
        if not 0 <= raw["kept_token_fraction"] <= 1:
            raise ValueError(f"{where}: kept_token_fraction={raw['kept_token_fraction']!r} must be a fraction in [0, 1].")
        for measure in ("mean_exit_layer", "flops_ratio"):
            if raw[measure] <= 0:
                raise ValueError(f"{where}: {measure}={raw[measure]!r} must be positive.")
        speedup = raw.get("measured_speedup", raw.get("speedup"))
        if speedup is not None and (not _number(speedup) or speedup <= 0):
            raise ValueError(f"{where}: measured_speedup={speedup!r} must be a positive number (or absent when not measured).")
        normalized.append({**raw, "setting": dict(setting), "measured_speedup": speedup})
    stock = data.get("stock")
    if stock is not None and (not isinstance(stock, dict) or ("accuracy" in stock and not _number(stock["accuracy"]))):
        raise ValueError(f"{source}: 'stock' must be an object whose 'accuracy' is a percentage, got {stock!r}.")
    metric = data.get("metric", "accuracy")
    if metric not in METRIC_LABELS:
        raise ValueError(f"{source}: metric={metric!r} is not supported; use one of {', '.join(METRIC_LABELS)}.")
    if data.get("budget_met") not in (None, True, False):
        raise ValueError(f"{source}: budget_met={data['budget_met']!r} must be true, false or null.")
    return {**data, "points": normalized}


def save_calibration(directory, points: list[dict], **metadata) -> Path:
    """Validate and write `calibration.json` into `directory`; `metadata`: the other top-level entries (num_samples,
    batch_size, dataset, device, metric, stock, chosen, budget_met, ...; see the module docstring). Returns its path.
    With "quantization" in `metadata` (a quantized model's sweep) the file is `calibration_<method>.json` instead."""
    data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **metadata, "points": list(points)}
    validate_calibration(copy.deepcopy(data))
    path = Path(directory) / calibration_file(metadata.get("quantization"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def load_calibration(path_or_dir, quantization: str | None = None) -> dict | None:
    """The validated calibration result in a model folder (or a JSON file), or None when there is none. `quantization`
    ("int8"): the sweep of the model quantized that way (`calibration_int8.json`), not the fp32 model's."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / calibration_file(quantization)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return validate_calibration(data, source=str(path))


def _cheapest(points: list[dict]) -> dict:
    """The lowest-FLOPs point (ties: the more accurate)."""
    return min(points, key=lambda p: (p["flops_ratio"], -p["accuracy"]))


def _within_budget(points: list[dict], reference_accuracy: float, max_drop: float) -> list[dict]:
    """The points at most `max_drop` accuracy points below `reference_accuracy`: the one budget rule."""
    return [p for p in points if p["accuracy"] >= reference_accuracy - max_drop - ACCURACY_TOLERANCE]


def frontier(points: list[dict]) -> list[dict]:
    """The speed/accuracy frontier, in order of FLOPs: the points that no other point beats, i.e. every other point
    with fewer (or as many) FLOPs is less accurate. Of two points equally accurate the cheaper one stays."""
    kept, best = [], -math.inf
    for point in sorted(points, key=lambda p: (p["flops_ratio"], -p["accuracy"])):
        if point["accuracy"] > best + ACCURACY_TOLERANCE:
            kept.append(point)
            best = point["accuracy"]
    return kept


def paired_difference(correct, reference_correct) -> tuple[float, float]:
    """(difference, half-width) in accuracy points of one setting against the reference, paired over the same samples.

    `correct` and `reference_correct` are per-sample 0/1 (or bool) sequences of equal length. The difference is
    mean(correct - reference) * 100 (negative: the setting is less accurate); the half-width is the normal 95%
    interval's, 1.96 · sd(correct - reference) / sqrt(n) · 100, with the sample standard deviation (0 when n < 2).
    """
    setting = torch.as_tensor(correct, dtype=torch.float64)
    reference = torch.as_tensor(reference_correct, dtype=torch.float64)
    if setting.shape != reference.shape or setting.dim() != 1:
        raise ValueError(f"paired_difference needs two per-sample sequences of one length, got {tuple(setting.shape)} and {tuple(reference.shape)}.")
    differences = setting - reference
    n = differences.numel()
    half_width = 0.0 if n < 2 else float(1.96 * differences.std(correction=1) / math.sqrt(n) * 100)
    return float(differences.mean() * 100) if n else 0.0, half_width


def samples_to_resolve(half_width: float, num_samples: int, budget: float) -> int | None:
    """About how many samples would shrink a paired interval of `half_width` points (measured on `num_samples`) to
    `budget` points (the half-width falls as 1/sqrt(n)). None when `budget` is not positive."""
    if budget <= 0:
        return None
    return max(num_samples, math.ceil(num_samples * (half_width / budget) ** 2))


def choose_point(points: list[dict], reference_accuracy: float, max_drop: float) -> tuple[dict, bool]:
    """The setting to store as the default speed, and whether it meets the budget.

    The lowest-FLOPs point within `max_drop` points of `reference_accuracy`; when none is, the most accurate point
    measured (ties: the cheaper one), which may be the exact model (no early exit, no pruning). So a sweep never stores
    a setting that it measured as less accurate than another it could have chosen.
    """
    eligible = _within_budget(points, reference_accuracy, max_drop)
    if eligible:
        return _cheapest(eligible), True
    return max(points, key=lambda p: (p["accuracy"], -p["flops_ratio"])), False


def cross_validated_choice(points: list[dict], reference_correct, max_drop: float, folds: int, seed: int = 42) -> dict:
    """An estimate, free of selection bias, of how far below the reference the setting that `choose_point` picks lands.

    The samples are split into `folds` seeded folds; for each fold the setting is chosen (`choose_point`, the sweep's
    rule) from the accuracies on the other folds, then scored on the held-out fold. Every sample is held out once, so
    the held-out answers of the chosen settings pair with the reference's over all samples: their `paired_difference`
    is the estimate (points, negative = less accurate) with its 95% half-width. The setting stored as the default is
    still the one chosen on all samples; this says how much to trust its measured drop.

    points: each with "setting", "flops_ratio" and "_correct" (per-sample 0/1, as `calibrate(keep_correct=True)` gives).
    reference_correct: the reference's per-sample 0/1, same order. Returns {"folds", "difference",
    "difference_interval", "budget_met_folds" (folds whose choice met the budget on their choosing folds), "per_fold":
    [{"setting", "num_samples", "difference", "budget_met"}]}.
    """
    reference = torch.as_tensor(reference_correct, dtype=torch.float64)
    num_samples = reference.numel()
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= num_samples:
        raise ValueError(f"folds={folds!r} is out of range: cross-validation needs an integer in [2, {num_samples}] (the samples).")
    if not points or any("_correct" not in p or len(p["_correct"]) != num_samples for p in points):
        raise ValueError(f"cross_validated_choice needs every point's per-sample '_correct' ({num_samples} entries): "
                         "calibrate with keep_correct=True.")
    correct = torch.stack([torch.as_tensor(p["_correct"], dtype=torch.float64) for p in points])  # (points, samples)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    fold_of = torch.empty(num_samples, dtype=torch.long)
    fold_of[order] = torch.arange(num_samples) % folds
    held_out = torch.empty(num_samples, dtype=torch.float64)
    per_fold = []
    for fold in range(folds):
        test = fold_of == fold
        train = ~test
        candidates = [
            {"setting": p["setting"], "flops_ratio": p["flops_ratio"], "accuracy": round(float(correct[i, train].mean() * 100), 3), "index": i}
            for i, p in enumerate(points)
        ]
        chosen, met = choose_point(candidates, float(reference[train].mean() * 100), max_drop)
        held_out[test] = correct[chosen["index"], test]
        difference, _ = paired_difference(correct[chosen["index"], test], reference[test])
        per_fold.append({"setting": chosen["setting"], "num_samples": int(test.sum()), "difference": round(difference, 3), "budget_met": met})
    difference, half_width = paired_difference(held_out, reference)
    return {
        "folds": folds,
        "difference": round(difference, 3),
        "difference_interval": round(half_width, 3),
        "budget_met_folds": sum(f["budget_met"] for f in per_fold),
        "per_fold": per_fold,
    }


def describe_cross_validation(result: dict, max_drop: float) -> str:
    """One line for a `cross_validated_choice` (or `guarded_choice`) result."""
    tried = result.get("tried") or []
    if len(tried) > 1 or result.get("internal_budget", max_drop) != max_drop:
        steps = "; ".join(f"within {t['budget']:g}: {t['difference']:+.2f} ± {t['difference_interval']:.2f}" for t in tried)
        used = ("the exact model (no early exit, no pruning)" if result["internal_budget"] is None
                else f"the cheapest setting within {result['internal_budget']:g} points")
        return (
            f"cross-validated ({result['folds']} folds, choose on {result['folds'] - 1}, score on the held-out one): choosing "
            f"the cheapest setting within {max_drop} points lands beyond the budget on held-out samples, so the default is "
            f"{used} (held-out points vs the reference, {steps})."
        )
    met = "" if result.get("budget_met_folds") is None else (
        f"; met on the choosing folds in {result['budget_met_folds']} of {result['folds']}")
    return (
        f"cross-validated ({result['folds']} folds, choose on {result['folds'] - 1}, score on the held-out one): the "
        f"chosen setting lands {result['difference']:+.2f} ± {result['difference_interval']:.2f} points from the "
        f"reference on held-out samples (budget -{max_drop}{met})."
    )


# Budgets tried, as shares of max_drop, when the sweep's rule lands below the budget on held-out folds.
GUARD_SHARES = (1.0, 0.75, 0.5, 0.25, 0.0)


def guarded_choice(points: list[dict], reference_correct, max_drop: float, folds: int, seed: int = 42) -> tuple[dict, dict]:
    """`choose_point`, guarded against selection bias by K-fold cross-validation of the rule itself.

    Choosing the cheapest of many settings within `max_drop` on the same samples that measure them favours settings
    whose errors happened to miss those samples: on a small validation set the chosen setting's drop on new data is
    larger than measured. This cross-validates the rule "the cheapest within b" (`cross_validated_choice`) for b =
    max_drop, then 0.75, 0.5, 0.25 and 0 times it, and chooses on all samples with the first b whose held-out drop is
    within `max_drop`; when none is, the exact model (no early exit, no pruning). Returns (chosen point, the
    cross-validation record: its "difference" / "difference_interval" are those of the b used, "internal_budget" is b
    (None for the exact model) and "tried" lists each b's held-out difference)."""
    reference = torch.as_tensor(reference_correct, dtype=torch.float64)
    reference_accuracy = float(reference.mean() * 100)
    tried = []
    for share in GUARD_SHARES:
        budget = round(max_drop * share, 6)
        result = cross_validated_choice(points, reference_correct, budget, folds, seed)
        tried.append({"budget": budget, "difference": result["difference"], "difference_interval": result["difference_interval"]})
        if result["difference"] >= -max_drop:
            chosen, _ = choose_point(points, reference_accuracy, budget)
            return chosen, dict(result, internal_budget=budget, tried=tried)
    exact = [p for p in points if not p.get("early_exit") and not p.get("pruning")]
    chosen = exact[0] if exact else max(points, key=lambda p: (p["accuracy"], -p["flops_ratio"]))
    difference, half_width = paired_difference(chosen["_correct"], reference_correct)
    return chosen, {"folds": folds, "difference": round(difference, 3), "difference_interval": round(half_width, 3),
                    "budget_met_folds": None, "per_fold": [], "internal_budget": None, "tried": tried}


def best_within(report: dict, max_drop: float, early_exit: bool | None = None, pruning: bool | None = None) -> dict | None:
    """The lowest-FLOPs point within `max_drop` points of the report's reference accuracy (the rule of `choose_point`),
    optionally restricted to points with (or without) early exit / pruning. None when no point qualifies."""
    candidates = [
        p for p in report["points"]
        if (early_exit is None or p["early_exit"] == early_exit) and (pruning is None or p["pruning"] == pruning)
    ]
    eligible = _within_budget(candidates, report["reference_accuracy"], max_drop)
    return _cheapest(eligible) if eligible else None


def is_default_point(config, point: dict) -> bool:
    """Whether a point's setting is the speed saved in `config` (a MagicPyramidConfig): every knob it names equal."""
    for knob, value in point["setting"].items():
        expected = getattr(config, knob)
        if (value is None) != (expected is None):
            return False
        if value is not None and not math.isclose(float(value), float(expected), rel_tol=1e-6, abs_tol=1e-9):
            return False
    return True


def _pruning_off(knob: str | None, value) -> bool:
    """Whether a pruning knob value turns pruning off (keep_ratio_scale 0, prune_threshold_offset -1, or no knob)."""
    return knob is None or value is None or (knob == "keep_ratio_scale" and value == 0) or (knob == "prune_threshold_offset" and value <= -1.0)


def _describe_setting(setting: dict) -> str:
    """A setting in words: "exit_threshold=0.3, keep_ratio_scale=1.5", "exit_threshold=never, pruning off"."""
    parts = []
    for knob, value in setting.items():
        if knob in PRUNING_KNOBS and _pruning_off(knob, value):
            parts.append("pruning off")
        else:
            parts.append(f"{knob}={'never' if value is None else value}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Offline simulation of the exit rule, and the metric
# ---------------------------------------------------------------------------------------------------------------------


def simulate_exit_index(
    exit_logits: torch.Tensor,
    criterion: str,
    value,
    problem_type: str = "single_label_classification",
    regression_tolerance: float = 0.0,
) -> torch.Tensor:
    """Index (into the exits) where each sample leaves, decided exit by exit by the model's own rule
    (`exits.exit_decision` and `PatienceState`), as the batched forward does.

    exit_logits (num_samples, num_exits, num_labels), the last exit being the final head (never tested: everything that
    reaches it stops there). `value`: the entropy / confidence threshold or the patience; None = never exit early.
    `problem_type` / `regression_tolerance`: as the model resolves them (`resolve_problem_type(config, None)`).
    Returns (num_samples,) long.
    """
    if criterion not in EXIT_CRITERIA:
        raise ValueError(f"exit_criterion={criterion!r} is not supported; choose one of {', '.join(EXIT_CRITERIA)}.")
    num_samples, num_exits, _ = exit_logits.shape
    index = torch.full((num_samples,), num_exits - 1, dtype=torch.long, device=exit_logits.device)
    threshold, patience = (None, value) if criterion == "patience" else (value, None)
    if num_exits == 1 or not exit_rule_can_fire(criterion, threshold, patience, problem_type):
        return index
    state = PatienceState(num_samples, exit_logits.device)
    running = torch.ones(num_samples, dtype=torch.bool, device=exit_logits.device)
    # Samples that left keep updating `state` here, where the forward drops their rows; every rule is per sample, so
    # the samples still running get the same decisions.
    for k in range(num_exits - 1):
        done = exit_decision(exit_logits[:, k], criterion, threshold, patience, problem_type, state, regression_tolerance)
        index = torch.where(done & running, torch.full_like(index, k), index)
        running = running & ~done
    return index


def _predict(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Predictions from logits (..., num_labels): the argmax (single-label) or logit > 0 per label (multi-label)."""
    if problem_type == "multi_label_classification":
        return logits > 0
    return logits.argmax(dim=-1)


def _correct(predictions: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Bool (num_samples,): the prediction is right (multi-label: every label right, i.e. exact match)."""
    if problem_type == "multi_label_classification":
        return (predictions == (labels > 0.5)).all(dim=-1)
    return predictions == labels


# ---------------------------------------------------------------------------------------------------------------------
# Batches and timing
# ---------------------------------------------------------------------------------------------------------------------


def _batches(encoded, tokenizer, batch_size: int) -> list[dict[str, torch.Tensor]]:
    collator = DataCollatorWithPadding(tokenizer)
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in encoded.column_names]
    rows = encoded.select_columns(columns)
    return [collator([rows[j] for j in range(i, min(i + batch_size, len(rows)))]) for i in range(0, len(rows), batch_size)]


@torch.inference_mode()
def time_interleaved(stock, model, batches, forward_kwargs: list[dict], repeats: int = 2) -> tuple[float, list[float]]:
    """Seconds for one pass over `batches` of the stock model and of `model` at each of `forward_kwargs`: the fastest of
    `repeats` rounds, each round timing the stock model and then every setting (one warm-up batch each first)."""
    stock.eval()
    model.eval()
    stock(**batches[0])
    for kwargs in forward_kwargs:
        model(**batches[0], **kwargs)
    stock_best, best = math.inf, [math.inf] * len(forward_kwargs)
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        for batch in batches:
            stock(**batch)
        stock_best = min(stock_best, time.perf_counter() - start)
        for index, kwargs in enumerate(forward_kwargs):
            start = time.perf_counter()
            for batch in batches:
                model(**batch, **kwargs)
            best[index] = min(best[index], time.perf_counter() - start)
    return stock_best, best


@torch.inference_mode()
def _stock_correct(stock, batches, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Bool (num_samples,): the stock model's right answers."""
    stock.eval()
    predictions = torch.cat([_predict(stock(**batch).logits, problem_type) for batch in batches])
    return _correct(predictions, labels, problem_type)


def _exit_key(criterion: str) -> str:
    return "patience" if criterion == "patience" else "exit_threshold"


def _pruning_grid(model) -> tuple[str | None, list]:
    config = model.config
    if config.token_pruning == "topk":
        return "keep_ratio_scale", list(TOPK_SCALES)
    if config.token_pruning == "threshold":
        learned = [t for t in config.resolved_prune_thresholds()[1:]]
        if getattr(model, "prune_thresholds", None) is not None:
            learned = model.prune_thresholds.detach().clamp(0, 1)[1:].tolist()
        mean = float(np.mean(learned)) if learned else 0.0
        if mean <= 1e-6:
            offsets = [0.0, 0.005, 0.01, 0.02, 0.04]
        else:
            offsets = [round(mean * f, 6) for f in THRESHOLD_OFFSET_FACTORS]
        return "prune_threshold_offset", [-1.0] + [min(max(o, -1.0), 1.0) for o in offsets]
    return None, [None]


def _problem_type(config, labels: torch.Tensor | None = None) -> str:
    """The problem type whose exit rule the model runs at inference (no labels in the call), checked against the labels
    when given. Raises `ValueError` for regression and for labels of another kind."""
    served = resolve_problem_type(config, None)
    if served == "regression":
        raise ValueError(
            "calibrate: problem_type='regression' has no accuracy to choose a speed by; calibration supports "
            "'single_label_classification' and 'multi_label_classification'. Set the speed by hand with "
            "model.set_speed(patience=...) (and config.regression_tolerance)."
        )
    if labels is None:
        return served
    multi_hot = labels.dim() == 2
    if multi_hot != (served == "multi_label_classification"):
        given = f"multi-hot labels of shape {tuple(labels.shape)}" if multi_hot else f"class-id labels of shape {tuple(labels.shape)}"
        wanted = "class ids, shape (num_samples,)" if multi_hot else "multi-hot float rows, shape (num_samples, num_labels)"
        raise ValueError(
            f"calibrate: the data has {given}, but the model runs the {served!r} exit rule "
            f"(config.problem_type={config.problem_type!r}): give labels as {wanted}, or set config.problem_type to match them."
        )
    return served


# ---------------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def calibrate(
    model: MagicPyramidForSequenceClassification,
    dataset,
    tokenizer,
    *,
    stock_model=None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_length: int = 128,
    max_samples: int | None = None,
    batch_size: int = 32,
    exit_grid=None,
    pruning_grid=None,
    max_drop: float | None = None,
    measure: str = "frontier",
    timing_repeats: int = 2,
    batch1_samples: int = 100,
    seed: int = 42,
    dataset_name: str | None = None,
    keep_correct: bool = False,
    folds: int = 0,
    log=print,
) -> dict[str, Any]:
    """Sweep the exit threshold (or patience) and the pruning knob on `dataset`; return the report dict.

    dataset: raw (text + label columns, labels named as the model's `label2id` or ClassLabel) or already tokenized
    (`input_ids`, `attention_mask`, `labels`: class ids, or multi-hot float rows (num_labels,) for a multi-label model).
    stock_model: the stock fine-tuned classifier to compare speed and accuracy with (default: the pyramid's own
    backbone, run as a plain stock model). Accuracies (exact match for multi-label, see the module docstring) are in
    percent; `max_drop` is in points below the stock model's accuracy on the same data. `measure`: "frontier" times
    every point on the speed/accuracy frontier, "chosen" only the chosen one, or a list of settings (dicts as in the
    points) to time at batch `batch_size` and at batch 1.
    Timings are on this machine, batch `batch_size` over the whole data, and batch 1 over `batch1_samples` samples.
    `folds` >= 2 (with `max_drop`): the choice is guarded by K-fold cross-validation (`guarded_choice`), recorded as
    "cross_validation"; skipped, with a log line, when there are fewer than 2 samples per fold.
    """
    from .training import prepare_dataset

    keep_correct = keep_correct or bool(folds)  # the cross-validation pairs per-sample answers

    model.eval()
    config = model.config
    _problem_type(config)  # regression: refused before any work
    if "input_ids" in dataset.column_names and "labels" in dataset.column_names:
        encoded = dataset if max_samples is None or max_samples >= len(dataset) else dataset.shuffle(seed=seed).select(range(max_samples))
    else:
        encoded = prepare_dataset(
            dataset, tokenizer, dict(config.label2id), text_column=text_column, text_pair_column=text_pair_column,
            label_column=label_column, max_length=max_length, split="validation", max_samples=max_samples, seed=seed,
        )
    labels = torch.tensor(encoded["labels"])
    problem_type = _problem_type(config, labels)
    metric = METRICS[problem_type]
    batches = _batches(encoded, tokenizer, batch_size)
    num_samples = len(labels)
    criterion = config.exit_criterion
    exit_key = _exit_key(criterion)
    if exit_grid is None:
        if criterion == "entropy":
            exit_grid = list(ENTROPY_GRID)
        elif criterion == "confidence":
            exit_grid = list(CONFIDENCE_GRID)
        else:
            exit_grid = [None] + list(range(len(model.exit_layers) - 1, 0, -1))
    knob, knob_values = _pruning_grid(model)
    if pruning_grid is not None:
        knob_values = list(pruning_grid)
    exit_layers = torch.tensor(model.exit_layers)
    num_layers = config.num_hidden_layers

    stock_source = "given"
    if stock_model is None:
        stock_model = copy.deepcopy(model.backbone)
        stock_source = "the pyramid's backbone weights, run as the stock model"
    stock_model.eval()
    stock_correct = _stock_correct(stock_model, batches, labels, problem_type)
    stock_accuracy = float(stock_correct.double().mean() * 100)

    points: list[dict] = []
    full_flops_total = None
    for value in knob_values:
        knob_kwargs = {} if knob is None else {knob: value}
        all_logits, all_kept, all_full = [], [], []
        for batch in batches:
            out = model(**batch, output_all_exits=True, **knob_kwargs)
            all_logits.append(torch.stack(out.exit_logits, dim=1))
            all_kept.append(out.kept_tokens)
            all_full.append(full_model_flops(model, batch["attention_mask"]))
        exit_logits = torch.cat(all_logits)
        kept = torch.cat(all_kept)
        full_flops = torch.cat(all_full).double()
        full_flops_total = float(full_flops.sum())
        lengths = kept[:, 0].double()
        for exit_value in exit_grid:
            index = simulate_exit_index(exit_logits, criterion, exit_value, problem_type, config.regression_tolerance)
            exit_layer = exit_layers[index]
            right = _correct(_predict(exit_logits[torch.arange(num_samples), index], problem_type), labels, problem_type)
            ran = torch.arange(1, num_layers + 1)[None, :] <= exit_layer[:, None]
            kept_run = kept * ran
            flops = sample_flops(model, kept_run, exit_layer, **knob_kwargs).double()
            point = {
                "setting": {exit_key: exit_value, **({knob: value} if knob else {})},
                "accuracy": round(float(right.double().mean() * 100), 3),
                "mean_exit_layer": round(float(exit_layer.double().mean()), 3),
                "kept_token_fraction": round(float(kept_run.sum() / (lengths[:, None] * ran).sum()), 4),
                "flops_ratio": round(float(flops.sum() / full_flops.sum()), 4),
                "mean_flops_ratio": round(float((flops / full_flops).mean()), 4),
                "early_exit": exit_value is not None,
                "pruning": not _pruning_off(knob, value),
            }
            point["flops_speedup"] = round(1.0 / max(point["flops_ratio"], 1e-9), 3)
            difference, half_width = paired_difference(right, stock_correct)
            point["difference"] = round(difference, 3)  # vs the reference, paired over the same samples
            point["difference_interval"] = round(half_width, 3)  # its 95% half-width
            if keep_correct:  # per-sample correctness, for paired comparisons (not written to calibration.json)
                point["_correct"] = right.tolist()
            points.append(point)
        log(f"calibrate: {knob or 'no pruning'}={value}: {len(exit_grid)} exit settings evaluated")

    reference = stock_accuracy
    chosen, budget_met, cross_validation = None, None, None
    if max_drop is not None:
        chosen, budget_met = choose_point(points, reference, max_drop)
        if folds and budget_met and num_samples < 2 * folds:
            log(f"calibrate: {num_samples} samples are too few for {folds}-fold cross-validation of the choice; skipped")
        elif folds and budget_met:
            chosen, cross_validation = guarded_choice(points, stock_correct.tolist(), max_drop, folds, seed)
            log(describe_cross_validation(cross_validation, max_drop))

    # Wall clock: the stock model and the measured points on the same batches, in the same process, interleaved
    # (each repeat times the stock model, then every point) so that load from other processes hits them alike.
    if isinstance(measure, (list, tuple)):  # explicit settings: timed at batch `batch_size` and at batch 1
        wanted = [_normalise_setting(s) for s in measure]
        to_measure = [p for p in points if _normalise_setting(p["setting"]) in wanted]
        single_points = list(to_measure)
    else:
        to_measure = frontier(points) if measure == "frontier" else []
        single_points = [chosen] if chosen is not None else []
    if chosen is not None and chosen not in to_measure:
        to_measure.append(chosen)
    forward = [_forward_kwargs(p["setting"], len(model.exit_layers), criterion) for p in to_measure]
    stock_seconds, seconds = time_interleaved(stock_model, model, batches, forward, timing_repeats)
    for point, value in zip(to_measure, seconds):
        point["seconds_batch"] = round(value, 4)
        point["measured_speedup"] = round(stock_seconds / value, 3)
    stock = {
        "model": stock_source,
        "accuracy": round(stock_accuracy, 3),
        "seconds_batch": round(stock_seconds, 4),
        "flops": full_flops_total,
    }
    if keep_correct:
        stock["_correct"] = stock_correct.tolist()
    if single_points and batch1_samples:
        columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in encoded.column_names]
        singles = [{c: torch.tensor([encoded[i][c]]) for c in columns} for i in range(min(batch1_samples, num_samples))]
        forward = [_forward_kwargs(p["setting"], len(model.exit_layers), criterion) for p in single_points]
        stock_single, pyramid_singles = time_interleaved(stock_model, model, singles, forward, timing_repeats)
        stock["ms_per_sample_batch1"] = round(1000 * stock_single / len(singles), 3)
        stock["batch1_samples"] = len(singles)
        for point, value in zip(single_points, pyramid_singles):
            point["ms_per_sample_batch1"] = round(1000 * value / len(singles), 3)
            point["measured_speedup_batch1"] = round(stock_single / value, 3)

    report = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_samples": num_samples,
        "batch_size": batch_size,
        "max_length": max_length,
        "metric": metric,
        "exit_criterion": criterion,
        "token_pruning": config.token_pruning,
        "pruning_knob": knob,
        "stock": stock,
        "reference_accuracy": round(reference, 3),
        "max_drop": max_drop,
        "chosen": chosen,
        "budget_met": budget_met,
        "cross_validation": cross_validation,
        "points": points,
        "torch_threads": torch.get_num_threads(),
        "device": _device_description() if not torch.cuda.is_available() else torch.cuda.get_device_name(),
    }
    if dataset_name:
        report["dataset"] = dataset_name
    report["table"] = format_table(report)
    return report


def _normalise_setting(setting: dict) -> tuple:
    return tuple(sorted((k, None if v is None else round(float(v), 6)) for k, v in setting.items()))


def _forward_kwargs(setting: dict, num_exits: int, criterion: str = "entropy") -> dict:
    """Forward arguments of a grid point. forward reads None as "the config's value", so "never exit early" is spelled
    as a value that never fires (entropy < 0, confidence > 1, patience >= the number of exits)."""
    kwargs = {k: v for k, v in setting.items() if v is not None}
    if setting.get("exit_threshold", 0.0) is None:
        kwargs["exit_threshold"] = 1.0 if criterion == "confidence" else 0.0
    if "patience" in setting and setting["patience"] is None:
        kwargs["patience"] = num_exits
    return kwargs


def format_table(report: dict, limit: int | None = None) -> str:
    """The frontier (and the chosen point) as a text table, with a line saying how the chosen point (`*`) was chosen."""
    chosen = report.get("chosen")
    rows = frontier(report["points"])
    on_frontier = len(rows)
    if chosen and chosen not in rows:
        rows.append(chosen)
    metric = report.get("metric", "accuracy")
    short = "exact %" if metric == "exact_match" else "acc %"
    header = f"{'setting':<48} {short:>7} {'exit L':>7} {'kept':>6} {'FLOPs':>6} {'speedup':>8}"
    lines = [
        f"stock model: {METRIC_LABELS[metric]} {report['stock']['accuracy']:.2f}% on {report['num_samples']} samples",
        header,
    ]
    for p in rows[:limit]:
        measured = f"{p['measured_speedup']:.2f}x" if p.get("measured_speedup") is not None else "-"
        mark = " *" if chosen is not None and p == chosen else ""
        lines.append(
            f"{_describe_setting(p['setting']):<48} {p['accuracy']:>7.2f} {p['mean_exit_layer']:>7.2f} "
            f"{p['kept_token_fraction']:>6.2f} {p['flops_ratio']:>6.3f} {measured:>8}{mark}"
        )
    lines += [
        f"Rows: the {on_frontier} of {len(report['points'])} settings that no other beats on both {metric.replace('_', ' ')} and FLOPs"
        f"{' (and the chosen one)' if len(rows) > on_frontier else ''}. "
        f"exit L: mean exit layer; kept: share of token-layers run;",
        f"FLOPs: ratio to the stock model; speedup: stock wall-clock time / this setting's at batch {report['batch_size']} "
        f"(- = not timed).",
    ]
    if chosen is not None:
        budget = f"{report['max_drop']} points of the reference {report['reference_accuracy']:.2f}%"
        if report.get("budget_met") is False:
            lines.append(
                f"* chosen as a FALLBACK: no setting is within {budget}, so this is the most accurate setting measured "
                f"({chosen['accuracy'] - report['reference_accuracy']:+.2f} points)."
            )
        else:
            lines.append(f"* chosen: the setting with the fewest FLOPs within {budget}.")
    if report.get("cross_validation"):
        lines.append(describe_cross_validation(report["cross_validation"], report["max_drop"]))
    return "\n".join(lines)


def plot_calibration(report: dict, path) -> None:
    """Accuracy vs FLOPs speedup, one curve per pruning knob value; measured speedups annotated. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    knob = report["pruning_knob"]
    groups: dict = {}
    for point in report["points"]:
        groups.setdefault(point["setting"].get(knob) if knob else None, []).append(point)
    for value, group in groups.items():
        group = sorted(group, key=lambda p: p["flops_speedup"])
        label = "no pruning" if knob is None else _describe_setting({knob: value})
        axis.plot([p["flops_speedup"] for p in group], [p["accuracy"] for p in group], marker=".", label=label)
    axis.axhline(report["stock"]["accuracy"], color="gray", linestyle="--", linewidth=1, label="stock model")
    if report.get("max_drop") is not None:
        axis.axhline(report["reference_accuracy"] - report["max_drop"], color="red", linestyle=":", linewidth=1,
                     label=f"-{report['max_drop']} pt")
    for point in report["points"]:
        if point.get("measured_speedup") is not None:
            axis.annotate(f"{point['measured_speedup']:.2f}x", (point["flops_speedup"], point["accuracy"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
    if report.get("chosen"):
        axis.plot([report["chosen"]["flops_speedup"]], [report["chosen"]["accuracy"]], marker="*", markersize=14,
                  color="black", linestyle="none", label="chosen")
    axis.set_xlabel("FLOPs speedup vs stock model (annotations: measured wall-clock speedup, batch %d)" % report["batch_size"])
    axis.set_ylabel(f"{METRIC_LABELS[report.get('metric', 'accuracy')]} % ({report['num_samples']} samples)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _stock_model_for(model_dir: Path):
    """The stock fine-tuned model recorded by `train_magic_pyramid` (stage 1), or None."""
    from .training import SUMMARY_FILE

    summary_path = model_dir / SUMMARY_FILE
    if not summary_path.is_file():
        return None
    recorded = json.loads(summary_path.read_text()).get("stock_model")
    if not recorded:
        return None
    candidate = model_dir / recorded if not Path(recorded).is_absolute() else Path(recorded)
    return str(candidate) if (candidate / "config.json").is_file() else (recorded if not Path(recorded).is_absolute() else None)


def calibrate_folder(
    model_dir,
    dataset,
    *,
    stock_model: str | None = None,
    max_drop: float | None = None,
    report_dir=None,
    quantize: str | None = None,
    folds: int = 0,
    log=print,
    **calibrate_kwargs,
) -> dict:
    """Load a saved model (and its tokenizer), `calibrate`, write `calibration.json`, with `max_drop` store the chosen
    speed in `config.json` (nothing else in `model_dir` is written), then draw `calibration.png` (skipped with a note
    when matplotlib is not installed: the results are stored first). With `max_drop` and `folds` >= 2, the choice is
    guarded by cross-validation (`guarded_choice`, recorded as "cross_validation").

    `quantize="int8"` calibrates the int8 model (`quantization.quantize_model`; int8 moves the exits' confidences) against
    the fp32 stock model, and writes `calibration_int8.json` / `calibration_int8.png`; with `max_drop` its chosen speed
    is stored there only (`quantized_default`, applied by `quantization.load_quantized`), never in config.json, so an
    fp32 load keeps the fp32 model's default."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json: pass the folder of a trained Magic Pyramid model.")
    model = MagicPyramidForSequenceClassification.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    stock_path = stock_model or _stock_model_for(model_dir)
    stock = AutoModelForSequenceClassification.from_pretrained(stock_path) if stock_path else None
    if quantize:
        if stock is None:  # the fp32 reference, not the quantized backbone calibrate would copy
            stock = copy.deepcopy(model.backbone)
        model = quantize_model(model, quantize)
    report = calibrate(model, dataset, tokenizer, stock_model=stock, max_drop=max_drop, log=log, folds=folds, **calibrate_kwargs)
    if quantize:
        report["quantization"] = quantize
    if stock_path:
        report["stock"]["model"] = str(stock_path)
    report_dir = Path(report_dir) if report_dir else model_dir
    save_report(report, report_dir)
    if max_drop is not None:
        chosen = report["chosen"]
        warning = budget_warning(report)
        if warning:
            log(warning)
        note = resolution_note(report)
        if note:
            log(note)
        if quantize:
            log(f"Stored the {quantize} model's default speed {chosen['setting']} in "
                f"{report_dir / calibration_file(quantize)} (config.json, the fp32 default, is unchanged; "
                f"hf_magicpyramid.quantization.load_quantized applies it)")
            plot_or_skip(report, report_dir, log=log)
            return report
        model.set_speed(**chosen["setting"])  # None: never exit early, as in the config
        model.sync_config()
        model.config.to_json_file(str(model_dir / "config.json"), use_diff=True)
        log(f"Stored the default speed {chosen['setting']} in {model_dir / 'config.json'}")
    plot_or_skip(report, report_dir, log=log)
    return report


def budget_warning(report: dict) -> str | None:
    """A WARNING when no setting met the report's `max_drop` (the most accurate setting measured is stored instead),
    with the numbers; None when the budget was met or none was given."""
    if report.get("max_drop") is None or report.get("budget_met", True):
        return None
    chosen = report["chosen"]
    return (
        f"WARNING: no setting is within {report['max_drop']} points of the reference {METRIC_LABELS[report['metric']]} "
        f"({report['reference_accuracy']:.2f}% on {report['num_samples']} samples). Storing the most accurate "
        f"setting measured instead: {_describe_setting(chosen['setting'])} at {chosen['accuracy']:.2f}% "
        f"({chosen['accuracy'] - report['reference_accuracy']:+.2f} points), FLOPs ratio {chosen['flops_ratio']:.3f}."
    )


def resolution_note(report: dict) -> str | None:
    """A NOTE when the chosen point's paired interval is wider than the budget (the validation set cannot tell whether
    the budget holds), with about how many samples would resolve it; None otherwise."""
    chosen, max_drop = report.get("chosen"), report.get("max_drop")
    interval = (chosen or {}).get("difference_interval")
    if interval is None or max_drop is None or max_drop <= 0 or interval <= max_drop:
        return None
    needed = samples_to_resolve(interval, report["num_samples"], max_drop)
    hint = "" if report.get("cross_validation") else (
        " Cross-validated calibration (--calibration_folds 5, the default) guards the choice against selection bias."
    )
    return (
        f"NOTE: on {report['num_samples']} samples the chosen setting's difference to the reference is "
        f"{chosen['difference']:+.2f} ± {interval:.2f} points (paired 95%), wider than the {max_drop}-point budget: "
        f"this validation set cannot tell whether the budget holds. About {needed} samples would resolve it.{hint}"
    )


def add_cross_validation(report: dict, folds: int, seed: int = 42, log=print) -> dict:
    """Add "cross_validation" (`cross_validated_choice` over the report's points, which need "_correct") to a report
    calibrated with `max_drop`, refresh its table, log the line. Returns the result."""
    result = cross_validated_choice(report["points"], report["stock"]["_correct"], report["max_drop"], folds, seed)
    report["cross_validation"] = result
    report["table"] = format_table(report)
    log(describe_cross_validation(result, report["max_drop"]))
    return result


def save_report(report: dict, directory) -> Path:
    """Write a `calibrate` report as `calibration.json` (validated; private entries and the text table left out)."""
    data = _public(report)
    metadata = {k: v for k, v in data.items() if k not in ("format", "version", "points")}
    return save_calibration(directory, data["points"], **metadata)


def plot_or_skip(report: dict, directory, log=print) -> Path | None:
    """Draw `calibration.png` into `directory`; without matplotlib, log one line and return None (an older plot there,
    which would show another sweep, is removed)."""
    path = Path(directory) / calibration_file(report.get("quantization"), CALIBRATION_PNG)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        removed = ""
        if path.is_file():
            path.unlink()
            removed = f"; removed the older {CALIBRATION_PNG}, which showed an earlier sweep"
        log(f"Skipped {CALIBRATION_PNG}: matplotlib is not installed (pip install 'hf-magicpyramid[plot]'){removed}.")
        return None
    plot_calibration(report, path)
    return path


def calibration_file(quantization: str | None = None, name: str = CALIBRATION_JSON) -> str:
    """The file name of a sweep's result (`name`: CALIBRATION_JSON or CALIBRATION_PNG): as is for the fp32 model,
    `calibration_int8.json` for a sweep of the int8 model, so that the two never overwrite each other."""
    if not quantization:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}_{check_method(quantization)}.{suffix}"


def quantized_default(path_or_dir, quantization: str) -> dict | None:
    """The default speed a `sweep --quantize` stored for the quantized model (the "chosen" setting of
    `calibration_<method>.json`), or None when there is none."""
    if not Path(path_or_dir).is_dir():
        return None
    data = load_calibration(path_or_dir, quantization)
    return dict(data["chosen"]["setting"]) if data and data.get("chosen") else None


def _public(value):
    """The report without its private (underscore) entries and the text table."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not k.startswith("_") and k != "table"}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def _device_description() -> str:
    import os
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


__all__ = [
    "paired_difference",
    "cross_validated_choice",
    "add_cross_validation",
    "guarded_choice",
    "budget_warning",
    "resolution_note",
    "samples_to_resolve",
    "CALIBRATION_JSON",
    "CALIBRATION_PNG",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "EXIT_KNOBS",
    "PRUNING_KNOBS",
    "validate_calibration",
    "load_calibration",
    "save_calibration",
    "frontier",
    "choose_point",
    "best_within",
    "is_default_point",
    "simulate_exit_index",
    "calibrate",
    "calibrate_folder",
    "format_table",
    "plot_calibration",
    "save_report",
    "plot_or_skip",
    "time_interleaved",
    "calibration_file",
    "quantized_default",
]
