"""Calibration: the offline exit rule is the model's own, the sweep's numbers are the model's, the calibration.json
format (validation, reading, writing, frontier, budget rule), the sweep table, and a sweep without matplotlib."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from transformers import BertTokenizer

import hf_magicpyramid  # noqa: F401
from hf_magicpyramid import MagicPyramidForSequenceClassification
from hf_magicpyramid.calibration import (
    CALIBRATION_JSON,
    CALIBRATION_PNG,
    CONFIDENCE_GRID,
    ENTROPY_GRID,
    FORMAT_NAME,
    FORMAT_VERSION,
    _batches,
    _forward_kwargs,
    _predict,
    best_within,
    budget_warning,
    calibrate,
    choose_point,
    format_table,
    frontier,
    is_default_point,
    load_calibration,
    save_calibration,
    save_report,
    simulate_exit_index,
    validate_calibration,
)

from tiny import padded_batch, tiny_stock  # noqa: E402

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
PROBLEMS = {  # name: (num_labels, problem_type)
    "single": (2, "single_label_classification"),
    "multi": (3, "multi_label_classification"),
    "regression": (1, "regression"),
}


def tiny_pyramid(problem: str, **options) -> MagicPyramidForSequenceClassification:
    """A tiny BERT pyramid (4 layers, exits at 1-3) whose exit heads are sharpened so that the grid's settings spread
    the samples over the exits (untrained heads give near-uniform logits that rarely leave)."""
    num_labels, problem_type = PROBLEMS[problem]
    stock = tiny_stock("bert", num_labels=num_labels, problem_type=problem_type, **NO_DROPOUT)
    model = MagicPyramidForSequenceClassification.from_backbone(stock, exit_pooling="mean", **options).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for head in model.exits.values():
            head.classifier.weight.normal_(0.0, 2.0)
            head.classifier.bias.normal_(0.0, 0.5)
    return model


def grid(model, criterion: str) -> list:
    if criterion == "entropy":
        return list(ENTROPY_GRID)
    if criterion == "confidence":
        return list(CONFIDENCE_GRID)
    return [None] + list(range(len(model.exit_layers) - 1, 0, -1))


def toy_labels(problem: str, num_samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if problem == "multi":
        return torch.randint(0, 2, (num_samples, 3), generator=generator).float()
    return torch.randint(0, 2, (num_samples,), generator=generator)


# ---------------------------------------------------------------------------------------------------------------------
# One exit rule: the simulation decides what the model's own batched forward decides
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "problem, criterion",
    [(p, c) for p in ("single", "multi") for c in ("entropy", "confidence", "patience")] + [("regression", "patience")],
)
def test_simulated_exits_match_the_model(problem, criterion):
    """At every grid point (and two pruning values) the simulated exit layers and predictions are, bit for bit, those
    of the model's own batched forward at that setting."""
    model = tiny_pyramid(problem, exit_criterion=criterion, token_pruning="topk", regression_tolerance=0.5)
    _, problem_type = PROBLEMS[problem]
    input_ids, attention_mask = padded_batch(lengths=(9, 6, 3, 12, 5, 8, 11, 4, 7, 10, 2, 12, 6, 9, 3, 8), seed=4)
    leaves_early = False
    for scale in (0.0, 1.5):
        with torch.no_grad():
            everything = model(input_ids, attention_mask, output_all_exits=True, keep_ratio_scale=scale)
        exit_logits = torch.stack(everything.exit_logits, dim=1)
        rows = torch.arange(len(input_ids))
        for value in grid(model, criterion):
            setting = {("patience" if criterion == "patience" else "exit_threshold"): value, "keep_ratio_scale": scale}
            with torch.no_grad():
                real = model(input_ids, attention_mask, **_forward_kwargs(setting, len(model.exit_layers), criterion))
            index = simulate_exit_index(exit_logits, criterion, value, problem_type, model.config.regression_tolerance)
            where = f"{problem} {criterion}={value} keep_ratio_scale={scale}"
            assert torch.equal(torch.tensor(model.exit_layers)[index], real.exit_layer), where
            torch.testing.assert_close(exit_logits[rows, index], real.logits, atol=1e-5, rtol=1e-4)
            if problem != "regression":
                assert torch.equal(_predict(exit_logits[rows, index], problem_type), _predict(real.logits, problem_type)), where
            leaves_early |= bool((real.exit_layer < 4).any())
    assert leaves_early, "no grid point lets a sample leave early: the test would not see a wrong rule"


def test_the_single_label_rule_is_not_the_multi_label_rule():
    """The multi-label rule (sigmoid per label) decides differently from the softmax rule on the same logits: a
    simulation that ignored the problem type would calibrate a rule the model does not run."""
    model = tiny_pyramid("multi", exit_criterion="confidence")
    input_ids, attention_mask = padded_batch(lengths=(9, 6, 3, 12, 5, 8, 11, 4), seed=4)
    with torch.no_grad():
        exit_logits = torch.stack(model(input_ids, attention_mask, output_all_exits=True).exit_logits, dim=1)
    differs = [
        value for value in CONFIDENCE_GRID[1:]
        if not torch.equal(simulate_exit_index(exit_logits, "confidence", value, "multi_label_classification"),
                           simulate_exit_index(exit_logits, "confidence", value, "single_label_classification"))
    ]
    assert differs


def tokenized(problem: str, num_samples: int = 24) -> datasets.Dataset:
    lengths = [3 + (7 * i) % 10 for i in range(num_samples)]
    input_ids, attention_mask = padded_batch(lengths=lengths, seed=5)
    labels = toy_labels(problem, num_samples)
    return datasets.Dataset.from_dict({
        "input_ids": [ids[: int(mask.sum())].tolist() for ids, mask in zip(input_ids, attention_mask)],
        "attention_mask": [mask[: int(mask.sum())].tolist() for mask in attention_mask],
        "labels": labels.tolist(),
    })


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizer:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]) + "\n")
    return BertTokenizer(str(path), do_lower_case=False)


@pytest.mark.parametrize("problem, criterion", [("multi", "entropy"), ("multi", "patience"), ("single", "confidence")])
def test_sweep_points_are_what_the_model_does(tokenizer, problem, criterion):
    """A whole sweep: each point's accuracy (exact match for multi-label) and mean exit layer equal those of the model's
    own forward at that setting, on the same batches."""
    model = tiny_pyramid(problem, exit_criterion=criterion, token_pruning="topk")
    data = tokenized(problem)
    report = calibrate(model, data, tokenizer, batch_size=8, pruning_grid=[0.0, 2.0], measure="chosen", timing_repeats=1,
                       batch1_samples=0, log=lambda *_: None)
    _, problem_type = PROBLEMS[problem]
    assert report["metric"] == ("exact_match" if problem == "multi" else "accuracy")
    labels = torch.tensor(data["labels"])
    batches = _batches(data, tokenizer, 8)
    assert len(report["points"]) == 2 * len(grid(model, criterion))
    for point in report["points"]:
        with torch.no_grad():
            outputs = [model(**batch, **_forward_kwargs(point["setting"], len(model.exit_layers), criterion)) for batch in batches]
        predictions = _predict(torch.cat([o.logits for o in outputs]), problem_type)
        right = (predictions == (labels > 0.5)).all(-1) if problem == "multi" else predictions == labels
        exit_layer = torch.cat([o.exit_layer for o in outputs])
        assert point["accuracy"] == round(float(right.double().mean() * 100), 3), point["setting"]
        assert point["mean_exit_layer"] == round(float(exit_layer.double().mean()), 3), point["setting"]
    assert len({p["mean_exit_layer"] for p in report["points"]}) > 2  # the grid really moves the exits
    assert validate_calibration(copy.deepcopy({k: v for k, v in report.items() if k != "table"}))


def test_regression_is_refused_with_a_message(tokenizer):
    model = tiny_pyramid("regression", exit_criterion="patience")
    data = tokenized("single").map(lambda row: {"labels": float(row["labels"])})
    with pytest.raises(ValueError, match="problem_type='regression' has no accuracy"):
        calibrate(model, data, tokenizer, log=lambda *_: None)


def test_labels_of_another_kind_are_refused(tokenizer):
    model = tiny_pyramid("single", exit_criterion="entropy")
    with pytest.raises(ValueError, match="multi-hot labels .* set config.problem_type"):
        calibrate(model, tokenized("multi"), tokenizer, log=lambda *_: None)


# ---------------------------------------------------------------------------------------------------------------------
# One best-point rule, one frontier
# ---------------------------------------------------------------------------------------------------------------------


def test_choose_point_falls_back_to_the_most_accurate_setting():
    points = [
        {"setting": {"exit_threshold": None, "keep_ratio_scale": 0.0}, "accuracy": 80.0, "flops_ratio": 1.0},
        {"setting": {"exit_threshold": 0.5, "keep_ratio_scale": 0.0}, "accuracy": 81.0, "flops_ratio": 0.6},
        {"setting": {"exit_threshold": 0.3, "keep_ratio_scale": 0.0}, "accuracy": 81.0, "flops_ratio": 0.7},
        {"setting": {"exit_threshold": 0.9, "keep_ratio_scale": 2.0}, "accuracy": 70.0, "flops_ratio": 0.2},
    ]
    assert choose_point(points, 82.0, 0.5) == (points[1], False)  # none within 0.5 of 82: most accurate, then cheaper
    assert choose_point(points, 82.0, 1.5) == (points[1], True)  # 81 and 81 qualify: the cheaper
    assert choose_point(points, 82.0, 12.0) == (points[3], True)
    assert choose_point(points[:1], 90.0, 0.0) == (points[0], False)  # down to the exact model


def test_best_within_uses_the_rule_of_choose_point():
    points = [
        {"setting": {"exit_threshold": None, "keep_ratio_scale": 0.0}, "accuracy": 80.0, "flops_ratio": 1.0,
         "early_exit": False, "pruning": False},
        {"setting": {"exit_threshold": 0.5, "keep_ratio_scale": 0.0}, "accuracy": 79.5, "flops_ratio": 0.6,
         "early_exit": True, "pruning": False},
        {"setting": {"exit_threshold": None, "keep_ratio_scale": 2.0}, "accuracy": 79.0, "flops_ratio": 0.5,
         "early_exit": False, "pruning": True},
        {"setting": {"exit_threshold": 0.9, "keep_ratio_scale": 2.0}, "accuracy": 70.0, "flops_ratio": 0.2,
         "early_exit": True, "pruning": True},
    ]
    report = {"points": points, "reference_accuracy": 80.0}
    for max_drop in (0.0, 0.5, 1.0, 10.0):  # 0.5 and 1.0: exactly on the budget's edge, which qualifies
        point, met = choose_point(points, 80.0, max_drop)
        assert met and best_within(report, max_drop) is point
    assert best_within(report, 1.0, pruning=False) is points[1]
    assert best_within(report, 1.0, early_exit=False, pruning=True) is points[2]
    assert best_within({"points": points, "reference_accuracy": 90.0}, 1.0) is None
    assert choose_point(points, 90.0, 1.0) == (points[0], False)


def test_frontier_keeps_what_no_other_point_beats():
    def point(accuracy, flops):
        return {"setting": {"exit_threshold": flops}, "accuracy": accuracy, "flops_ratio": flops}

    a, b, c, d, e = point(90.0, 1.0), point(90.0, 0.8), point(85.0, 0.5), point(84.0, 0.6), point(85.0 + 1e-12, 0.4)
    # b beats a (as accurate, cheaper); e ties c within the tolerance and is cheaper; d is beaten by e.
    assert frontier([a, b, c, d, e]) == [e, b]
    assert frontier([c]) == [c]


# ---------------------------------------------------------------------------------------------------------------------
# The calibration.json format
# ---------------------------------------------------------------------------------------------------------------------

GOOD = {"setting": {"exit_threshold": 0.2}, "accuracy": 90.0, "mean_exit_layer": 2.0, "kept_token_fraction": 1.0,
        "flops_ratio": 0.5, "measured_speedup": 2.0}
HEADER = {"format": FORMAT_NAME, "version": FORMAT_VERSION}


def test_calibration_format_round_trip_and_errors(tmp_path):
    assert load_calibration(tmp_path) is None
    unmeasured = {**GOOD, "setting": {"exit_threshold": None, "keep_ratio_scale": 1.0}}
    del unmeasured["measured_speedup"]
    path = save_calibration(tmp_path, [GOOD, unmeasured], num_samples=6, stock={"accuracy": 50.0}, budget_met=False)
    assert path == tmp_path / CALIBRATION_JSON
    data = load_calibration(tmp_path)
    assert data == load_calibration(path)
    assert data["format"] == FORMAT_NAME and data["budget_met"] is False and len(data["points"]) == 2
    assert data["points"][1]["measured_speedup"] is None
    flat = {"exit_threshold": 0.2, "keep_ratio_scale": 1.5, "accuracy": 90.0, "mean_exit_layer": 2.0,
            "kept_token_fraction": 0.7, "flops_ratio": 0.4, "speedup": 2.5}
    normalized = validate_calibration({**HEADER, "points": [GOOD, flat]})["points"]
    assert normalized[1]["setting"] == {"exit_threshold": 0.2, "keep_ratio_scale": 1.5}
    assert normalized[1]["measured_speedup"] == 2.5
    for bad, message in [
        ({**HEADER, "points": []}, "non-empty"),
        ({**HEADER, "points": [{**GOOD, "accuracy": 190}]}, "accuracy"),
        ({**HEADER, "points": [{k: v for k, v in GOOD.items() if k != "flops_ratio"}]}, "flops_ratio"),
        ({**HEADER, "points": [{k: v for k, v in GOOD.items() if k != "setting"}]}, "no speed knob"),
        ({**HEADER, "points": [{**GOOD, "setting": {"exit_threshold": 0.2, "patience": 2}}]}, "two knobs"),
        ({**HEADER, "points": [{**GOOD, "setting": {"speed": 2}}]}, "unknown knobs"),
        ({**HEADER, "metric": "f1", "points": [GOOD]}, "metric='f1' is not supported"),
        ({**HEADER, "budget_met": "yes", "points": [GOOD]}, "budget_met"),
        ({"format": FORMAT_NAME, "version": 2, "points": [GOOD]}, "not supported"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate_calibration(bad)
    with pytest.raises(ValueError, match="accuracy"):  # nothing invalid is written
        save_calibration(tmp_path / "bad", [{**GOOD, "accuracy": -1}])
    assert not (tmp_path / "bad" / CALIBRATION_JSON).exists()
    (tmp_path / CALIBRATION_JSON).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(tmp_path)


def test_is_default_point():
    config = tiny_pyramid("single", token_pruning="topk", exit_threshold=0.3, keep_ratio_scale=1.0).config
    assert is_default_point(config, {"setting": {"exit_threshold": 0.3, "keep_ratio_scale": 1.0}})
    assert not is_default_point(config, {"setting": {"exit_threshold": None, "keep_ratio_scale": 1.0}})
    assert not is_default_point(config, {"setting": {"exit_threshold": 0.3, "keep_ratio_scale": 2.0}})


# ---------------------------------------------------------------------------------------------------------------------
# The sweep table
# ---------------------------------------------------------------------------------------------------------------------


def table_report(budget_met: bool) -> dict:
    points = [
        {"setting": {"exit_threshold": None, "keep_ratio_scale": 0.0}, "accuracy": 80.0, "mean_exit_layer": 4.0,
         "kept_token_fraction": 1.0, "flops_ratio": 1.0, "measured_speedup": 1.0},
        {"setting": {"exit_threshold": 0.3, "keep_ratio_scale": 1.5}, "accuracy": 79.0, "mean_exit_layer": 2.5,
         "kept_token_fraction": 0.6, "flops_ratio": 0.4},
    ]
    reference, max_drop = (80.0, 1.0) if budget_met else (85.0, 1.0)
    chosen, met = choose_point(points, reference, max_drop)
    assert met is budget_met
    return {"points": points, "chosen": chosen, "budget_met": met, "max_drop": max_drop, "reference_accuracy": reference,
            "stock": {"accuracy": reference}, "num_samples": 40, "batch_size": 32, "metric": "accuracy"}


def test_table_says_pruning_off_never_and_what_the_marker_means():
    table = format_table(table_report(budget_met=True))
    assert "exit_threshold=never, pruning off" in table and "exit_threshold=0.3, keep_ratio_scale=1.5" in table
    assert "None" not in table and "keep_ratio_scale=0.0" not in table
    marked = [line for line in table.splitlines() if line.endswith(" *")]
    assert len(marked) == 1 and "keep_ratio_scale=1.5" in marked[0]
    assert "* chosen: the setting with the fewest FLOPs within 1.0 points of the reference 80.00%." in table
    assert "FALLBACK" not in table

    table = format_table(table_report(budget_met=False))
    marked = [line for line in table.splitlines() if line.endswith(" *")]
    assert len(marked) == 1 and "pruning off" in marked[0]
    assert "* chosen as a FALLBACK: no setting is within 1.0 points of the reference 85.00%" in table
    assert "(-5.00 points)" in table


def test_budget_warning_names_the_fallback_and_its_numbers():
    # One text for `sweep` and for train's last stage: the budget, the reference, and what was stored instead.
    assert budget_warning(table_report(budget_met=True)) is None
    warning = budget_warning(table_report(budget_met=False))
    assert warning == (
        "WARNING: no setting is within 1.0 points of the reference accuracy (85.00% on 40 samples). Storing the most "
        "accurate setting measured instead: exit_threshold=never, pruning off at 80.00% (-5.00 points), FLOPs ratio 1.000."
    )
    assert budget_warning({**table_report(budget_met=False), "max_drop": None}) is None


def test_table_of_a_threshold_model_and_a_multi_label_one():
    report = table_report(budget_met=True)
    for point in report["points"]:
        point["setting"] = {"patience": None if point["setting"]["exit_threshold"] is None else 2,
                            "prune_threshold_offset": -1.0 if point["setting"]["keep_ratio_scale"] == 0 else 0.01}
    report["metric"] = "exact_match"
    table = format_table(report)
    assert "patience=never, pruning off" in table and "patience=2, prune_threshold_offset=0.01" in table
    assert "exact match (every label right) 80.00%" in table and "exact %" in table


# ---------------------------------------------------------------------------------------------------------------------
# A sweep without matplotlib stores its result
# ---------------------------------------------------------------------------------------------------------------------


def test_sweep_without_matplotlib_stores_the_speed(tmp_path, tokenizer):
    model_dir = tmp_path / "model"
    model = tiny_pyramid("multi", exit_criterion="entropy", token_pruning="topk")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    tokenized("multi").save_to_disk(str(tmp_path / "data"))
    (model_dir / CALIBRATION_PNG).write_bytes(b"an older plot")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["matplotlib"] = None  # as if the plot extra were not installed
        import datasets
        from hf_magicpyramid.calibration import calibrate_folder
        report = calibrate_folder({str(model_dir)!r}, datasets.load_from_disk({str(tmp_path / 'data')!r}), max_drop=100.0,
                                  batch_size=8, measure="chosen", timing_repeats=1, batch1_samples=0)
        print("CHOSEN", report["chosen"]["setting"])
        """
    )
    root = str(Path(__file__).resolve().parents[1])  # this checkout's package, in the child too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipped calibration.png: matplotlib is not installed" in result.stdout
    assert "removed the older calibration.png" in result.stdout
    assert not (model_dir / CALIBRATION_PNG).exists()
    data = load_calibration(model_dir)
    assert data["budget_met"] is True and data["metric"] == "exact_match"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["exit_threshold"] == data["chosen"]["setting"]["exit_threshold"] is not None
    assert config["keep_ratio_scale"] == data["chosen"]["setting"]["keep_ratio_scale"]
    loaded = MagicPyramidForSequenceClassification.from_pretrained(str(model_dir))
    assert is_default_point(loaded.config, data["chosen"])


def test_save_report_writes_what_load_calibration_reads(tmp_path, tokenizer):
    model = tiny_pyramid("single", exit_criterion="entropy")
    report = calibrate(model, tokenized("single"), tokenizer, batch_size=8, max_drop=1.0, keep_correct=True,
                       measure="chosen", timing_repeats=1, batch1_samples=0, log=lambda *_: None)
    from hf_magicpyramid.calibration import add_cross_validation

    lines: list[str] = []
    result = add_cross_validation(report, folds=3, log=lines.append)  # --calibration_folds 3
    assert lines == [report["table"].splitlines()[-1]] and lines[0].startswith("cross-validated (3 folds")
    save_report(report, tmp_path)
    data = load_calibration(tmp_path)
    assert data["cross_validation"] == result and sum(f["num_samples"] for f in result["per_fold"]) == report["num_samples"]
    assert "table" not in data and "_correct" not in data["stock"] and all("_correct" not in p for p in data["points"])
    assert data["budget_met"] == report["budget_met"] and data["chosen"]["setting"] == report["chosen"]["setting"]
    assert len(data["points"]) == len(report["points"])
    # Each point carries its paired difference to the reference, computed from the same per-sample results.
    from hf_magicpyramid.calibration import paired_difference

    for point in report["points"]:
        difference, half_width = paired_difference(point["_correct"], report["stock"]["_correct"])
        assert (point["difference"], point["difference_interval"]) == (round(difference, 3), round(half_width, 3))
        assert point["difference"] == pytest.approx(point["accuracy"] - report["reference_accuracy"], abs=2e-3)


def test_paired_difference_on_hand_made_predictions():
    from hf_magicpyramid.calibration import paired_difference, samples_to_resolve

    setting = [1, 1, 0, 1, 0]
    reference = [1, 0, 0, 1, 1]
    difference, half_width = paired_difference(setting, reference)
    # d = [0, 1, 0, 0, -1]: mean 0; sample sd sqrt(2 / 4); half-width 1.96 * sd / sqrt(5), in points
    assert difference == 0.0
    assert half_width == pytest.approx(1.96 * math.sqrt(0.5) / math.sqrt(5) * 100)
    difference, half_width = paired_difference([True, True, True, True], [True, False, True, False])
    assert difference == pytest.approx(50.0)  # two samples gained, none lost
    assert half_width == pytest.approx(1.96 * math.sqrt(1 / 3) / 2 * 100)  # d = [0, 1, 0, 1]: sd sqrt(1/3)
    assert paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)  # identical predictions: no uncertainty
    with pytest.raises(ValueError, match="one length"):
        paired_difference([1, 0], [1, 0, 1])
    # The half-width falls as 1/sqrt(n): a 2-point interval on 400 samples needs 16x the samples for 0.5 points.
    assert samples_to_resolve(2.0, 400, 0.5) == 6400
    assert samples_to_resolve(0.3, 400, 0.5) == 400  # already resolved
    assert samples_to_resolve(2.0, 400, 0.0) is None


def test_cross_validated_choice_on_hand_made_predictions():
    from hf_magicpyramid.calibration import cross_validated_choice, describe_cross_validation, paired_difference

    reference = [1] * 10
    cheap = {"setting": {"exit_threshold": 0.5}, "flops_ratio": 0.3, "_correct": [1] * 8 + [0] * 2}
    exact = {"setting": {"exit_threshold": None}, "flops_ratio": 1.0, "_correct": [1] * 10}
    # A budget every fold meets with the cheap setting: each sample is scored once, by the cheap setting, so the
    # held-out estimate is exactly the cheap setting's paired difference on all samples.
    result = cross_validated_choice([cheap, exact], reference, max_drop=100.0, folds=5)
    assert (result["difference"], result["difference_interval"]) == tuple(round(v, 3) for v in paired_difference(cheap["_correct"], reference))
    assert result["difference"] == -20.0 and result["budget_met_folds"] == 5
    assert [fold["setting"] for fold in result["per_fold"]] == [cheap["setting"]] * 5
    assert sum(fold["num_samples"] for fold in result["per_fold"]) == 10
    # A budget no fold meets: the most accurate setting everywhere (ties: the cheaper). Wrong on 6 of 10, the cheap
    # setting is wrong somewhere in each half, so exact is chosen in both folds: no drop, no uncertainty.
    poor = dict(cheap, _correct=[1] * 4 + [0] * 6)
    result = cross_validated_choice([poor, exact], reference, max_drop=-1.0, folds=2)
    assert (result["difference"], result["difference_interval"], result["budget_met_folds"]) == (0.0, 0.0, 0)
    assert "2 folds" in describe_cross_validation(result, -1.0)

    # Selection bias: 30 settings no better than the reference (each right on a random half of 40 samples, like it).
    # Chosen on all samples, the winner looks within budget; scored on held-out folds, the same rule lands lower.
    generator = torch.Generator().manual_seed(0)
    reference = (torch.rand(40, generator=generator) < 0.5).long().tolist()
    noisy = [{"setting": {"exit_threshold": i / 100}, "flops_ratio": 0.1 + i / 100,
              "_correct": (torch.rand(40, generator=generator) < 0.5).long().tolist()} for i in range(30)]
    in_sample = max(paired_difference(p["_correct"], reference)[0] for p in noisy)
    result = cross_validated_choice(noisy, reference, max_drop=0.0, folds=4)
    assert in_sample >= 0 > result["difference"]
    for bad, message in ((1, r"folds=1 is out of range: cross-validation needs an integer in \[2, 40\]"),
                         (41, r"folds=41 is out of range")):
        with pytest.raises(ValueError, match=message):
            cross_validated_choice(noisy, reference, 0.0, bad)
    with pytest.raises(ValueError, match="keep_correct=True"):
        cross_validated_choice([{"setting": {}, "flops_ratio": 1.0}], reference, 0.0, 2)


def test_guarded_choice_tightens_the_budget_when_the_rule_misses_it_on_held_out_folds():
    from hf_magicpyramid.calibration import choose_point, describe_cross_validation, guarded_choice

    def point(threshold, flops, correct, early_exit=True):
        return {"setting": {"exit_threshold": threshold}, "flops_ratio": flops, "_correct": correct,
                "accuracy": 100 * sum(correct) / len(correct), "early_exit": early_exit, "pruning": False}

    reference = [1] * 40
    exact = point(None, 1.0, [1] * 40, early_exit=False)
    # A setting that really keeps the reference's answers: the rule holds on held-out folds, nothing changes.
    same = point(0.5, 0.4, [1] * 40)
    chosen, record = guarded_choice([same, exact], reference, 1.0, folds=4)
    assert chosen is same and record["internal_budget"] == 1.0 and record["difference"] == 0.0
    assert [t["budget"] for t in record["tried"]] == [1.0]
    # Selection bias: 30 cheap settings that each lose 1 or 2 of the 40 answers (2.5-5 points), the first of them
    # "lucky" on all samples (1 loss: -2.5) and inside a 3-point budget; on held-out folds the rule "cheapest within
    # 3" keeps picking losers, so the guard tightens, down to the exact model here.
    generator = torch.Generator().manual_seed(0)
    noisy = []
    for i in range(30):
        correct = [1] * 40
        for j in torch.randperm(40, generator=generator)[: 1 if i == 0 else 2].tolist():
            correct[j] = 0
        noisy.append(point(i / 100, 0.1 + i / 100, correct))
    points = noisy + [exact]
    plain, met = choose_point(points, 100.0, 3.0)
    assert met and plain is noisy[0]
    chosen, record = guarded_choice(points, reference, 3.0, folds=4)
    assert record["tried"][0]["budget"] == 3.0 and record["tried"][0]["difference"] < -3.0
    # Every tighter budget still lets a setting that looks perfect on the choosing folds through: the exact model.
    assert [t["budget"] for t in record["tried"]] == [3.0, 2.25, 1.5, 0.75, 0.0]
    assert all(t["difference"] < -3.0 for t in record["tried"])
    assert chosen is exact and record["internal_budget"] is None and record["difference"] == 0.0
    line = describe_cross_validation(record, 3.0)
    assert "lands beyond the budget on held-out samples, so the default is" in line and "within 3: " in line
