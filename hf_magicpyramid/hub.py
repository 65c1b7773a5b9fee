"""Share a Magic Pyramid model on the Hugging Face Hub: a model card, a safe upload, and the `push` command.

    from hf_magicpyramid.hub import push_to_hub, write_model_card
    model.save_pretrained("out"); tokenizer.save_pretrained("out")
    push_to_hub("out", "username/my-pyramid")          # token: token=..., HF_TOKEN, or `hf auth login`

`push_to_hub` uploads a saved folder as it is, without loading the weights and without writing into it: files it has to
add (a model card, custom code files the folder lacks, an `auto_map` in config.json) go to a temporary staging folder
that links to the user's files, and that folder is uploaded. The model loads from the Hub in two ways: with this package
installed (`import hf_magicpyramid`, no remote code runs) or anywhere with `trust_remote_code=True` (the custom code files
saved beside the weights run).

This module is not custom code: the modeling files never import it.

The calibration result (`calibration.json`, its format and reader) belongs to `calibration.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from .calibration import CALIBRATION_JSON as CALIBRATION_FILE
from .calibration import CALIBRATION_PNG as CALIBRATION_PLOT
from .calibration import EXIT_KNOBS, PRUNING_KNOBS, _number, load_calibration, save_calibration, validate_calibration
from .calibration import frontier as _frontier
from .configuration_magic_pyramid import MagicPyramidConfig
from .modeling_magic_pyramid import AUTO_MAP, MagicPyramidPreTrainedModel

CARD_TABLE_ROWS = 12  # more points than this: the card shows the speed/accuracy frontier (all stay in the JSON)

MODEL_CARD = "README.md"
# Marks a card this module wrote: write_model_card replaces such a card, never one a person wrote.
CARD_MARKER = "<!-- Written by hf-magicpyramid (write_model_card may regenerate it): delete this line to keep your edits. -->"
DEFAULT_LICENSE = "apache-2.0"
CARD_TAGS = ("magic-pyramid", "early-exit", "token-pruning")

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "spm.model")
# Never uploaded from a model folder: hidden files, Trainer checkpoints and state, logs, caches, pickled arguments.
DEFAULT_IGNORE = (".*", "checkpoint-*", "runs", "__pycache__", "*.pyc", "optimizer.pt", "scheduler.pt", "rng_state*.pth",
                  "training_args.bin")


class HubPushError(RuntimeError):
    """A push failed on the Hub's side or on the way there; the local folder is unchanged."""


class HubAuthenticationError(HubPushError):
    """The Hub wants a (valid, write) token."""


class HubConnectionError(HubPushError):
    """The Hub endpoint could not be reached, or it failed while answering."""


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------


def hub_base_model(config: MagicPyramidConfig) -> str | None:
    """The backbone checkpoint's Hub id when the config knows it (not a local folder), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = getattr(config.backbone_config, "_name_or_path", "") or ""
    if not name or name.startswith((".", "~", "/")) or os.path.isabs(name) or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _fmt_list(values) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _fmt_number(value, digits: int = 3) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _fmt_params(count: int | None) -> str:
    if not count:
        return ""
    return f"; {count / 1e6:.1f}M parameters" if count >= 1e5 else f"; {count:,} parameters"


def render_model_card(
    config: MagicPyramidConfig,
    *,
    repo_id: str | None = None,
    calibration: dict | None = None,
    plot: bool = False,
    num_parameters: int | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    has_tokenizer: bool = True,
) -> str:
    """The text of a model card (README.md) with Hub YAML metadata for a Magic Pyramid `config`."""
    from huggingface_hub import ModelCardData

    base_model = base_model or hub_base_model(config)
    family = config.backbone_type
    slender = config.heads_per_layer is not None or config.ffn_per_layer is not None
    tags = [*CARD_TAGS, family] + (["slenderized"] if slender else [])
    metadata = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-classification",
        license=license,
        tags=tags,
    ).to_yaml()
    repo = repo_id or "<username>/<model-name>"
    title = repo_id.split("/")[-1] if repo_id else f"Magic Pyramid {family} classifier"
    backbone_name = f"`{base_model}`" if base_model else "a local checkpoint"
    tokenizer_repo = repo if has_tokenizer or not base_model else base_model

    lines = [
        "---",
        metadata.rstrip(),
        "---",
        "",
        CARD_MARKER,
        "",
        f"# {title}",
        "",
        f"A **Magic Pyramid** text classifier made with [hf-magicpyramid](https://pypi.org/project/hf-magicpyramid/) from "
        f"{backbone_name} ({family}). It computes less on easy and long inputs in two ways, both adjustable at run "
        "time without retraining: **early exit** (a sample leaves at the first exit whose prediction is sure enough) and "
        "**token pruning** (the tokens that matter least are removed, so later layers run on shorter sequences). The "
        "backbone's own layers and classification head run unchanged; the final exit is the stock head.",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        f"| backbone | {family}, {backbone_name} |",
        f"| size | {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.full_heads} heads, "
        f"FFN {config.full_ffn}{_fmt_params(num_parameters)} |",
        f"| labels | {', '.join(f'{i}: {label}' for i, label in sorted(config.id2label.items()))} |",
        f"| problem type | {config.problem_type or 'single_label_classification'} |",
        "",
    ]
    lines += _exit_section(config) + _pruning_section(config) + _width_section(config)
    if calibration is not None:
        lines += _calibration_section(config, calibration, plot)
    lines += _usage_section(config, repo, tokenizer_repo)
    return "\n".join(lines).rstrip() + "\n"


def _exit_section(config: MagicPyramidConfig) -> list[str]:
    exits = config.resolved_exit_layers()
    criterion = {
        "entropy": "the normalised entropy of the exit's prediction is below `exit_threshold`",
        "confidence": "the exit's largest probability is above `exit_threshold`",
        "patience": "the prediction is unchanged for `patience` exits in a row",
    }[config.exit_criterion]
    if config.exit_criterion == "patience":
        speed = f"`patience = {config.patience}`" if config.patience is not None else None
    else:
        speed = f"`exit_threshold = {config.exit_threshold:g}`" if config.exit_threshold is not None else None
    if speed is None:
        knob = "patience" if config.exit_criterion == "patience" else "exit_threshold"
        speed = f"none set: every sample runs to the last layer until you set `{knob}` (see Usage)"
    return [
        "## Early exit",
        "",
        f"- exits after layers {_fmt_list(exits)} (the last one is the backbone's classification head)",
        f"- a sample exits when {criterion}",
        f"- intermediate exits pool the {'first token' if config.exit_pooling == 'cls' else 'mean of the kept tokens'} "
        f"(`exit_pooling = \"{config.exit_pooling}\"`); exits trained with the `{config.exit_objective}` objective",
        f"- default speed: {speed}",
        "",
    ]


def _pruning_section(config: MagicPyramidConfig) -> list[str]:
    lines = ["## Token pruning", ""]
    if config.token_pruning == "none":
        return lines + ["Off: every layer runs on every token.", ""]
    importance = {
        "cls_attention": "the attention the first token pays to it",
        "mean_attention": "the attention it receives, averaged over tokens and heads",
    }[config.token_importance]
    if config.token_pruning == "topk":
        lines += [
            f"- mode `topk`: before each layer, keep the share `keep_ratios[i] ** keep_ratio_scale` of each sample's tokens, "
            f"ranked by {importance}",
            f"- schedule `keep_ratios` (layer 1 to {config.num_hidden_layers}): {_fmt_list(config.resolved_keep_ratios())}",
            f"- default speed: `keep_ratio_scale = {config.keep_ratio_scale:g}` (above 1 prunes harder, below 1 gentler)",
        ]
    else:
        lines += [
            f"- mode `threshold` (learned, LTP-style): before each layer, drop the tokens whose importance ({importance}) "
            "is below that layer's threshold plus `prune_threshold_offset`",
            f"- schedule `prune_thresholds` (layer 1 to {config.num_hidden_layers}): {_fmt_list(config.resolved_prune_thresholds())}",
            f"- default speed: `prune_threshold_offset = {config.prune_threshold_offset:g}` (above 0 prunes harder)",
        ]
    return lines + [f"- a sample always keeps its first token and at least {config.min_kept_tokens} token(s)", ""]


def _width_section(config: MagicPyramidConfig) -> list[str]:
    lines = ["## Layer widths", ""]
    if config.heads_per_layer is None and config.ffn_per_layer is None:
        return lines + [f"Full width: {config.full_heads} attention heads and {config.full_ffn} FFN neurons in every layer.", ""]
    lines += [
        f"Slenderized (COST-EFF style): heads and FFN neurons kept per layer, out of {config.full_heads} and {config.full_ffn}.",
        "",
        "| layer | heads | FFN |",
        "| --- | --- | --- |",
    ]
    for layer, (heads, ffn) in enumerate(zip(config.resolved_heads(), config.resolved_ffn()), start=1):
        lines.append(f"| {layer} | {heads} | {ffn} |")
    return lines + [""]


def _is_default_point(config: MagicPyramidConfig, point: dict) -> bool:
    current = {
        "exit_threshold": config.exit_threshold,
        "patience": config.patience,
        "keep_ratio_scale": config.keep_ratio_scale,
        "prune_threshold_offset": config.prune_threshold_offset,
    }
    for knob, value in point["setting"].items():
        expected = current[knob]
        if (value is None) != (expected is None):
            return False
        if value is not None and not math.isclose(float(value), float(expected), rel_tol=1e-6, abs_tol=1e-9):
            return False
    return True


def _calibration_section(config: MagicPyramidConfig, calibration: dict, plot: bool) -> list[str]:
    points = calibration["points"]
    shown = points
    if len(points) > CARD_TABLE_ROWS:
        shown = _frontier(points)
        shown += [p for p in points if _is_default_point(config, p) and p not in shown]
    knobs = [knob for knob in EXIT_KNOBS + PRUNING_KNOBS if any(knob in point["setting"] for point in shown)]
    measured = []
    for key, label in (("dataset", "on"), ("num_samples", "samples:"), ("batch_size", "batch size"), ("device", "device:")):
        if calibration.get(key) not in (None, ""):
            measured.append(f"{label} {calibration[key]}")
    lines = [
        "## Speed and accuracy",
        "",
        "Measured at each speed setting" + (f" ({'; '.join(measured)})" if measured else "") + ". FLOPs and kept tokens "
        "are relative to the model without early exit and pruning; speedup is measured wall-clock time against the stock "
        "model (where it was measured). The row marked **default** is the speed saved in this model's config.",
        "",
    ]
    if shown is not points:
        lines += [f"{len(points)} settings were measured; the table shows the {len(shown)} on the speed/accuracy frontier "
                  f"(all are in `{CALIBRATION_FILE}`).", ""]
    lines += [
        "| " + " | ".join([*(f"`{k}`" for k in knobs), "accuracy", "mean exit layer", "kept tokens", "FLOPs", "speedup", ""]) + " |",
        "| " + " | ".join(["---"] * (len(knobs) + 6)) + " |",
    ]
    stock = calibration.get("stock") or {}
    if _number(stock.get("accuracy")):
        cells = (["stock model"] + [""] * (len(knobs) - 1)) if knobs else []
        cells += [f"{stock['accuracy']:.2f}%", str(config.num_hidden_layers), "100%", "100%", "1.00x", ""]
        lines.append("| " + " | ".join(cells) + " |")
    for point in shown:
        speedup = point["measured_speedup"]
        cells = [_fmt_number(point["setting"][knob]) if knob in point["setting"] else "" for knob in knobs]
        cells += [
            f"{point['accuracy']:.2f}%",
            f"{point['mean_exit_layer']:.2f}",
            f"{100 * point['kept_token_fraction']:.0f}%",
            f"{100 * point['flops_ratio']:.0f}%",
            f"{speedup:.2f}x" if speedup is not None else "-",
            "**default**" if _is_default_point(config, point) else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if plot:
        lines += [f"![Accuracy against speed at each setting]({CALIBRATION_PLOT})", ""]
    return lines


def _usage_section(config: MagicPyramidConfig, repo: str, tokenizer_repo: str) -> list[str]:
    knob = "patience=2" if config.exit_criterion == "patience" else "exit_threshold=0.2"
    if config.token_pruning == "topk":
        knob += ", keep_ratio_scale=1.5"
    elif config.token_pruning == "threshold":
        knob += ", prune_threshold_offset=0.05"
    return [
        "## Usage",
        "",
        "With the plugin installed (`pip install hf-magicpyramid`), no code from this repository runs:",
        "",
        "```python",
        "import hf_magicpyramid  # registers the magic_pyramid model type with the Auto classes",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f'model = AutoModelForSequenceClassification.from_pretrained("{repo}").eval()',
        f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_repo}")',
        'inputs = tokenizer(["a gripping, beautifully shot film", "dull"], padding=True, return_tensors="pt")',
        "outputs = model(**inputs)",
        "outputs.logits, outputs.exit_layer  # each sample's logits at its exit, and the 1-based layer it exited after",
        "",
        "from transformers import pipeline",
        "",
        f'classifier = pipeline("text-classification", model="{repo}")',
        "```",
        "",
        "Without the plugin, load the custom code saved in this repository (pin the revision you reviewed):",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification",
        "",
        f'model = AutoModelForSequenceClassification.from_pretrained("{repo}", trust_remote_code=True, revision="<commit sha>")',
        "```",
        "",
        "Change the speed without retraining, for the model (saved with it) or for one call:",
        "",
        "```python",
        f"model.set_speed({knob})",
        "outputs = model(**inputs, exit_threshold=0.1)" if config.exit_criterion != "patience" else "outputs = model(**inputs, patience=3)",
        "```",
        "",
        "### Remote code and security",
        "",
        "`trust_remote_code=True` runs the Python files of this repository (`configuration_magic_pyramid.py`, "
        "`modeling_magic_pyramid.py` and the modules they import) on your machine with your permissions. Read them "
        "before you load the model, and pin `revision=` to the commit you read, so that a later push cannot change the "
        "code you run. Loading with the plugin installed runs only the installed package's code, and the weights are "
        "safetensors (no pickle).",
        "",
    ]


def _config_of(model_or_dir) -> tuple[MagicPyramidConfig, Path | None, int | None]:
    """(config, folder or None, parameter count or None) of a model, a config or a saved folder."""
    if isinstance(model_or_dir, MagicPyramidPreTrainedModel):
        model_or_dir.sync_config()
        return model_or_dir.config, None, model_or_dir.num_parameters()
    if isinstance(model_or_dir, MagicPyramidConfig):
        return model_or_dir, None, None
    folder = Path(model_or_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {folder}: pass a Magic Pyramid model, its config, or a saved model folder.")
    model_type = _read_config_json(folder).get("model_type")
    if model_type != MagicPyramidConfig.model_type:
        raise ValueError(_not_pyramid_message(folder, model_type))
    return MagicPyramidConfig.from_pretrained(folder), folder, _count_parameters(folder)


def write_model_card(
    model_or_dir,
    save_directory,
    calibration=None,
    *,
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `README.md` (a model card with Hub metadata) into `save_directory`; return its path.

    `model_or_dir`: a Magic Pyramid model, its config, or a saved model folder. `calibration`: a calibration result
    (dict), the path of a calibration.json, or None to use `calibration.json` from the model folder or
    `save_directory` when there is one; `calibration.png` beside it is shown (and copied into `save_directory` when
    it is not there). A README.md that this function did not write is never replaced unless `overwrite=True`.
    """
    config, folder, num_parameters = _config_of(model_or_dir)
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    card_path = save_directory / MODEL_CARD
    if card_path.is_file() and not overwrite and CARD_MARKER not in card_path.read_text(encoding="utf-8", errors="replace"):
        raise FileExistsError(f"{card_path} exists and was not written by hf-magicpyramid; pass overwrite=True to replace it.")

    plot_source = None
    if calibration is None:
        for candidate in [folder, save_directory]:
            if candidate is not None and (candidate / CALIBRATION_FILE).is_file():
                calibration = load_calibration(candidate)
                plot_source = candidate / CALIBRATION_PLOT
                break
    elif isinstance(calibration, (str, os.PathLike)):
        plot_source = Path(calibration).parent / CALIBRATION_PLOT if Path(calibration).is_file() else Path(calibration) / CALIBRATION_PLOT
        source = calibration
        calibration = load_calibration(calibration)
        if calibration is None:
            raise FileNotFoundError(f"No calibration result at {source}.")
    else:
        calibration = validate_calibration(calibration)
    plot = (save_directory / CALIBRATION_PLOT).is_file()
    if not plot and plot_source is not None and plot_source.is_file():
        shutil.copyfile(plot_source, save_directory / CALIBRATION_PLOT)
        plot = True

    text = render_model_card(
        config,
        repo_id=repo_id,
        calibration=calibration,
        plot=plot and calibration is not None,
        num_parameters=num_parameters,
        license=license,
        base_model=base_model,
        has_tokenizer=_has_tokenizer(folder or save_directory),
    )
    card_path.write_text(text, encoding="utf-8")
    return card_path


# ---------------------------------------------------------------------------------------------------------------------
# Checking a saved folder
# ---------------------------------------------------------------------------------------------------------------------


def _read_config_json(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON: {error}") from error


def _not_pyramid_message(folder: Path, model_type) -> str:
    return (
        f"{folder / 'config.json'} has model_type {model_type!r}, not {MagicPyramidConfig.model_type!r}: this is not a "
        "Magic Pyramid model. Convert a stock checkpoint with MagicPyramidForSequenceClassification.from_backbone(...) "
        "and save_pretrained() it first (a stock model pushes with its own push_to_hub)."
    )


def _has_tokenizer(folder: Path) -> bool:
    return (folder / TOKENIZER_CONFIG).is_file() and any((folder / name).is_file() for name in TOKENIZER_VOCABULARIES)


def _safetensors_parameters(path: Path) -> int:
    """Parameters in a safetensors file, read from its header only (8-byte length, then JSON)."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header).")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:  # a real header is kilobytes to a few megabytes
            raise ValueError(f"{path} is not a readable safetensors file (header length {length}).")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, MemoryError, OverflowError) as error:
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


def _weight_files(folder: Path) -> list[str]:
    if (folder / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    if (folder / WEIGHTS_INDEX).is_file():
        index = json.loads((folder / WEIGHTS_INDEX).read_text(encoding="utf-8"))
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing or not shards:
            raise ValueError(f"{folder / WEIGHTS_INDEX} lists weight shards that are missing: {missing or 'none listed'}.")
        return shards
    found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {', '.join(found)}: pickled weights are not pushed; re-save with save_pretrained, which writes safetensors)" if found else ""
    raise ValueError(f"No {WEIGHTS_FILE} (or {WEIGHTS_INDEX}) in {folder}{hint}.")


def _count_parameters(folder: Path) -> int | None:
    try:
        return sum(_safetensors_parameters(folder / name) for name in _weight_files(folder))
    except (ValueError, OSError, KeyError, TypeError):
        return None


def _ignored(relative: str, patterns) -> bool:
    parts = relative.split("/")
    return any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in patterns) or any(
        fnmatch.fnmatch(relative, pattern) for pattern in patterns
    )


def _auto_map_modules(auto_map: dict) -> list[str]:
    """Module names (files without .py) that the auto_map points to in this repository."""
    modules = []
    for target in auto_map.values():
        for reference in target if isinstance(target, (list, tuple)) else [target]:
            if not reference or "--" in reference:  # code kept in another repository ("user/repo--module.Class")
                continue
            module = reference.rsplit(".", 1)[0]
            if module not in modules:
                modules.append(module)
    return modules


@dataclasses.dataclass
class FolderCheck:
    """What `push_to_hub` will upload from a model folder, and what it has to add."""

    folder: Path
    config: dict  # config.json as saved
    pyramid_config: MagicPyramidConfig
    files: list[str]  # the user's files to upload (relative, POSIX)
    code_files: dict[str, Path]  # code files the folder lacks → where the installed package's copy is
    config_needs_auto_map: bool
    has_card: bool
    has_tokenizer: bool
    calibration: dict | None
    num_parameters: int | None


def check_model_folder(model_dir, require_tokenizer: bool = True, ignore_patterns=DEFAULT_IGNORE, _code_source=None) -> FolderCheck:
    """Check that `model_dir` is a saved Magic Pyramid model ready to push; raise `ValueError` / `FileNotFoundError`
    saying what is wrong and how to fix it. Reads only small files (config, safetensors headers)."""
    from transformers.dynamic_module_utils import get_relative_imports

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {folder} does not exist (save the model with save_pretrained first).")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {folder}: this is not a saved model folder.")
    config = _read_config_json(folder)
    if config.get("model_type") != MagicPyramidConfig.model_type:
        raise ValueError(_not_pyramid_message(folder, config.get("model_type")))
    try:
        pyramid_config = MagicPyramidConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{folder / 'config.json'} is not a valid Magic Pyramid config: {error}") from error
    weights = _weight_files(folder)
    num_parameters = sum(_safetensors_parameters(folder / name) for name in weights)
    has_tokenizer = _has_tokenizer(folder)
    if require_tokenizer and not has_tokenizer:
        raise ValueError(
            f"No tokenizer in {folder} (it needs {TOKENIZER_CONFIG} and one of {', '.join(TOKENIZER_VOCABULARIES)}). "
            "Save it beside the model with tokenizer.save_pretrained(model_dir) so that the model can be used from the "
            "Hub, or push without it (require_tokenizer=False, or --allow-missing-tokenizer)."
        )
    calibration = load_calibration(folder)

    files = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not _ignored(path.relative_to(folder).as_posix(), ignore_patterns)
    )
    auto_map = config.get("auto_map") or {}
    needs_auto_map = not all(key in auto_map for key in AUTO_MAP)
    modules = _auto_map_modules({**AUTO_MAP, **auto_map})
    code_source = Path(_code_source) if _code_source is not None else None
    code_files: dict[str, Path] = {}
    seen: set[str] = set()
    while modules:
        module = modules.pop(0)
        if module in seen:
            continue
        seen.add(module)
        name = f"{module}.py"
        if (folder / name).is_file():
            path = folder / name
        else:
            path = code_source / name if code_source is not None else None
            if path is None or not path.is_file():
                raise ValueError(
                    f"{folder} lacks the custom code file {name} that loading with trust_remote_code=True needs, and the "
                    "installed hf_magicpyramid has no such module. Re-save the model with save_pretrained()."
                )
            code_files[name] = path
        modules += [m for m in get_relative_imports(path) if m not in seen]
    return FolderCheck(
        folder=folder,
        config=config,
        pyramid_config=pyramid_config,
        files=files,
        code_files=code_files,
        config_needs_auto_map=needs_auto_map,
        has_card=(folder / MODEL_CARD).is_file(),
        has_tokenizer=has_tokenizer,
        calibration=calibration,
        num_parameters=num_parameters,
    )


def _save_package_code(directory: Path) -> Path:
    """Write the custom code files as `save_pretrained` does (transformers' `custom_object_save` on the registered
    classes) into `directory`; return it."""
    from transformers.dynamic_module_utils import custom_object_save

    from .modeling_magic_pyramid import MagicPyramidForSequenceClassification, MagicPyramidModel

    for cls in (MagicPyramidConfig, MagicPyramidModel, MagicPyramidForSequenceClassification):
        custom_object_save(cls, directory)
    return directory


# ---------------------------------------------------------------------------------------------------------------------
# Pushing
# ---------------------------------------------------------------------------------------------------------------------


def check_repo_id(repo_id) -> str:
    """Validate a Hub repo id with huggingface_hub's own rules, before any request; raise `ValueError` naming it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"Invalid Hub repo id {repo_id!r}: {error} A repo id is 'name' or 'namespace/name' (e.g. 'alice/bert-pyramid'): "
            "letters, digits, '-', '_' and '.', at most 96 characters per part, not starting or ending with '-' or '.', "
            "without '--' or '..', and not ending in '.git'."
        ) from None
    return repo_id


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for attr in ("TransportError", "ConnectionError", "Timeout"):
            error = getattr(module, attr, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                errors.append(error)
    return tuple(errors)


def _translate_hub_error(error: BaseException, endpoint: str, repo_id: str, token, step: str) -> BaseException | None:
    """A clear exception for a failure talking to the Hub, or None to let `error` through unchanged."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    kept = "Nothing was changed in the local folder."
    if isinstance(error, OfflineModeIsEnabled):
        return HubConnectionError(f"Cannot push to {endpoint} while HF_HUB_OFFLINE=1 is set; unset it to {step}. {kept}")
    if isinstance(error, _transport_errors()):
        return HubConnectionError(
            f"Could not reach the Hub at {endpoint} to {step} ({type(error).__name__}: {error}). Check the network and "
            f"HF_ENDPOINT, then push again; an interrupted upload leaves the repo at its previous commit. {kept}"
        )
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        server_message = error.server_message or str(error).splitlines()[0]
        if status in (401, 403):
            if token is None and get_token() is None:
                return HubAuthenticationError(
                    f"Pushing to {endpoint} needs a Hub token with write access, and none was found. Pass --token "
                    f"(token= in Python), set HF_TOKEN, or log in with `hf auth login`. {kept}"
                )
            return HubAuthenticationError(
                f"The Hub at {endpoint} refused the token (HTTP {status}) when trying to {step}: it may be invalid or "
                f"expired, or lack write access to {repo_id!r}. Pass another token with --token or HF_TOKEN, or run "
                f"`hf auth login`. Server said: {server_message}. {kept}"
            )
        if status == 400 and step.startswith("create the repo"):
            return ValueError(f"The Hub at {endpoint} refused the repo id {repo_id!r}: {server_message}. {kept}")
        if status >= 500:
            return HubConnectionError(
                f"The Hub at {endpoint} failed (HTTP {status}) when trying to {step}: {server_message}. Push again later. {kept}"
            )
        return HubPushError(f"The Hub at {endpoint} answered HTTP {status} when trying to {step}: {server_message}. {kept}")
    return None


def _link_or_copy(source: Path, target: Path) -> None:
    """Put `source` at `target` without copying data when possible (symlink, then hard link, then copy)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for link in (os.symlink, os.link):
        try:
            link(source, target)
            return
        except (OSError, NotImplementedError):
            continue
    shutil.copy2(source, target)


def stage_model_folder(check: FolderCheck, staging, repo_id: str | None = None, license: str = DEFAULT_LICENSE,
                       base_model: str | None = None) -> list[str]:
    """Fill the empty folder `staging` with what to upload: links to the user's files plus generated files (model card,
    missing code files, config.json with an auto_map). Nothing is written into `check.folder`. Returns the names of the
    generated files."""
    staging = Path(staging)
    generated: dict[str, bytes] = {}
    if check.config_needs_auto_map:
        config = dict(check.config)
        config["auto_map"] = {**AUTO_MAP, **(config.get("auto_map") or {})}
        generated["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    for name, source in check.code_files.items():
        generated[name] = source.read_bytes()
    for relative in check.files:
        if relative not in generated:
            _link_or_copy((check.folder / relative).resolve(), staging / relative)
    for name, data in generated.items():
        (staging / name).write_bytes(data)
    if not check.has_card:
        write_model_card(check.folder, staging, repo_id=repo_id, license=license, base_model=base_model)
        generated[MODEL_CARD] = b""
    return sorted(generated)


def push_to_hub(
    model_dir,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    *,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    require_tokenizer: bool = True,
    ignore_patterns=DEFAULT_IGNORE,
):
    """Upload a saved Magic Pyramid model folder to the Hub; return the `huggingface_hub.CommitInfo` (`.oid` is the
    commit sha, `.commit_url` its page, `.pr_url` the pull request with `create_pr=True`).

    Checked before any request: the repo id; that `model_dir` holds config.json with model_type "magic_pyramid",
    safetensors weights, the custom code files its `auto_map` needs (taken from the installed package when missing,
    as save_pretrained writes them) and a tokenizer (unless `require_tokenizer=False`). A README.md in the folder is
    uploaded as it is; without one a model card is generated (`write_model_card`, with `license` and `base_model`).
    Files matching `ignore_patterns` (hidden files, Trainer checkpoints, ...) stay local. The folder is never written
    to: generated files go to a temporary staging folder that links to the user's files.

    `token`: a Hub token with write access (default: HF_TOKEN or the `hf auth login` token). `revision`: a branch,
    created from main if missing. Raises `ValueError` (bad repo id or folder), `HubAuthenticationError`,
    `HubConnectionError` or `HubPushError`, each saying what to do.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="hf-magicpyramid-code-") as code_dir:
        check = check_model_folder(model_dir, require_tokenizer, ignore_patterns, _code_source=_save_package_code(Path(code_dir)))
        api = HfApi(token=token)
        endpoint = api.endpoint
        step = f"create the repo {repo_id!r}"
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            full_id = repo_url.repo_id
            if revision is not None and not revision.startswith("refs/pr/"):
                step = f"create the branch {revision!r} of {full_id!r}"
                api.create_branch(full_id, branch=revision, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="hf-magicpyramid-push-") as staging:
                stage_model_folder(check, staging, repo_id=full_id, license=license, base_model=base_model)
                if commit_message is None:
                    config = check.pyramid_config
                    commit_message = (
                        f"Upload Magic Pyramid model ({config.backbone_type}, {config.num_hidden_layers} layers) "
                        "with hf-magicpyramid"
                    )
                step = f"upload {Path(model_dir)} to {full_id!r}"
                return api.upload_folder(
                    folder_path=staging,
                    repo_id=full_id,
                    repo_type="model",
                    revision=revision,
                    commit_message=commit_message,
                    create_pr=create_pr,
                )
        except Exception as error:
            clear = _translate_hub_error(error, endpoint, repo_id, token, step)
            if clear is None:
                raise
            raise clear from error


# ---------------------------------------------------------------------------------------------------------------------
# Command line: `hf-magicpyramid push`
# ---------------------------------------------------------------------------------------------------------------------


def add_push_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `push` command to an argparse subparsers object; it runs `run_push`."""
    parser = subparsers.add_parser(
        "push",
        help="upload a saved Magic Pyramid model folder to the Hugging Face Hub",
        description="Upload a saved Magic Pyramid model folder (config, safetensors weights, custom code, tokenizer, "
        "model card) to the Hugging Face Hub. The folder is never modified; a model card is generated when it has no "
        "README.md.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="the saved model folder (save_pretrained output)")
    parser.add_argument("--repo-id", required=True, metavar="ID", help="the Hub repo, 'name' or 'namespace/name'")
    parser.add_argument("--token", default=None, help="a Hub token with write access (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", default=None, metavar="BRANCH", help="push to this branch (created if missing)")
    parser.add_argument("--commit-message", default=None, metavar="MESSAGE", help="the commit message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"license in a generated model card (default {DEFAULT_LICENSE})")
    parser.add_argument("--allow-missing-tokenizer", action="store_true", help="push even when the folder has no tokenizer")
    parser.set_defaults(func=run_push)
    return parser


def run_push(args: argparse.Namespace) -> int:
    """Run `hf-magicpyramid push` from parsed arguments; print the commit URL. Returns the exit code (0 ok, 1 error)."""
    try:
        commit = push_to_hub(
            args.model,
            args.repo_id,
            token=getattr(args, "token", None),
            private=getattr(args, "private", False),
            revision=getattr(args, "revision", None),
            commit_message=getattr(args, "commit_message", None),
            create_pr=getattr(args, "create_pr", False),
            license=getattr(args, "license", DEFAULT_LICENSE),
            require_tokenizer=not getattr(args, "allow_missing_tokenizer", False),
        )
    except (ValueError, OSError, HubPushError) as error:
        print(f"hf-magicpyramid push: error: {error}", file=sys.stderr)
        return 1
    url = commit.pr_url or commit.commit_url
    print(f"Pushed {args.model} to {url} (commit {commit.oid})")
    return 0


__all__ = [
    "push_to_hub",
    "write_model_card",
    "render_model_card",
    "check_model_folder",
    "check_repo_id",
    "save_calibration",
    "load_calibration",
    "validate_calibration",
    "add_push_parser",
    "run_push",
    "HubPushError",
    "HubAuthenticationError",
    "HubConnectionError",
]
