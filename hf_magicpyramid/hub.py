"""Share a Magic Pyramid model on the Hugging Face Hub: a model card, and an upload of the model and nothing else.

    from hf_magicpyramid.hub import push_to_hub, write_model_card
    model.save_pretrained("out"); tokenizer.save_pretrained("out")
    push_to_hub("out", "username/my-pyramid")          # token: token=..., HF_TOKEN, or `hf auth login`

`push_to_hub` uploads a saved folder in one commit (`HfApi.create_commit`), without loading the weights and without
writing into the folder. It uploads an allowlist: config.json, the safetensors weights, the tokenizer files, a
generation or preprocessor config, the model card (README.md), calibration.json / calibration.png and the custom code
files; anything else (training stages, summaries, checkpoints) only when an `include=` pattern names it, and pickled
files never. Local absolute paths are removed from the JSON files on the way (in the uploaded bytes, not in the
folder). The model loads from the Hub with this package installed (`import hf_magicpyramid`, no remote code runs) or
anywhere with `trust_remote_code=True` (the custom code files `REMOTE_CODE_FILES` run).

This module is not custom code: the modeling files never import it. The calibration result (`calibration.json`, its
format and reader) belongs to `calibration.py`; the `push` command to `cli.py`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

from .calibration import (
    CALIBRATION_JSON,
    CALIBRATION_PNG,
    EXIT_KNOBS,
    PRUNING_KNOBS,
    calibration_file,
    frontier,
    is_default_point,
    load_calibration,
    validate_calibration,
)
from .configuration_magic_pyramid import MagicPyramidConfig
from .quantization import QUANTIZATION_METHODS
from .modeling_magic_pyramid import AUTO_MAP, REMOTE_CODE_FILES, MagicPyramidPreTrainedModel

MODEL_CARD = "README.md"
# Marks a card this module wrote: write_model_card and push_to_hub replace such a card, never one a person wrote.
CARD_MARKER = "<!-- Written by hf-magicpyramid (write_model_card may regenerate it): delete this line to keep your edits. -->"
DEFAULT_LICENSE = "apache-2.0"
CARD_TAGS = ("magic-pyramid", "early-exit", "token-pruning")
CARD_TABLE_ROWS = 12  # more points than this: the card shows the speed/accuracy frontier (all stay in the JSON)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "spm.model")
TOKENIZER_FILES = (TOKENIZER_CONFIG, *TOKENIZER_VOCABULARIES, "merges.txt", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
# The allowlist besides weights and code: what a saved model folder holds that loading it needs or shows.
# `sweep --quantize int8` writes its own calibration beside the fp32 one (`load_quantized` reads it): it travels too.
MODEL_FILES = (CONFIG_FILE, *TOKENIZER_FILES, "generation_config.json", "preprocessor_config.json", CALIBRATION_JSON,
               CALIBRATION_PNG, *(calibration_file(method, name) for method in QUANTIZATION_METHODS
                                  for name in (CALIBRATION_JSON, CALIBRATION_PNG)))
# Never uploaded, not even through include=: loading a pickle runs code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
NAME_OR_PATH_KEYS = ("_name_or_path", "name_or_path")
# JSON files that hold no local path and whose strings are data (tokens, merges, shard names): never rewritten.
UNSCRUBBED_JSON = ("tokenizer.json", "vocab.json", WEIGHTS_INDEX)


class HubPushError(RuntimeError):
    """A push failed on the Hub's side or on the way there; the local folder is unchanged."""


class HubAuthenticationError(HubPushError):
    """The Hub wants a (valid, write) token."""


class HubConnectionError(HubPushError):
    """The Hub endpoint could not be reached, or it failed while answering."""


# ---------------------------------------------------------------------------------------------------------------------
# Model card: a Jinja template rendered by huggingface_hub.ModelCard.from_template
# ---------------------------------------------------------------------------------------------------------------------

CARD_TEMPLATE = """\
---
{{ card_data }}
---

{{ marker }}

# {{ title }}

A **Magic Pyramid** text classifier made with [hf-magicpyramid](https://pypi.org/project/hf-magicpyramid/) from \
{{ backbone }} ({{ family }}). It computes less on easy and long inputs in two ways, both adjustable at run time without \
retraining: **early exit** (a sample leaves at the first exit whose prediction is sure enough) and **token pruning** \
(the tokens that matter least are removed, so later layers run on shorter sequences). The backbone's own layers and \
classification head run unchanged; the final exit is the stock head.

## Model

| | |
| --- | --- |
| backbone | {{ family }}, {{ backbone }} |
| size | {{ c.num_hidden_layers }} layers, hidden {{ c.hidden_size }}, {{ c.full_heads }} heads, FFN {{ c.full_ffn }}\
{{ parameters }} |
| labels | {{ labels }} |
| problem type | {{ c.problem_type or "single_label_classification" }} |

## Early exit

- exits after layers {{ exit_layers }} (the last one is the backbone's classification head)
- a sample exits when {{ criterion }}
- intermediate exits pool the {{ "first token" if c.exit_pooling == "cls" else "mean of the kept tokens" }} \
(`exit_pooling = "{{ c.exit_pooling }}"`); exits trained with the `{{ c.exit_objective }}` objective
- default speed: {{ exit_speed }}

## Token pruning

{% if c.token_pruning == "none" -%}
Off: every layer runs on every token.
{% else -%}
{% if c.token_pruning == "topk" -%}
- mode `topk`: before each layer, keep the share `keep_ratios[i] ** keep_ratio_scale` of each sample's tokens, \
ranked by {{ importance }}
- schedule `keep_ratios` (layer 1 to {{ c.num_hidden_layers }}): {{ schedule }}
- default speed: `keep_ratio_scale = {{ "%g" % c.keep_ratio_scale }}` (above 1 prunes harder, below 1 gentler)
{% else -%}
- mode `threshold` (learned, LTP-style): before each layer, drop the tokens whose importance ({{ importance }}) is \
below that layer's threshold plus `prune_threshold_offset`
- schedule `prune_thresholds` (layer 1 to {{ c.num_hidden_layers }}): {{ schedule }}
- default speed: `prune_threshold_offset = {{ "%g" % c.prune_threshold_offset }}` (above 0 prunes harder)
{% endif -%}
- a sample always keeps its first token and at least {{ c.min_kept_tokens }} token(s)
{% endif %}
## Layer widths

{% if not widths -%}
Full width: {{ c.full_heads }} attention heads and {{ c.full_ffn }} FFN neurons in every layer.
{% else -%}
Slenderized (COST-EFF style): heads and FFN neurons kept per layer, out of {{ c.full_heads }} and {{ c.full_ffn }}.

| layer | heads | FFN |
| --- | --- | --- |
{% for heads, ffn in widths -%}
| {{ loop.index }} | {{ heads }} | {{ ffn }} |
{% endfor -%}
{% endif %}
{% if table -%}
## Speed and accuracy

Measured at each speed setting{{ measured }}. FLOPs and kept tokens are relative to the model without early exit and \
pruning; speedup is measured wall-clock time against the stock model (where it was measured). The row marked \
**default** is the speed saved in this model's config.

{% if table_note -%}
{{ table_note }}

{% endif -%}
{% for row in table -%}
| {{ row | join(" | ") }} |
{% endfor %}
{% if plot -%}
![Accuracy against speed at each setting]({{ plot }})

{% endif -%}
{% endif -%}
## Usage

With the plugin installed (`pip install hf-magicpyramid`), no code from this repository runs:

```python
import hf_magicpyramid  # registers the magic_pyramid model type with the Auto classes
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("{{ repo }}").eval()
tokenizer = AutoTokenizer.from_pretrained("{{ tokenizer_repo }}")
inputs = tokenizer(["a gripping, beautifully shot film", "dull"], padding=True, return_tensors="pt")
outputs = model(**inputs)
outputs.logits, outputs.exit_layer  # each sample's logits at its exit, and the 1-based layer it exited after

from transformers import pipeline

classifier = pipeline("text-classification", model="{{ repo }}")
```

Without the plugin, load the custom code saved in this repository (pin the revision you reviewed):

```python
from transformers import AutoModelForSequenceClassification

model = AutoModelForSequenceClassification.from_pretrained("{{ repo }}", trust_remote_code=True, revision="<commit sha>")
```

Change the speed without retraining, for the model (saved with it) or for one call:

```python
model.set_speed({{ speed_example }})
outputs = model(**inputs, {{ call_example }})
```

### Remote code and security

`trust_remote_code=True` runs the Python files of this repository ({{ code_files }}) on your machine with your \
permissions. Read them before you load the model, and pin `revision=` to the commit you read, so that a later push \
cannot change the code you run. Loading with the plugin installed runs only the installed package's code, and the \
weights are safetensors (no pickle).
"""


def _hub_id(name) -> bool:
    """Whether `name` is a Hub repo id rather than a local folder (an existing path, relative or not, is local)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not name or name.startswith((".", "~", "/")) or os.path.isabs(name) or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_base_model(config: MagicPyramidConfig) -> str | None:
    """The backbone checkpoint's Hub id when the config knows it (not a local folder), else None."""
    name = getattr(config.backbone_config, "_name_or_path", "") or ""
    return name if _hub_id(name) else None


def _fmt_list(values) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _fmt_number(value, digits: int = 3) -> str:
    if value is None:
        return "never"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _calibration_table(config: MagicPyramidConfig, calibration: dict) -> tuple[list[list[str]], str, str]:
    """(table rows as cells, header row first; the note on what was measured; the note on shown rows)."""
    points = calibration["points"]
    shown = points
    if len(points) > CARD_TABLE_ROWS:
        shown = frontier(points)
        shown += [p for p in points if is_default_point(config, p) and p not in shown]
    knobs = [knob for knob in EXIT_KNOBS + PRUNING_KNOBS if any(knob in point["setting"] for point in shown)]
    measured = [f"{label} {calibration[key]}" for key, label in
                (("dataset", "on"), ("num_samples", "samples:"), ("batch_size", "batch size"), ("device", "device:"))
                if calibration.get(key) not in (None, "")]
    note = "" if shown is points else (f"{len(points)} settings were measured; the table shows the {len(shown)} on the "
                                       f"speed/accuracy frontier (all are in `{CALIBRATION_JSON}`).")
    rows = [[*(f"`{k}`" for k in knobs), "accuracy", "mean exit layer", "kept tokens", "FLOPs", "speedup", ""],
            ["---"] * (len(knobs) + 6)]
    stock = calibration.get("stock") or {}
    if isinstance(stock.get("accuracy"), (int, float)) and not isinstance(stock["accuracy"], bool):
        cells = (["stock model"] + [""] * (len(knobs) - 1)) if knobs else []
        rows.append(cells + [f"{stock['accuracy']:.2f}%", str(config.num_hidden_layers), "100%", "100%", "1.00x", ""])
    for point in shown:
        speedup = point["measured_speedup"]
        rows.append([
            *(_fmt_number(point["setting"][knob]) if knob in point["setting"] else "" for knob in knobs),
            f"{point['accuracy']:.2f}%",
            f"{point['mean_exit_layer']:.2f}",
            f"{100 * point['kept_token_fraction']:.0f}%",
            f"{100 * point['flops_ratio']:.0f}%",
            f"{speedup:.2f}x" if speedup is not None else "-",
            "**default**" if is_default_point(config, point) else "",
        ])
    return rows, f" ({'; '.join(measured)})" if measured else "", note


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
    """The text of a model card (README.md) with Hub YAML metadata for a Magic Pyramid `config` (`CARD_TEMPLATE`)."""
    from huggingface_hub import ModelCard, ModelCardData

    base_model = base_model or hub_base_model(config)
    family = config.backbone_type
    slender = config.heads_per_layer is not None or config.ffn_per_layer is not None
    card_data = ModelCardData(base_model=base_model, library_name="transformers", pipeline_tag="text-classification",
                              license=license, tags=[*CARD_TAGS, family] + (["slenderized"] if slender else []))
    repo = repo_id or "<username>/<model-name>"
    patience = config.exit_criterion == "patience"
    knob = "patience" if patience else "exit_threshold"
    if getattr(config, knob) is None:
        exit_speed = f"none set: every sample runs to the last layer until you set `{knob}` (see Usage)"
    else:
        exit_speed = f"`patience = {config.patience}`" if patience else f"`exit_threshold = {config.exit_threshold:g}`"
    speed_example = ("patience=2" if patience else "exit_threshold=0.2") + {
        "topk": ", keep_ratio_scale=1.5", "threshold": ", prune_threshold_offset=0.05"}.get(config.token_pruning, "")
    table, measured, table_note = _calibration_table(config, calibration) if calibration is not None else ([], "", "")
    if num_parameters:
        parameters = f"; {num_parameters / 1e6:.1f}M parameters" if num_parameters >= 1e5 else f"; {num_parameters:,} parameters"
    else:
        parameters = ""
    card = ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        c=config,
        marker=CARD_MARKER,
        title=repo_id.split("/")[-1] if repo_id else f"Magic Pyramid {family} classifier",
        backbone=f"`{base_model}`" if base_model else "a local checkpoint",
        family=family,
        parameters=parameters,
        labels=", ".join(f"{i}: {label}" for i, label in sorted(config.id2label.items())),
        exit_layers=_fmt_list(config.resolved_exit_layers()),
        criterion={
            "entropy": "the normalised entropy of the exit's prediction is below `exit_threshold`",
            "confidence": "the exit's largest probability is above `exit_threshold`",
            "patience": "the prediction is unchanged for `patience` exits in a row",
        }[config.exit_criterion],
        exit_speed=exit_speed,
        importance={
            "cls_attention": "the attention the first token pays to it",
            "mean_attention": "the attention it receives, averaged over tokens and heads",
        }[config.token_importance],
        schedule=_fmt_list(config.resolved_keep_ratios() if config.token_pruning == "topk" else
                           config.resolved_prune_thresholds() if config.token_pruning == "threshold" else []),
        widths=list(zip(config.resolved_heads(), config.resolved_ffn())) if slender else [],
        table=table,
        measured=measured,
        table_note=table_note,
        plot=CALIBRATION_PNG if plot and table else "",
        repo=repo,
        tokenizer_repo=repo if has_tokenizer or not base_model else base_model,
        speed_example=speed_example,
        call_example="patience=3" if patience else "exit_threshold=0.1",
        code_files=", ".join(f"`{name}`" for name in REMOTE_CODE_FILES),
    )
    return str(card).rstrip() + "\n"


def _config_of(model_or_dir) -> tuple[MagicPyramidConfig, Path | None, int | None]:
    """(config, folder or None, parameter count or None) of a model, a config or a saved folder."""
    if isinstance(model_or_dir, MagicPyramidPreTrainedModel):
        model_or_dir.sync_config()
        return model_or_dir.config, None, model_or_dir.num_parameters()
    if isinstance(model_or_dir, MagicPyramidConfig):
        return model_or_dir, None, None
    folder = Path(model_or_dir)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"No config.json in {folder}: pass a Magic Pyramid model, its config, or a saved model folder.")
    _pyramid_config_json(folder)
    try:
        num_parameters = _count_parameters(folder, _weight_files(folder))
    except (ValueError, OSError):
        num_parameters = None
    return MagicPyramidConfig.from_pretrained(folder), folder, num_parameters


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
    if card_path.is_file() and not overwrite and not _written_by_us(card_path):
        raise FileExistsError(f"{card_path} exists and was not written by hf-magicpyramid; pass overwrite=True to replace it.")

    plot_source = None
    if calibration is None:
        for candidate in [folder, save_directory]:
            if candidate is not None and (candidate / CALIBRATION_JSON).is_file():
                calibration = load_calibration(candidate)
                plot_source = candidate / CALIBRATION_PNG
                break
    elif isinstance(calibration, (str, os.PathLike)):
        source = Path(calibration)
        plot_source = (source.parent if source.is_file() else source) / CALIBRATION_PNG
        calibration = load_calibration(source)
        if calibration is None:
            raise FileNotFoundError(f"No calibration result at {source}.")
    else:
        calibration = validate_calibration(calibration)
    plot = (save_directory / CALIBRATION_PNG).is_file()
    if not plot and plot_source is not None and plot_source.is_file():
        shutil.copyfile(plot_source, save_directory / CALIBRATION_PNG)
        plot = True

    text = render_model_card(config, repo_id=repo_id, calibration=calibration, plot=plot and calibration is not None,
                             num_parameters=num_parameters, license=license, base_model=base_model,
                             has_tokenizer=_has_tokenizer(folder or save_directory))
    card_path.write_text(text, encoding="utf-8")
    return card_path


def _written_by_us(card_path: Path) -> bool:
    return CARD_MARKER in card_path.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------------
# What a push uploads
# ---------------------------------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _pyramid_config_json(folder: Path) -> dict:
    """config.json of `folder` as saved; raises `ValueError` when it is not a Magic Pyramid config."""
    config = _read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("model_type") != MagicPyramidConfig.model_type:
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(
            f"{folder / CONFIG_FILE} has model_type {model_type!r}, not {MagicPyramidConfig.model_type!r}: this is not "
            "a Magic Pyramid model. Convert a stock checkpoint with MagicPyramidForSequenceClassification.from_backbone(...) "
            "and save_pretrained() it first (a stock model pushes with its own push_to_hub)."
        )
    return config


def _has_tokenizer(folder: Path) -> bool:
    return (folder / TOKENIZER_CONFIG).is_file() and any((folder / name).is_file() for name in TOKENIZER_VOCABULARIES)


def _weight_files(folder: Path) -> list[str]:
    """The safetensors files to upload: model.safetensors, or the index and the shards it lists."""
    if (folder / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    if (folder / WEIGHTS_INDEX).is_file():
        index = _read_json(folder / WEIGHTS_INDEX)
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing or not shards:
            raise ValueError(f"{folder / WEIGHTS_INDEX} lists weight shards that are missing: {missing or 'none listed'}.")
        return [WEIGHTS_INDEX, *shards]
    found = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    hint = f" (found {', '.join(found)}: pickled weights are not pushed; re-save with save_pretrained, which writes safetensors)" if found else ""
    raise ValueError(f"No {WEIGHTS_FILE} (or {WEIGHTS_INDEX}) in {folder}{hint}.")


def _count_parameters(folder: Path, weights: list[str]) -> int:
    """Parameters in the safetensors files, from their headers (`safetensors.safe_open` reads no tensor data)."""
    from safetensors import safe_open

    total = 0
    for name in weights:
        if name == WEIGHTS_INDEX:
            continue
        try:
            with safe_open(folder / name, framework="pt") as handle:
                total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
        except Exception as error:  # safetensors raises its own SafetensorsError, or OSError
            raise ValueError(f"{folder / name} is not a readable safetensors file ({error}); re-save the model with "
                             "save_pretrained().") from error
    return total


def _code_files(folder: Path, auto_map: dict) -> dict[str, Path | bytes]:
    """The custom code the auto_map needs, with its relative imports: the folder's own files, or the installed
    package's copy (as save_pretrained writes it) of a `REMOTE_CODE_FILES` file the folder lacks."""
    from transformers.dynamic_module_utils import get_relative_imports

    package = Path(__file__).parent
    modules = [ref.rsplit(".", 1)[0] for target in auto_map.values()
               for ref in (target if isinstance(target, (list, tuple)) else [target])
               if ref and "--" not in ref]  # "user/repo--module.Class": code kept in another repository
    files: dict[str, Path | bytes] = {}
    while modules:
        name = f"{modules.pop()}.py"
        if name in files:
            continue
        path = folder / name
        if path.is_file():
            files[name] = path
        elif name in REMOTE_CODE_FILES:
            path = package / name
            files[name] = path.read_bytes()
        else:
            raise ValueError(f"{folder} lacks the custom code file {name} that loading with trust_remote_code=True needs, "
                             "and the installed hf_magicpyramid has no such module. Re-save the model with save_pretrained().")
        modules += get_relative_imports(path)
    return files


def _included(folder: Path, patterns) -> dict[str, Path]:
    """The files matched by `include=` patterns (relative paths with * ? [], or a folder); hidden files never."""
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns or ())
    if not patterns:
        return {}
    candidates = sorted(
        relative for relative in (path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
        if not any(part.startswith(".") for part in relative.split("/"))
    )
    found: dict[str, Path] = {}
    for pattern in map(str, patterns):
        prefix = pattern.strip("/") + "/"
        matched = [f for f in candidates if fnmatch.fnmatchcase(f, pattern) or f.startswith(prefix)]
        if not matched:
            raise ValueError(f"include pattern {pattern!r} matches no file in {folder}; patterns are paths relative to "
                             "the folder, with * and ?, e.g. 'LICENSE' or 'examples/*'.")
        pickled = [f for f in matched if f.lower().endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise ValueError(f"include pattern {pattern!r} matches pickled files ({', '.join(pickled[:5])}"
                             f"{', ...' if len(pickled) > 5 else ''}): loading a pickle runs code, so they are never "
                             "pushed. Narrow the pattern; weights go to the Hub as safetensors (save_pretrained).")
        found.update((f, folder / f) for f in matched)
    return found


_ABSOLUTE_PATH = re.compile(r"^(?:/|~[/\\]|[A-Za-z]:[/\\]|\\\\)[^\n]*$")


def _local_roots(folder: Path) -> list[str]:
    """Folders whose paths must not leave the machine, longest first: the model folder and its parent, the working
    folder, the home folder; only ones at least two levels deep, so that a short root ("/app") never matches a word."""
    model_folders = (folder.absolute(), folder.resolve())
    roots = {str(path) for path in (*model_folders, *(path.parent for path in model_folders), Path.cwd(), Path.home())}
    return sorted((root for root in roots if len(Path(root).parts) >= 3), key=len, reverse=True)


def _path_name(path: str) -> str:
    return (PureWindowsPath(path) if "\\" in path else PurePosixPath(path)).name


def scrub_local_paths(value, roots: list[str], key: str | None = None):
    """`value` (parsed JSON) without local paths: a `_name_or_path` that is not a Hub id becomes "", an absolute path
    becomes its last part, and a local folder named inside a text becomes the last part of the path."""
    if isinstance(value, dict):
        return {k: scrub_local_paths(v, roots, k) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_local_paths(v, roots) for v in value]
    if not isinstance(value, str):
        return value
    if key in NAME_OR_PATH_KEYS:
        return value if not value or _hub_id(value) else ""
    if _ABSOLUTE_PATH.match(value) and len(re.split(r"[/\\]+", value.strip("/\\"))) >= 2:
        return _path_name(value)
    for root in roots:
        if root in value:
            value = re.sub(re.escape(root) + r"[^\s\"'<>|,;]*", lambda match: _path_name(match.group()), value)
    return value


@dataclasses.dataclass
class PushPlan:
    """What `push_to_hub` uploads from a model folder. `files`: path in the repo → the user's file (uploaded by path)
    or generated bytes; `card`: `render_model_card` arguments when the card is generated (at push, with the repo id)."""

    folder: Path
    config: MagicPyramidConfig
    files: dict[str, Path | bytes]
    card: dict | None

    def contents(self, repo_id: str | None = None) -> dict[str, Path | bytes]:
        """Every file of the upload, the model card included."""
        files = dict(self.files)
        if self.card is not None:
            files[MODEL_CARD] = render_model_card(self.config, repo_id=repo_id, **self.card).encode("utf-8")
        return dict(sorted(files.items()))

    def operations(self, repo_id: str | None = None) -> list:
        from huggingface_hub import CommitOperationAdd

        return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source if isinstance(source, bytes) else str(source))
                for name, source in self.contents(repo_id).items()]


def check_model_folder(model_dir, *, include=(), require_tokenizer: bool = True, license: str = DEFAULT_LICENSE,
                       base_model: str | None = None) -> PushPlan:
    """Check that `model_dir` is a saved Magic Pyramid model ready to push and list what to upload (module docstring);
    raise `ValueError` / `FileNotFoundError` saying what is wrong and how to fix it. Reads small files only (JSON,
    safetensors headers); writes nothing."""
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {folder} does not exist (save the model with save_pretrained first).")
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"No config.json in {folder}: this is not a saved model folder.")
    raw_config = _pyramid_config_json(folder)
    try:
        config = MagicPyramidConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{folder / CONFIG_FILE} is not a valid Magic Pyramid config: {error}") from error
    weights = _weight_files(folder)
    num_parameters = _count_parameters(folder, weights)
    has_tokenizer = _has_tokenizer(folder)
    if require_tokenizer and not has_tokenizer:
        raise ValueError(
            f"No tokenizer in {folder} (it needs {TOKENIZER_CONFIG} and one of {', '.join(TOKENIZER_VOCABULARIES)}). "
            "Save it beside the model with tokenizer.save_pretrained(model_dir) so that the model can be used from the "
            "Hub, or push without it (require_tokenizer=False)."
        )
    load_calibration(folder)  # a broken calibration.json fails here, before any request

    files: dict[str, Path | bytes] = {name: folder / name for name in (*MODEL_FILES, *weights) if (folder / name).is_file()}
    auto_map = {**AUTO_MAP, **(raw_config.get("auto_map") or {})}
    files.update(_code_files(folder, auto_map))
    files.update((name, path) for name, path in _included(folder, include).items() if name not in files)
    card_path = folder / MODEL_CARD
    if card_path.is_file() and not _written_by_us(card_path):
        files[MODEL_CARD] = card_path  # a card a person wrote goes as it is

    roots = _local_roots(folder)
    for name, source in files.items():
        if not name.endswith(".json") or isinstance(source, bytes) or Path(name).name in UNSCRUBBED_JSON:
            continue
        data = _read_json(source)
        clean = scrub_local_paths(data, roots)
        if name == CONFIG_FILE:
            clean["auto_map"] = auto_map
        if clean != data:
            files[name] = (json.dumps(clean, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    card = None
    if MODEL_CARD not in files:
        calibration = files.get(CALIBRATION_JSON)
        if calibration is not None:
            data = json.loads(calibration) if isinstance(calibration, bytes) else _read_json(calibration)
            calibration = validate_calibration(data, source=str(folder / CALIBRATION_JSON))
        card = dict(calibration=calibration, plot=CALIBRATION_PNG in files, num_parameters=num_parameters,
                    license=license, base_model=base_model, has_tokenizer=has_tokenizer)
    return PushPlan(folder=folder, config=config, files=files, card=card)


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
        if status == 409 and step.startswith("create the repo"):
            return HubPushError(f"The repo {repo_id!r} already exists at {endpoint}; pass exist_ok=True to push a new "
                                f"commit to it, or choose another repo id. {kept}")
        if status >= 500:
            return HubConnectionError(
                f"The Hub at {endpoint} failed (HTTP {status}) when trying to {step}: {server_message}. Push again later. {kept}"
            )
        return HubPushError(f"The Hub at {endpoint} answered HTTP {status} when trying to {step}: {server_message}. {kept}")
    return None


def push_to_hub(
    model_dir,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    include=(),
    license: str = DEFAULT_LICENSE,
    exist_ok: bool = True,
    base_model: str | None = None,
    require_tokenizer: bool = True,
):
    """Upload the model in a saved Magic Pyramid folder to the Hub in one commit; return the `huggingface_hub.CommitInfo`
    (a str: the commit URL; `.oid` is the commit sha, `.pr_url` the pull request with `create_pr=True`).

    Checked before any request: the repo id; that `model_dir` holds config.json with model_type "magic_pyramid",
    readable safetensors weights, the custom code files its `auto_map` needs (taken from the installed package when
    missing, as save_pretrained writes them) and a tokenizer (unless `require_tokenizer=False`). Uploaded: the allowlist
    of the module docstring, plus the files matched by `include` (patterns relative to the folder, e.g. ["LICENSE",
    "eval/*.json"]; pickled files are refused). A README.md a person wrote is uploaded as it is; otherwise a model card
    is generated (`render_model_card`, with `license` and `base_model`). Local absolute paths are removed from the
    uploaded JSON files. The folder is never written to.

    `token`: a Hub token with write access (default: HF_TOKEN or the `hf auth login` token). `private`: visibility of
    a new repo (None: the Hub's default). `revision`: a branch, created from main if missing. `exist_ok=False` refuses
    an existing repo. Raises `ValueError` (bad repo id, folder or pattern), `HubAuthenticationError`,
    `HubConnectionError` or `HubPushError`, each saying what to do.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    plan = check_model_folder(model_dir, include=include, require_tokenizer=require_tokenizer, license=license,
                              base_model=base_model)
    api = HfApi(token=token)
    endpoint = api.endpoint
    step = f"create the repo {repo_id!r}"
    try:
        full_id = api.create_repo(repo_id, private=private, exist_ok=exist_ok, repo_type="model").repo_id
        if revision is not None and not revision.startswith("refs/pr/"):
            step = f"create the branch {revision!r} of {full_id!r}"
            api.create_branch(full_id, branch=revision, exist_ok=True)
        if commit_message is None:
            commit_message = (f"Upload Magic Pyramid model ({plan.config.backbone_type}, "
                              f"{plan.config.num_hidden_layers} layers) with hf-magicpyramid")
        step = f"upload {plan.folder} to {full_id!r}"
        return api.create_commit(full_id, plan.operations(full_id), commit_message=commit_message, repo_type="model",
                                 revision=revision, create_pr=create_pr)
    except Exception as error:
        clear = _translate_hub_error(error, endpoint, repo_id, token, step)
        if clear is None:
            raise
        raise clear from error


__all__ = [
    "push_to_hub",
    "write_model_card",
    "render_model_card",
    "check_model_folder",
    "check_repo_id",
    "scrub_local_paths",
    "PushPlan",
    "HubPushError",
    "HubAuthenticationError",
    "HubConnectionError",
]
