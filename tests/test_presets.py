"""Presets (hub_configs/*.json): every one loads, validates and maps one to one onto the recipe and the config; bad
presets fail with an error naming the entry and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_magicpyramid import MagicPyramidConfig
from hf_magicpyramid.arguments import RecipeSettings
from hf_magicpyramid.cli import parse_arguments
from hf_magicpyramid.presets import (
    TRAINING_FIELDS,
    available_presets,
    load_preset,
    preset_arguments,
    validate_preset,
)

from tiny import tiny_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_FILES = sorted((REPO_ROOT / "hub_configs").glob("*.json"))
RECIPE_FIELDS = set(RecipeSettings.__dataclass_fields__)


def test_the_nine_presets_are_found():
    assert len(PRESET_FILES) == 9
    assert sorted(available_presets()) == sorted(path.stem for path in PRESET_FILES)


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda path: path.stem)
def test_train_with_a_preset_passes_every_value_through(path):
    """Resolve `train --preset X` and find every value of the file in the resolved settings or the config built from
    them, the way the recipe builds it; every key of the file is checked (none is left over)."""
    raw = json.loads(path.read_text())
    run, _, settings = parse_arguments("train", ["--preset", path.stem, "--output_dir", "unused", "--dataset", "d"])
    backbone = raw["backbone"]
    depth_key = "n_layers" if backbone["model_type"] == "distilbert" else "num_hidden_layers"
    config = MagicPyramidConfig(
        backbone_config=tiny_config(backbone["model_type"], **{depth_key: backbone["num_hidden_layers"]}),
        exit_objective=settings.exit_objective, exit_pooling=settings.exit_pooling,
        exit_criterion=settings.exit_criterion, token_pruning=settings.token_pruning,
        pruning_penalty=settings.pruning_penalty, keep_ratios=settings.keep_ratios, **settings.pyramid_options,
    )
    checked = {"name", "description"}
    assert run.model_name_or_path == backbone["checkpoint"]
    assert config.backbone_type == backbone["model_type"] and config.num_hidden_layers == backbone["num_hidden_layers"]
    checked.add("backbone")
    for key, value in raw.items():
        if key in ("name", "description", "backbone", "training"):
            continue
        assert getattr(config, key) == value, key
        if key in RECIPE_FIELDS:
            assert getattr(settings, key) == value, key
        else:
            assert settings.pyramid_options[key] == value, key
        checked.add(key)
    for key, value in raw["training"].items():
        if key in RECIPE_FIELDS:
            assert getattr(settings, key) == value, f"training.{key}"
        else:
            assert settings.pyramid_options[key] == value, f"training.{key}"
        if hasattr(config, key):
            assert getattr(config, key) == value, f"training.{key}"
        checked.add(f"training.{key}")
    assert checked == {"name", "description", "backbone"} | (set(raw) - {"name", "description", "backbone", "training"}) | {
        f"training.{key}" for key in raw["training"]}
    # The two values that train --preset used to drop, now reaching the recipe (both differ from the defaults).
    assert (settings.warmup_ratio, settings.weight_decay) == (raw["training"]["warmup_ratio"], raw["training"]["weight_decay"])
    assert settings.warmup_ratio != RecipeSettings().warmup_ratio


@pytest.mark.parametrize("name", ["bert-base-uncased", "all-MiniLM-L6-v2"])
def test_preset_arguments_name_fields_only(name):
    values = preset_arguments(name)
    assert set(values) - {"model_name_or_path"} <= RECIPE_FIELDS
    assert set(values["pyramid_options"]).isdisjoint(RECIPE_FIELDS)
    assert set(values["pyramid_options"]) <= set(MagicPyramidConfig.__annotations__)


def test_joint_presets_hold_no_epochs_for_the_stage_they_skip():
    for path in PRESET_FILES:
        raw = json.loads(path.read_text())
        assert ("exit_epochs" in raw["training"]) == (raw["exit_objective"] != "joint"), path.stem


# ---------------------------------------------------------------------------------------------------------------------
# Bad presets: clear errors
# ---------------------------------------------------------------------------------------------------------------------


def edited(**changes) -> dict:
    preset = load_preset("all-MiniLM-L6-v2")
    training = dict(preset["training"])
    for key, value in changes.pop("training", {}).items():
        if value is None:
            training.pop(key)
        else:
            training[key] = value
    preset.update(changes, training=training)
    return preset


@pytest.mark.parametrize("preset,message", [
    (edited(training={"epochs": {"finetune": 3, "exits": 2, "pruning": 1}}),
     "mine.json: training.epochs={'finetune': 3, 'exits': 2, 'pruning': 1} must be a number, the stage-1 epochs; the "
     "other stages have their own keys: pruning_epochs (stage 2), pruned_finetune_epochs (stage 3), exit_epochs (stage 4)."),
    (edited(training={"warmup_steps": 10}), "mine.json: unknown keys ['warmup_steps'] in 'training'. Allowed: the recipe settings "),
    (edited(training={"exit_pooling": "cls"}),
     "mine.json: unknown keys ['exit_pooling'] in 'training' (exit_pooling: config fields go at the top level)."),
    (edited(learning_rate=1e-5), "mine.json: unknown preset keys ['learning_rate'] (recipe settings go in the 'training' block)."),
    (edited(distillation_temperature=1.0), "mine.json: put 'distillation_temperature' in the 'training' block"),
    (edited(training={"batch_size": 0}), "mine.json: in 'training': batch_size=0 is out of range: it must be an integer >= 1."),
    (edited(training={"epochs": -1}), "mine.json: in 'training': epochs=-1 is out of range: it must be a number > 0."),
    (edited(training={"exit_epochs": 0}), "mine.json: in 'training': exit_epochs=0 is out of range: it must be a number > 0."),
    (edited(training={"warmup_ratio": "0.1"}), "mine.json: in 'training': warmup_ratio='0.1' is out of range"),
    (edited(training={"learning_rate": None}), "mine.json: the 'training' block lacks ['learning_rate']"),
    (edited(training={"distillation_temperature": 0}), "mine.json: distillation_temperature=0 is out of range"),
    (edited(backbone={"checkpoint": "x", "model_type": "bert", "num_hidden_layers": 6, "layers": 6}),
     "mine.json: unknown 'backbone' keys ['layers']. Allowed: checkpoint, model_type, num_hidden_layers, hidden_size."),
    (edited(exit_pooling="max"), "mine.json: exit_pooling='max' is not supported"),
])
def test_bad_presets_name_the_entry(preset, message, tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(preset))
    with pytest.raises(ValueError) as error:
        load_preset(path)
    assert str(error.value).startswith(str(path.parent) + "/" + message), str(error.value)
    with pytest.raises(ValueError) as error:
        validate_preset(preset, source="mine.json")
    assert str(error.value).startswith(message)


def test_a_bad_preset_fails_train_at_parse_time(tmp_path, capsys):
    from hf_magicpyramid.cli import main

    path = tmp_path / "mine.json"
    path.write_text(json.dumps(edited(training={"epochs": {"finetune": 1, "exits": 1, "pruning": 1}})))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", str(path), "--output_dir", str(tmp_path / "out"), "--dataset", "d"])
    assert exit_info.value.code == 2
    assert "training.epochs=" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_training_fields_are_recipe_settings_or_training_config_fields():
    config_fields = set(MagicPyramidConfig.__annotations__)
    for key in TRAINING_FIELDS:
        assert key in RECIPE_FIELDS - config_fields or key in ("distillation_temperature", "pruning_penalty"), key
    assert {"warmup_ratio", "weight_decay", "epochs", "pruned_finetune_epochs", "exit_epochs"} <= set(TRAINING_FIELDS)
