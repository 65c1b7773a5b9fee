"""Calibrating the speed knobs of a trained Magic Pyramid model on validation data.

One forward with `output_all_exits=True` gives every exit's logits for every sample, so the whole exit-threshold grid
is simulated offline, exactly: a sample's exit depends only on its own logits at each exit (entropy, confidence and
patience are per-sample rules). Token pruning changes the hidden states, so each pruning knob value gets its own forward.
Per grid point: accuracy, mean exit layer, kept-token fraction, FLOPs ratio vs the stock model (`flops.py`), and for the
speed/accuracy frontier the measured wall-clock speedup against the stock fine-tuned model on the same batches.

`calibrate(model, dataset, tokenizer, ...)` returns the report; `calibrate_folder(dir, dataset, ...)` also writes
`calibration.json` and `calibration.png` and, with `max_drop`, stores the fastest setting within that accuracy drop as the
model's default speed (only `config.json` is rewritten; weights are never touched).
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
from torch.nn import functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from .exits import normalized_entropy
from .flops import full_model_flops, sample_flops
from .modeling_magic_pyramid import MagicPyramidForSequenceClassification

CALIBRATION_JSON = "calibration.json"
CALIBRATION_PNG = "calibration.png"
FORMAT_NAME = "hf-magicpyramid-calibration"
FORMAT_VERSION = 1

ENTROPY_GRID = (None, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CONFIDENCE_GRID = (None, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
TOPK_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # 0: ratio ** 0 = 1, pruning off
THRESHOLD_OFFSET_FACTORS = (-0.5, 0.0, 0.5, 1.0, 2.0, 4.0)  # times the mean learned threshold; plus -1 (pruning off)


# ---------------------------------------------------------------------------------------------------------------------
# Offline simulation of the exit rule
# ---------------------------------------------------------------------------------------------------------------------


def simulate_exit_index(exit_logits: torch.Tensor, criterion: str, value) -> torch.Tensor:
    """Index (into the exits) where each sample leaves, as the model's exit rule decides at inference.

    exit_logits (num_samples, num_exits, num_labels), the last exit being the final head (never tested: everything that
    reaches it stops there). `value`: the entropy / confidence threshold or the patience; None = never exit early.
    Returns (num_samples,) long.
    """
    num_samples, num_exits, _ = exit_logits.shape
    last = torch.full((num_samples,), num_exits - 1, dtype=torch.long)
    if value is None or num_exits == 1:
        return last
    intermediate = exit_logits[:, :-1]
    if criterion == "entropy":
        done = normalized_entropy(intermediate.reshape(-1, intermediate.shape[-1])).view(num_samples, -1) < value
    elif criterion == "confidence":
        done = F.softmax(intermediate.float(), dim=-1).max(dim=-1).values > value
    elif criterion == "patience":
        predictions = exit_logits.argmax(dim=-1)
        streak = torch.zeros(num_samples, dtype=torch.long)
        done = torch.zeros(num_samples, num_exits - 1, dtype=torch.bool)
        for k in range(num_exits - 1):
            if k > 0:
                streak = torch.where(predictions[:, k] == predictions[:, k - 1], streak + 1, torch.zeros_like(streak))
            done[:, k] = streak >= value
    else:
        raise ValueError(f"exit_criterion={criterion!r} is not supported; choose 'entropy', 'confidence' or 'patience'.")
    any_done = done.any(dim=1)
    first = done.to(torch.long).argmax(dim=1)
    return torch.where(any_done, first, last)


# ---------------------------------------------------------------------------------------------------------------------
# Batches and timing
# ---------------------------------------------------------------------------------------------------------------------


def _batches(encoded, tokenizer, batch_size: int) -> list[dict[str, torch.Tensor]]:
    collator = DataCollatorWithPadding(tokenizer)
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in encoded.column_names]
    rows = encoded.select_columns(columns)
    return [collator([rows[j] for j in range(i, min(i + batch_size, len(rows)))]) for i in range(0, len(rows), batch_size)]


@torch.inference_mode()
def time_model(model, batches, repeats: int = 2, **forward_kwargs) -> float:
    """Seconds for one pass over `batches` (the fastest of `repeats` passes, after one warm-up batch)."""
    model.eval()
    model(**batches[0], **forward_kwargs)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            model(**batch, **forward_kwargs)
        best = min(best, time.perf_counter() - start)
    return best


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
def _stock_accuracy(stock, batches, labels: torch.Tensor) -> float:
    stock.eval()
    predictions = torch.cat([stock(**batch).logits.argmax(-1) for batch in batches])
    correct = predictions == labels
    return float(correct.double().mean() * 100), correct.tolist()


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


def _pruning_off(knob: str | None, value) -> bool:
    return knob is None or (knob == "keep_ratio_scale" and value == 0) or (knob == "prune_threshold_offset" and value <= -1.0)


def _frontier(points: list[dict]) -> list[dict]:
    """Points no other point beats on both accuracy and FLOPs (ties: the faster one)."""
    ordered = sorted(points, key=lambda p: (p["flops_ratio"], -p["accuracy"]))
    frontier, best = [], -math.inf
    for point in ordered:
        if point["accuracy"] > best + 1e-9:
            frontier.append(point)
            best = point["accuracy"]
    return frontier


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
    log=print,
) -> dict[str, Any]:
    """Sweep the exit threshold (or patience) and the pruning knob on `dataset`; return the report dict.

    dataset: raw (text + label columns, labels named as the model's `label2id` or ClassLabel) or already tokenized
    (`input_ids`, `attention_mask`, `labels`). stock_model: the stock fine-tuned classifier to compare speed and accuracy
    with (default: the pyramid's own backbone, run as a plain stock model). Accuracies are in percent; `max_drop` is in
    accuracy points below the stock model's accuracy on the same data (the pyramid at full depth and no pruning if no
    stock model). `measure`: "frontier" times every point on the speed/accuracy frontier, "chosen" only the chosen one,
    or a list of settings (dicts as in the points) to time at batch `batch_size` and at batch 1.
    Timings are on this machine, batch `batch_size` over the whole data, and batch 1 over `batch1_samples` samples.
    """
    from .training import prepare_dataset

    model.eval()
    config = model.config
    if "input_ids" in dataset.column_names and "labels" in dataset.column_names:
        encoded = dataset if max_samples is None or max_samples >= len(dataset) else dataset.shuffle(seed=seed).select(range(max_samples))
    else:
        encoded = prepare_dataset(
            dataset, tokenizer, dict(config.label2id), text_column=text_column, text_pair_column=text_pair_column,
            label_column=label_column, max_length=max_length, split="validation", max_samples=max_samples, seed=seed,
        )
    labels = torch.tensor(encoded["labels"])
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
    stock_accuracy, stock_correct = _stock_accuracy(stock_model, batches, labels)

    points: list[dict] = []
    full_flops_total = None
    for value in knob_values:
        knob_kwargs = {} if knob is None else {knob: value}
        all_logits, all_kept, all_full = [], [], []
        for batch in batches:
            out = model(**batch, output_all_exits=True, **knob_kwargs)
            all_logits.append(torch.stack(out.exit_logits, dim=1).float())
            all_kept.append(out.kept_tokens)
            all_full.append(full_model_flops(model, batch["attention_mask"]))
        exit_logits = torch.cat(all_logits)
        kept = torch.cat(all_kept)
        full_flops = torch.cat(all_full).double()
        full_flops_total = float(full_flops.sum())
        lengths = kept[:, 0].double()
        for exit_value in exit_grid:
            index = simulate_exit_index(exit_logits, criterion, exit_value)
            exit_layer = exit_layers[index]
            predictions = exit_logits[torch.arange(num_samples), index].argmax(-1)
            ran = torch.arange(1, num_layers + 1)[None, :] <= exit_layer[:, None]
            kept_run = kept * ran
            flops = sample_flops(model, kept_run, exit_layer, **knob_kwargs).double()
            point = {
                "setting": {exit_key: exit_value, **({knob: value} if knob else {})},
                "accuracy": round(float((predictions == labels).double().mean() * 100), 3),
                "mean_exit_layer": round(float(exit_layer.double().mean()), 3),
                "kept_token_fraction": round(float(kept_run.sum() / (lengths[:, None] * ran).sum()), 4),
                "flops_ratio": round(float(flops.sum() / full_flops.sum()), 4),
                "mean_flops_ratio": round(float((flops / full_flops).mean()), 4),
                "early_exit": exit_value is not None,
                "pruning": not _pruning_off(knob, value),
            }
            point["flops_speedup"] = round(1.0 / max(point["flops_ratio"], 1e-9), 3)
            if keep_correct:  # per-sample correctness, for paired comparisons (not written to calibration.json)
                point["_correct"] = (predictions == labels).tolist()
            points.append(point)
        log(f"calibrate: {knob or 'no pruning'}={value}: {len(exit_grid)} exit settings evaluated")

    reference = stock_accuracy
    chosen, budget_met = None, None
    if max_drop is not None:
        chosen, budget_met = choose_point(points, reference, max_drop)

    # Wall clock: the stock model and the measured points on the same batches, in the same process, interleaved
    # (each repeat times the stock model, then every point) so that load from other processes hits them alike.
    if isinstance(measure, (list, tuple)):  # explicit settings: timed at batch `batch_size` and at batch 1
        wanted = [_normalise_setting(s) for s in measure]
        to_measure = [p for p in points if _normalise_setting(p["setting"]) in wanted]
        single_points = list(to_measure)
    else:
        to_measure = _frontier(points) if measure == "frontier" else []
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
        stock["_correct"] = stock_correct
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
        "exit_criterion": criterion,
        "token_pruning": config.token_pruning,
        "pruning_knob": knob,
        "stock": stock,
        "reference_accuracy": round(reference, 3),
        "max_drop": max_drop,
        "chosen": chosen,
        "budget_met": budget_met,
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


def choose_point(points: list[dict], reference_accuracy: float, max_drop: float) -> tuple[dict, bool]:
    """The setting to store as the default speed, and whether it meets the budget.

    The lowest-FLOPs point within `max_drop` points of `reference_accuracy`; when none is, the most accurate point
    measured (ties: the cheaper one), which may be the exact model (no early exit, no pruning). So a sweep never stores
    a setting that it measured as less accurate than another it could have chosen.
    """
    eligible = [p for p in points if p["accuracy"] >= reference_accuracy - max_drop - 1e-9]
    if eligible:
        return min(eligible, key=lambda p: (p["flops_ratio"], -p["accuracy"])), True
    return max(points, key=lambda p: (p["accuracy"], -p["flops_ratio"])), False


def best_within(report: dict, max_drop: float, early_exit: bool | None = None, pruning: bool | None = None) -> dict | None:
    """The lowest-FLOPs point within `max_drop` points of the reference accuracy, optionally restricted to points with
    (or without) early exit / pruning. None when no point qualifies."""
    eligible = [
        p for p in report["points"]
        if p["accuracy"] >= report["reference_accuracy"] - max_drop - 1e-9
        and (early_exit is None or p["early_exit"] == early_exit)
        and (pruning is None or p["pruning"] == pruning)
    ]
    return min(eligible, key=lambda p: (p["flops_ratio"], -p["accuracy"])) if eligible else None


def format_table(report: dict, limit: int | None = None) -> str:
    """The frontier (and the chosen point) as a text table."""
    rows = _frontier(report["points"])
    if report.get("chosen") and report["chosen"] not in rows:
        rows.append(report["chosen"])
    header = f"{'setting':<48} {'acc %':>7} {'exit L':>7} {'kept':>6} {'FLOPs':>6} {'speedup':>8}"
    lines = [f"stock model: accuracy {report['stock']['accuracy']:.2f}% on {report['num_samples']} samples", header]
    for p in rows[:limit]:
        setting = ", ".join(f"{k}={v}" for k, v in p["setting"].items())
        measured = f"{p['measured_speedup']:.2f}x" if "measured_speedup" in p else "-"
        mark = " *" if p is report.get("chosen") else ""
        lines.append(
            f"{setting:<48} {p['accuracy']:>7.2f} {p['mean_exit_layer']:>7.2f} {p['kept_token_fraction']:>6.2f} "
            f"{p['flops_ratio']:>6.3f} {measured:>8}{mark}"
        )
    return "\n".join(lines)


def plot_calibration(report: dict, path) -> None:
    """Accuracy vs FLOPs speedup, one curve per pruning knob value; measured speedups annotated."""
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
        label = "no pruning" if knob is None else f"{knob}={value}"
        axis.plot([p["flops_speedup"] for p in group], [p["accuracy"] for p in group], marker=".", label=label)
    axis.axhline(report["stock"]["accuracy"], color="gray", linestyle="--", linewidth=1, label="stock model")
    if report.get("max_drop") is not None:
        axis.axhline(report["reference_accuracy"] - report["max_drop"], color="red", linestyle=":", linewidth=1,
                     label=f"-{report['max_drop']} pt")
    for point in report["points"]:
        if "measured_speedup" in point:
            axis.annotate(f"{point['measured_speedup']:.2f}x", (point["flops_speedup"], point["accuracy"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
    if report.get("chosen"):
        axis.plot([report["chosen"]["flops_speedup"]], [report["chosen"]["accuracy"]], marker="*", markersize=14,
                  color="black", linestyle="none", label="chosen")
    axis.set_xlabel("FLOPs speedup vs stock model (annotations: measured wall-clock speedup, batch %d)" % report["batch_size"])
    axis.set_ylabel(f"accuracy % ({report['num_samples']} samples)")
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
    log=print,
    **calibrate_kwargs,
) -> dict:
    """Load a saved model (and its tokenizer), `calibrate`, write `calibration.json` + `calibration.png`, and with
    `max_drop` store the chosen speed in `config.json` (nothing else in `model_dir` is written)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json: pass the folder of a trained Magic Pyramid model.")
    model = MagicPyramidForSequenceClassification.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    stock_path = stock_model or _stock_model_for(model_dir)
    stock = AutoModelForSequenceClassification.from_pretrained(stock_path) if stock_path else None
    report = calibrate(model, dataset, tokenizer, stock_model=stock, max_drop=max_drop, log=log, **calibrate_kwargs)
    if stock_path:
        report["stock"]["model"] = str(stock_path)
    report_dir = Path(report_dir) if report_dir else model_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    write_report(report, report_dir)
    if max_drop is not None:
        chosen = report["chosen"]
        if not report["budget_met"]:
            log(
                f"WARNING: no setting is within {max_drop} points of the reference accuracy "
                f"({report['reference_accuracy']:.2f}% on {report['num_samples']} samples). Storing the most accurate "
                f"setting measured instead: {chosen['setting']} at {chosen['accuracy']:.2f}% "
                f"({chosen['accuracy'] - report['reference_accuracy']:+.2f} points), FLOPs ratio {chosen['flops_ratio']:.3f}."
            )
        model.set_speed(**chosen["setting"])  # None: never exit early, as in the config
        model.sync_config()
        model.config.to_json_file(str(model_dir / "config.json"), use_diff=True)
        log(f"Stored the default speed {chosen['setting']} in {model_dir / 'config.json'}")
    return report


def write_report(report: dict, directory) -> None:
    """`calibration.json` (the format documented in `hub.py`, which the model card reads) and `calibration.png`."""
    directory = Path(directory)
    data = _public(report)
    try:
        from .hub import validate_calibration
    except ImportError:  # hub.py is optional here; the format is the same
        validate_calibration = None
    if validate_calibration is not None:
        validate_calibration(copy.deepcopy(data))
    (directory / CALIBRATION_JSON).write_text(json.dumps(data, indent=2))
    plot_calibration(report, directory / CALIBRATION_PNG)


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


__all__ = ["calibrate", "calibrate_folder", "choose_point", "simulate_exit_index", "best_within", "format_table", "plot_calibration", "time_model", "time_interleaved"]


# =====================================================================================================================
# Moved verbatim from hub.py by helper "hub" (issue 10: calibration.py owns calibration.json). Names follow the agreed
# interface (hub's CALIBRATION_FILE / CALIBRATION_FORMAT / CALIBRATION_VERSION are this file's CALIBRATION_JSON /
# FORMAT_NAME / FORMAT_VERSION; hub._frontier is frontier). Helper "calib" makes the same move; the lead keeps one copy on merge.
#
# Calibration result (`calibration.json`, beside config.json): what `calibration.py` writes, and what `write_model_card`
# reads to show a speed/accuracy table. One JSON object (comments here only):
#
#     {
#       "format": "hf-magicpyramid-calibration",      # required, with "version": 1
#       "version": 1,
#       "num_samples": 1390,                          # optional: samples measured (the reader judges accuracy noise by it)
#       "batch_size": 32,                             # optional: batch size of the speed measurement
#       "dataset": "Rotten Tomatoes snippets, test",  # optional, free text; "device" likewise
#       "stock": {"accuracy": 84.2},                  # optional: the stock fine-tuned model on the same data (percent)
#       "chosen": {...},                              # optional: the point stored as the model's default speed
#       "points": [                                   # one per speed setting measured, any order
#         {
#           "setting": {                              # the knobs, as `set_speed` takes them:
#             "exit_threshold": 0.3,                  #   "exit_threshold" (entropy / confidence) or "patience";
#                                                     #   null = never exit early
#             "keep_ratio_scale": 1.0                 #   "keep_ratio_scale" (topk) or "prune_threshold_offset"
#           },                                        #   (threshold), when the model prunes
#           "accuracy": 83.8,                         # percent
#           "mean_exit_layer": 3.2,                   # mean 1-based layer at which samples exited
#           "kept_token_fraction": 0.71,              # token-layers run / token-layers without pruning, in [0, 1]
#           "flops_ratio": 0.41,                      # FLOPs / the stock model's (0.41 = 59% fewer)
#           "measured_speedup": 2.2                   # optional: stock wall-clock time / this setting's, when measured
#         }
#       ]
#     }
#
# Also read: knobs given flat in the point instead of under "setting", and "speedup" for "measured_speedup". Other
# keys are kept and ignored. A plot may lie beside it as `calibration.png`; the model card shows both.
# =====================================================================================================================

EXIT_KNOBS = ("exit_threshold", "patience")
PRUNING_KNOBS = ("keep_ratio_scale", "prune_threshold_offset")
CALIBRATION_MEASURES = ("accuracy", "mean_exit_layer", "kept_token_fraction", "flops_ratio")


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
    normalized = []
    for i, raw in enumerate(points):
        where = f"{source}: points[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must be an object, not {type(raw).__name__}.")
        setting = raw.get("setting")
        if setting is None:
            setting = {knob: raw[knob] for knob in EXIT_KNOBS + PRUNING_KNOBS if knob in raw}
        if not isinstance(setting, dict) or not setting:
            raise ValueError(f"{where} names no speed knob: give a 'setting' with one of {', '.join(EXIT_KNOBS + PRUNING_KNOBS)}.")
        unknown = sorted(set(setting) - set(EXIT_KNOBS + PRUNING_KNOBS))
        if unknown:
            raise ValueError(f"{where}.setting has unknown knobs {unknown}; knobs are {', '.join(EXIT_KNOBS + PRUNING_KNOBS)}.")
        if all(knob in setting for knob in EXIT_KNOBS) or all(knob in setting for knob in PRUNING_KNOBS):
            raise ValueError(f"{where} gives two knobs of one kind: use one of {EXIT_KNOBS} and at most one of {PRUNING_KNOBS}.")
        for knob, value in setting.items():
            if value is not None and not _number(value):
                raise ValueError(f"{where}: {knob}={value!r} must be a number (or null for an exit knob: never exit early).")
        for measure in CALIBRATION_MEASURES:
            if not _number(raw.get(measure)):
                raise ValueError(f"{where} lacks a number for {measure!r} (got {raw.get(measure)!r}); every point needs {CALIBRATION_MEASURES}.")
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
    return {**data, "points": normalized}


def save_calibration(save_directory, points: list[dict], **metadata) -> Path:
    """Validate and write `calibration.json` into `save_directory`; `metadata`: num_samples, batch_size, dataset,
    device, stock, chosen (see the module docstring). Returns the file's path."""
    data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **metadata, "points": list(points)}
    validate_calibration(data)
    path = Path(save_directory) / CALIBRATION_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def load_calibration(path_or_dir) -> dict | None:
    """The validated calibration result in a model folder (or a JSON file), or None when there is none."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / CALIBRATION_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return validate_calibration(data, source=str(path))


def frontier(points: list[dict]) -> list[dict]:
    """Points no other point beats: fewer FLOPs at accuracy at least as high, in order of FLOPs."""
    kept, best = [], -math.inf
    for point in sorted(points, key=lambda p: (p["flops_ratio"], -p["accuracy"])):
        if point["accuracy"] > best:
            kept.append(point)
            best = point["accuracy"]
    return kept
