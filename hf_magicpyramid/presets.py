"""Presets: ready-made Magic Pyramid settings for popular checkpoints, stored as JSON files in `hub_configs/`.

A preset names a checkpoint and says which exits, exit rule, token pruning schedule and training hyperparameters to
start from. It is a starting point, not a tuned result: calibrate the speed knobs on your own validation set.

File format (one JSON object per file, `hub_configs/<name>.json`). Every key names the field it sets, so a preset
reaches the recipe and the config one to one (`preset_arguments`):

    {
      "name": "bert-base-uncased",                       # optional; defaults to the file name without .json
      "description": "What the preset is for and why its choices",
      "backbone": {                                      # the checkpoint the preset is written for
        "checkpoint": "google-bert/bert-base-uncased",   # its Hub id: `train`'s --model_name_or_path
        "model_type": "bert",                            # its family: one of hf_magicpyramid.adapters.ADAPTERS
        "num_hidden_layers": 12,                         # its depth: every per-layer list below has this many entries
        "hidden_size": 768                               # optional, descriptive
      },
      "exit_layers": [1, 2, ..., 12],                    # any MagicPyramidConfig field (exit_pooling, exit_criterion,
      "token_pruning": "topk",                           #  exit_objective, token_importance, keep_ratios or
      "keep_ratios": [1.0, ..., 0.4],                    #  prune_thresholds, ...) at the top level
      "training": {                                      # RecipeSettings fields (hf_magicpyramid.arguments), by name
        "learning_rate": 2e-5,                           # backbone and final head
        "exit_learning_rate": 1e-4,                      # exit heads (stage 4)
        "epochs": 3,                                     # stage 1: fine-tune the backbone and its head
        "pruned_finetune_epochs": 1,                     # stage 3: fine-tune with the pruning fixed
        "batch_size": 32,
        "max_length": 128,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "distillation_temperature": 1.0,                 # the config field: the exits' self-distillation temperature
        "pruning_penalty": 0.1                           # the recipe setting, which sets the config field of that name
      }
    }

A top-level key that names a recipe setting (`token_pruning`, `exit_objective`, `exit_pooling`, `exit_criterion`,
`keep_ratios`) sets that setting; the other top-level keys are config fields passed as the recipe's `pyramid_options`.
The `training` block holds recipe settings that are not config fields (`epochs`, `pruning_epochs` (stage 2, LTP's soft
phase, for `"threshold"`), `pruned_finetune_epochs`, `exit_epochs` (stage 4, for `"two_stage"` and
`"self_distillation"`), learning rates, `teacher_temperature`, ...) plus the two config fields that are training
hyperparameters, `distillation_temperature` and `pruning_penalty`. A stage the preset's settings skip (stage 4 for
`"joint"`) needs no epochs.

Where presets are found, first match wins: `hub_configs/` beside the package folder (a source checkout or an editable
install), then `hf_magicpyramid/hub_configs/` inside an installed package (the wheel maps the top-level folder there).

This module imports only the standard library, the config module and `arguments` (the recipe's field names; transformers'
`AutoConfig` lazily): it adds no requirement wherever it goes.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from .arguments import RECIPE_FIELDS, RecipeSettings
from .configuration_magic_pyramid import MagicPyramidConfig, check_supported

_PACKAGE_DIR = Path(__file__).resolve().parent
PRESET_SEARCH_PATH = (_PACKAGE_DIR.parent / "hub_configs", _PACKAGE_DIR / "hub_configs")

# Config fields a preset may set; the backbone comes from "backbone", labels from the task.
CONFIG_FIELDS = tuple(name for name in MagicPyramidConfig.__annotations__ if name != "backbone_config")
# Fields whose length or values depend on the backbone's depth.
LAYER_FIELDS = ("exit_layers", "keep_ratios", "prune_thresholds", "heads_per_layer", "ffn_per_layer")
# Config fields that are training hyperparameters: a preset holds them in its training block.
TRAINING_CONFIG_FIELDS = ("distillation_temperature", "pruning_penalty")
# The training block: recipe settings that are not config fields, and the config fields above.
TRAINING_FIELDS = tuple(
    name for name in RECIPE_FIELDS if name not in CONFIG_FIELDS and name != "pyramid_options"
) + TRAINING_CONFIG_FIELDS
# What every preset says (the rest of the recipe keeps its defaults).
TRAINING_KEYS = ("learning_rate", "exit_learning_rate", "epochs", "batch_size", "max_length") + TRAINING_CONFIG_FIELDS
_BACKBONE_KEYS = ("checkpoint", "model_type", "num_hidden_layers", "hidden_size")
_META_KEYS = ("name", "description", "backbone", "training")
_LABEL_FIELDS = ("num_labels", "id2label", "label2id", "problem_type")


def preset_dirs() -> list[Path]:
    """The folders searched for presets that exist on this machine, in search order."""
    return [path for path in PRESET_SEARCH_PATH if path.is_dir()]


def _preset_files() -> dict[str, Path]:
    """Preset name (file stem) → file; an earlier folder wins over a later one."""
    files: dict[str, Path] = {}
    for folder in reversed(preset_dirs()):
        for path in sorted(folder.glob("*.json")):
            files[path.stem] = path
    return dict(sorted(files.items(), key=lambda item: item[0].lower()))


def available_presets() -> list[str]:
    """Names of the presets found (file names without `.json`), e.g. `["ModernBERT-base", "all-MiniLM-L6-v2", ...]`."""
    return list(_preset_files())


def _find_preset(name_or_path) -> Path:
    text = os.fspath(name_or_path)
    as_path = Path(text).expanduser()
    if as_path.is_file():
        return as_path
    if isinstance(name_or_path, os.PathLike) or text.endswith(".json"):
        raise FileNotFoundError(f"Preset file {text!r} does not exist.")
    files = _preset_files()
    wanted = text.lower()
    for name, path in files.items():
        if name.lower() == wanted:
            return path
    # Also accept the checkpoint id ("google/electra-base-discriminator") or its last part.
    for name, path in files.items():
        checkpoint = str(_read_json(path).get("backbone", {}).get("checkpoint", "")).lower()
        if checkpoint and wanted in (checkpoint, checkpoint.rsplit("/", 1)[-1]):
            return path
    searched = ", ".join(str(p) for p in PRESET_SEARCH_PATH)
    known = ", ".join(files) or "none found"
    raise ValueError(
        f"Unknown preset {text!r}. Available presets: {known} (searched {searched}). "
        "Pass a preset name, a checkpoint id named by a preset, or the path of a preset JSON file."
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Preset file {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"Preset file {path} must hold a JSON object, not {type(data).__name__}.")
    return data


def load_preset(name_or_path) -> dict:
    """Read and validate a preset: a name from `available_presets()` (case-insensitive), a checkpoint id that a preset
    names, or the path of a JSON file. Returns the preset as a dict (a fresh copy, with "name" filled in).

    Raises `ValueError` naming the bad entry and what is allowed, `FileNotFoundError` for a missing file.
    """
    path = _find_preset(name_or_path)
    preset = _read_json(path)
    preset.setdefault("name", path.stem)
    return validate_preset(preset, source=str(path))


def validate_preset(preset: dict, source: str = "<preset>") -> dict:
    """Check a preset dict (see the module docstring); return it. Per-layer fields are checked against its depth by
    the config's own validation, on a default config of the family with that depth (no download)."""
    from transformers import AutoConfig

    unknown = sorted(set(preset) - set(_META_KEYS) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"{source}: unknown preset keys {unknown}"
            + (" (recipe settings go in the 'training' block)" if set(unknown) <= set(TRAINING_FIELDS) else "")
            + f". Allowed: {', '.join(_META_KEYS)} and the MagicPyramidConfig fields {', '.join(CONFIG_FIELDS)}."
        )
    if not isinstance(preset.get("description"), str) or not preset["description"].strip():
        raise ValueError(f"{source}: 'description' must be a non-empty string saying what the preset is for.")
    backbone = preset.get("backbone")
    if not isinstance(backbone, dict) or not all(key in backbone for key in _BACKBONE_KEYS[:3]):
        raise ValueError(
            f"{source}: 'backbone' must be an object with 'checkpoint' (a Hub id), 'model_type' (the family) and "
            f"'num_hidden_layers' (its depth), got {backbone!r}."
        )
    unknown = sorted(set(backbone) - set(_BACKBONE_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown 'backbone' keys {unknown}. Allowed: {', '.join(_BACKBONE_KEYS)}.")
    depth = backbone["num_hidden_layers"]
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"{source}: backbone.num_hidden_layers={depth!r} must be an integer >= 1.")
    for field in TRAINING_CONFIG_FIELDS:
        if field in preset:
            raise ValueError(f"{source}: put {field!r} in the 'training' block (it also sets the config field).")
    _validate_training(preset.get("training"), source)
    fields = _config_fields(preset)
    try:
        MagicPyramidConfig(backbone_config=_default_backbone(AutoConfig, backbone["model_type"], depth), **fields)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error
    return preset


def _validate_training(training, source: str) -> None:
    """The training block: known recipe setting names (see the module docstring), values the recipe accepts."""
    if not isinstance(training, dict):
        raise ValueError(f"{source}: 'training' must be an object with {', '.join(TRAINING_KEYS)}.")
    unknown = sorted(set(training) - set(TRAINING_FIELDS))
    if unknown:
        config_named = [key for key in unknown if key in CONFIG_FIELDS]
        where = f" ({', '.join(config_named)}: config fields go at the top level)" if config_named else ""
        raise ValueError(
            f"{source}: unknown keys {unknown} in 'training'{where}. Allowed: the recipe settings "
            f"{', '.join(TRAINING_FIELDS)}."
        )
    missing = [key for key in TRAINING_KEYS if key not in training]
    if missing:
        raise ValueError(f"{source}: the 'training' block lacks {missing}; it needs {', '.join(TRAINING_KEYS)}.")
    if isinstance(training["epochs"], dict):
        raise ValueError(
            f"{source}: training.epochs={training['epochs']!r} must be a number, the stage-1 epochs; the other stages "
            "have their own keys: pruning_epochs (stage 2), pruned_finetune_epochs (stage 3), exit_epochs (stage 4)."
        )
    try:
        RecipeSettings(**{key: value for key, value in training.items() if key in RECIPE_FIELDS})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: in 'training': {error}") from None


def _default_backbone(auto_config, model_type: str, depth: int):
    check_supported(model_type)  # names the supported families
    return auto_config.for_model(model_type, num_hidden_layers=depth)  # attribute_map covers distilbert's n_layers


def _config_fields(preset: dict) -> dict:
    fields = {key: copy.deepcopy(value) for key, value in preset.items() if key in CONFIG_FIELDS}
    for key in TRAINING_CONFIG_FIELDS:
        if key in preset.get("training", {}):
            fields[key] = preset["training"][key]
    return fields


def preset_arguments(name_or_path) -> dict:
    """The preset as `train` arguments, by field name: `model_name_or_path` (the checkpoint), every recipe setting it
    holds (`RecipeSettings` fields), and its other config fields as `pyramid_options`. Nothing is left out."""
    preset = load_preset(name_or_path)
    values = {"model_name_or_path": preset["backbone"]["checkpoint"]}
    options = {}
    for key, value in _config_fields(preset).items():
        if key in RECIPE_FIELDS:
            values[key] = value
        else:
            options[key] = value
    for key, value in preset["training"].items():
        if key in RECIPE_FIELDS:
            values[key] = copy.deepcopy(value)
    values["pyramid_options"] = options
    return values


def pyramid_options(name_or_path) -> dict:
    """The preset's MagicPyramidConfig fields, ready for
    `MagicPyramidForSequenceClassification.from_backbone(preset["backbone"]["checkpoint"], num_labels=..., **options)`."""
    return _config_fields(load_preset(name_or_path))


def config_from_preset(name_or_path, backbone_config=None, config_class=None, **overrides) -> MagicPyramidConfig:
    """A `MagicPyramidConfig` from a preset, for a backbone of the preset's family.

    `backbone_config`: a stock config, a dict (with "model_type"), a local path or Hub id to read one from, or None for
    the preset's checkpoint (read from the Hub or its cache). `overrides`: any config field (e.g. `num_labels=2`,
    `exit_threshold=0.3`), applied last. A backbone of another depth needs the per-layer fields (`exit_layers`,
    `keep_ratios`, ...) as overrides (None for their defaults); one of another family is refused.
    """
    from transformers import AutoConfig, PreTrainedConfig

    preset = load_preset(name_or_path)
    name = preset["name"]
    expected = preset["backbone"]
    if backbone_config is None:
        try:
            backbone_config = AutoConfig.from_pretrained(expected["checkpoint"])
        except OSError as error:
            raise OSError(
                f"Could not read the config of {expected['checkpoint']!r} for preset {name!r}: {error}\n"
                "Pass backbone_config= (a config, a dict, or a local checkpoint folder) when the Hub cannot be reached."
            ) from error
    elif isinstance(backbone_config, dict):
        values = dict(backbone_config)
        if "model_type" not in values:
            raise ValueError("backbone_config given as a dict needs a 'model_type' entry (e.g. 'bert').")
        backbone_config = AutoConfig.for_model(values.pop("model_type"), **values)
    elif isinstance(backbone_config, (str, os.PathLike)):
        backbone_config = AutoConfig.from_pretrained(backbone_config)
    elif isinstance(backbone_config, PreTrainedConfig):
        backbone_config = copy.deepcopy(backbone_config)
    else:
        raise TypeError(
            f"backbone_config must be a config, a dict, a path or a Hub id, or None, not {type(backbone_config).__name__}."
        )

    if backbone_config.model_type != expected["model_type"]:
        raise ValueError(
            f"Preset {name!r} is for {expected['model_type']!r} backbones ({expected['checkpoint']}), but the backbone "
            f"config is {backbone_config.model_type!r}. Choose a preset of that family: {', '.join(available_presets())}."
        )
    fields = _config_fields(preset)
    depth = backbone_config.num_hidden_layers
    if depth != expected["num_hidden_layers"]:
        stale = [field for field in LAYER_FIELDS if field in fields and field not in overrides]
        if stale:
            raise ValueError(
                f"Preset {name!r} is written for {expected['num_hidden_layers']} layers, but this backbone has {depth}: "
                f"pass {', '.join(f'{field}=' for field in stale)} with one entry per layer for {depth} layers "
                "(or None for the defaults)."
            )
    if not any(key in overrides for key in _LABEL_FIELDS):
        # Labels come from the backbone config unless given, as `from_backbone` does.
        fields.update(id2label=dict(backbone_config.id2label), label2id=dict(backbone_config.label2id),
                      problem_type=backbone_config.problem_type)
    fields.update(overrides)
    config = (config_class or MagicPyramidConfig)(backbone_config=backbone_config, **fields)
    # The model gives its backbone these labels; keep the saved backbone config in agreement so that it reloads the same.
    for name in ("id2label", "label2id", "problem_type"):
        setattr(config.backbone_config, name, copy.deepcopy(getattr(config, name)))
    return config


__all__ = ["available_presets", "load_preset", "validate_preset", "preset_arguments", "pyramid_options", "config_from_preset", "preset_dirs"]
