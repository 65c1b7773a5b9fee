"""The command line's settings, each declared once as a dataclass field with its default and help text.

`cli.py` builds its parsers from these with `transformers.HfArgumentParser`, which gives every field a flag in both
spellings (`--max_length` and `--max-length`) plus the aliases in its metadata (the names `run_glue.py` users type:
`--model_name_or_path`, `--per_device_train_batch_size`, `--num_train_epochs`, `--max_seq_length`, ...). Presets map
onto the same field names (`presets.preset_arguments`), and `train_magic_pyramid` writes `RecipeSettings` whole into
`training_summary.json`.

Every dataclass checks its values when it is built (`__post_init__`), so a bad setting fails before any work, with one
line naming the value and what is allowed. Checks that need the backbone (a `keep_ratios` list of the wrong length)
happen when the recipe builds its `MagicPyramidConfig`, still before stage 1.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import MISSING, dataclass, field
from typing import Literal

from .configuration_magic_pyramid import (
    EXIT_CRITERIA,
    EXIT_OBJECTIVES,
    EXIT_POOLINGS,
    TOKEN_PRUNING_MODES,
    MagicPyramidConfig,
    check_keep_ratios,
)
from .quantization import QUANTIZATION_METHODS

DEFAULT_MAX_LENGTH = 128
PRUNING_DECISIONS = ("auto", "on", "off")
EXIT_TEACHERS = ("final_exit", "every_exit")
# MagicPyramidConfig fields (the backbone and the labels come from the backbone and the data, never from settings).
CONFIG_FIELDS = tuple(name for name in MagicPyramidConfig.__annotations__ if name != "backbone_config")


def _arg(default=MISSING, help: str = "", aliases: tuple[str, ...] = (), **kwargs):
    """A dataclass field for `HfArgumentParser`: its help text, and aliases given in both spellings. Without a default
    (or `default_factory`) the flag is required."""
    spellings: list[str] = []
    for alias in aliases:
        for spelling in (f"--{alias}", f"--{alias.replace('_', '-')}"):
            if spelling not in spellings:
                spellings.append(spelling)
    metadata = {"help": help.replace("%", "%%")}
    if spellings:
        metadata["aliases"] = spellings
    if "default_factory" in kwargs:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)


def check_positive(name: str, value) -> None:
    if not _is_number(value) or value <= 0 or math.isinf(value):
        raise ValueError(f"{name}={value!r} is out of range: it must be a number > 0.")


def check_count(name: str, value, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        suffix = " (or omitted for all of them)" if optional else ""
        raise ValueError(f"{name}={value!r} is out of range: it must be an integer >= {minimum}{suffix}.")


def check_between(name: str, value, low: float, high: float, high_open: bool = False) -> None:
    ok = _is_number(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range: it must be a number in [{low}, {high}{')' if high_open else ']'}.")


def check_folds(value) -> None:
    """--calibration_folds: 0 (off) or an integer >= 2."""
    if isinstance(value, bool) or not isinstance(value, int) or value == 1 or value < 0:
        raise ValueError(f"calibration_folds={value!r} is out of range: it must be 0 (off) or an integer >= 2.")


def check_choice(name: str, value, allowed, optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed) + (" or None (automatic)" if optional else "")
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}.")


def check_keep_ratio_values(keep_ratios) -> list[float]:
    """What can be checked without the backbone: ratios in (0, 1], the first 1.0, never increasing. The length (one
    per layer) is checked against the backbone when the recipe builds its config."""
    if isinstance(keep_ratios, (str, bytes)) or not isinstance(keep_ratios, (list, tuple)) or not keep_ratios:
        raise ValueError(f"keep_ratios={keep_ratios!r} is invalid: give one kept share per layer, e.g. 1.0 0.9 0.8 0.7.")
    check_keep_ratios(list(keep_ratios), len(keep_ratios))
    return [float(ratio) for ratio in keep_ratios]


@dataclass
class RecipeSettings:
    """Every knob of `train_magic_pyramid` (saved whole in `training_summary.json`)."""

    _argument_group_name = "recipe settings (every stage runs with the Hugging Face Trainer)"

    max_length: int = _arg(DEFAULT_MAX_LENGTH, "Tokens per input after truncation.", ("max_seq_length",))
    batch_size: int = _arg(32, "Training batch size per device.", ("per_device_train_batch_size",))
    eval_batch_size: int = _arg(64, "Evaluation batch size per device.", ("per_device_eval_batch_size",))
    epochs: float = _arg(3.0, "Stage 1 epochs: fine-tune the backbone and its head (skipped when the backbone already is "
                         "a classifier with the data's labels).", ("num_train_epochs",))
    pruning_epochs: float = _arg(1.0, "Stage 2 epochs: LTP's soft phase, learning the pruning thresholds "
                                 "(token_pruning=threshold only).")
    pruned_finetune_epochs: float = _arg(1.0, "Stage 3 epochs: fine-tune with the token pruning fixed (with "
                                         "exit_objective=joint the exits train here too).")
    exit_epochs: float = _arg(2.0, "Stage 4 epochs: train the exit heads with the backbone frozen (two_stage, "
                              "self_distillation; skipped for joint).")
    learning_rate: float = _arg(5e-5, "Learning rate of the backbone and its head (stages 1-3, and stage 4 for joint).")
    exit_learning_rate: float = _arg(5e-4, "Learning rate of the exit heads in stage 4.")
    threshold_learning_rate: float = _arg(2e-3, "Learning rate of LTP's per-layer pruning thresholds (stage 2).")
    weight_decay: float = _arg(0.01, "AdamW weight decay.")
    warmup_ratio: float = _arg(0.06, "Share of each stage's steps spent warming up the learning rate, in [0, 1).")
    gradient_accumulation_steps: int = _arg(1, "Batches whose gradients are summed before each optimizer step.")
    # "topk" by default: on all-MiniLM-L6-v2 + Rotten Tomatoes (1,600 train, 500 validation) the fixed 1.0 -> 0.5
    # pyramid, fine-tuned in stage 3, scored 79.4% vs the stock 78.6%; LTP thresholds (soft phase at pruning_temperature
    # 0.01, λ 0.1) fell to 65.8%: that model's [CLS] attention scores (~1e-3) are far below the temperature, so the soft
    # masks stay near 0.5 and do not approximate the hard ones.
    token_pruning: Literal[TOKEN_PRUNING_MODES] = _arg(
        "topk", "topk: a fixed pyramid schedule (keep_ratios); threshold: LTP's learned per-layer thresholds (stage 2); "
        "none: no token pruning.")
    exit_objective: Literal[EXIT_OBJECTIVES] = _arg(
        "self_distillation", "How the exits learn: self_distillation (from the final head, backbone frozen), two_stage "
        "(from the labels, backbone frozen) or joint (with the backbone, depth-weighted).")
    exit_teacher: Literal[EXIT_TEACHERS] = _arg(
        "final_exit", "exit_objective=joint only: what the stage-1 model teaches (weight distillation_alpha) while the "
        "exits train with the backbone. final_exit: the final exit only; every_exit: every exit, depth-weighted like "
        "the joint loss (Σ layer_k · soft-CE_k / Σ layer_k), which also holds the final exit's accuracy.")
    exit_pooling: Literal[EXIT_POOLINGS] | None = _arg(
        None, "What an exit reads: cls (the first token) or mean (of the kept tokens). Default: mean for "
        "sentence-embedding checkpoints, else cls.")
    exit_criterion: Literal[EXIT_CRITERIA] = _arg("entropy", "The early-exit rule the model runs.")
    pruning_penalty: float | None = _arg(None, "LTP's λ on the kept-token share (stage 2). Default: the config's 0.1.")
    keep_ratios: list[float] | None = _arg(
        None, "topk: the kept share of each sample's tokens per layer, one per layer, e.g. 1.0 0.9 0.8 0.7 0.6 0.5: in "
        "(0, 1], the first 1.0, never increasing. Default: the config's linear 1.0 -> 0.5 pyramid.")
    distillation_alpha: float = _arg(0.5, "Weight of the stage-1 teacher in the final exit's loss in stages 2-3, in "
                                     "[0, 1] (0 disables the teacher).")
    teacher_temperature: float = _arg(
        2.0, "Softmax temperature of that teacher (stages 2-3). Not the config's distillation_temperature, which is "
        "the exits' self-distillation temperature (set it in --pyramid_options or a preset).")
    seed: int = _arg(42, "Seed of the model initialisation, the data order and the subsampling.")
    save_steps: int = _arg(500, "Trainer checkpoint interval inside a stage (a rerun resumes from the last one).")
    logging_steps: int = _arg(50, "Trainer logging interval.")
    keep_checkpoints: bool = _arg(False, "Keep each stage's Trainer checkpoints after the stage is done.")
    disable_tqdm: bool | None = _arg(None, "Hide the Trainer's progress bars (default: the Trainer's choice).")
    pyramid_options: dict | str | None = _arg(
        help="More MagicPyramidConfig fields, as a JSON object, e.g. '{\"exit_layers\": [2, 4, 6], "
        "\"distillation_temperature\": 1.0}' (distillation_temperature is the exits' self-distillation temperature).",
        default_factory=dict)
    # The rule and its numbers live in training.py (PRUNING_FLOOR_TOKENS, pruning_length_check); this text states them.
    pruning: Literal[PRUNING_DECISIONS] = _arg(
        "auto", "Whether the trained token pruning (--token_pruning topk or threshold) is kept in the saved model. auto: "
        "only where it pays, by two checks. (1) Lengths: the schedule's expected time saving at batch 1 on the "
        "training texts must reach one layer's share of the forward (1/num_layers: 0.167 for 6 layers), what the exits "
        "save by leaving one layer earlier at no cost to the backbone. A layer is costed as its tokens plus 36 (its "
        "fixed cost at batch 1: BENCHMARKS.md measured 3.3 ms + 0.094 ms per token for a bert-base layer on CPU), so the "
        "1.0->0.5 pyramid saves about 0.10 on 29-token snippets and 0.23 on 512-token reviews (threshold pruning: "
        "checked after stage 3 on the tokens it kept on validation). (2) Accuracy: after the pruned fine-tune (stage "
        "3) its validation accuracy must be within --max_drop of stage 1's. Where either fails, the exits train on the "
        "unpruned stage-1 backbone and the saved model has token_pruning none. on: always kept; off: never (stages 2-3 "
        "skipped). The decision and its numbers go to training_summary.json.")
    max_drop: float = _arg(
        0.5, "Accuracy points below the stage-1 fine-tuned model that the saved default speed may lose on validation "
        "(the calibration stage stores the fastest setting within it, the most accurate one when none is), and that "
        "pruning may cost (--pruning auto).")
    calibrate: bool = _arg(
        True, "Last stage: calibrate the speed on the validation split (the sweep, with --max_drop) and save the chosen "
        "setting as the model's default. --calibrate false skips it: the saved default is then the exact model (no "
        "early exit, no pruning).")
    calibration_folds: int = _arg(
        5, "Guard the calibrated choice against selection bias by K-fold cross-validation of the rule on the calibration "
        "data (choose on K-1 folds, score on the held-out one): when the cheapest setting within --max_drop lands beyond "
        "it on held-out samples, the choice is made within a tighter budget (0.75, 0.5, 0.25, 0 times it; else the "
        "exact model). Matters on small validation sets. 0: off.")
    calibration_holdout: float = _arg(
        0.0, "A share of the training rows, in [0, 0.5), set aside (seeded) before any training and added to the "
        "validation data of the calibration stage: more samples to resolve --max_drop when the validation set is small "
        "(or calibration at all without one). The model trains on the rest. 0: none.")

    def __post_init__(self):
        for name in ("max_length", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "save_steps",
                     "logging_steps"):
            check_count(name, getattr(self, name))
        check_count("seed", self.seed, minimum=0)
        for name in ("epochs", "pruning_epochs", "pruned_finetune_epochs", "exit_epochs", "learning_rate",
                     "exit_learning_rate", "threshold_learning_rate", "teacher_temperature"):
            check_positive(name, getattr(self, name))
        check_between("weight_decay", self.weight_decay, 0.0, math.inf)
        check_between("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        check_between("distillation_alpha", self.distillation_alpha, 0.0, 1.0)
        if self.pruning_penalty is not None:
            check_between("pruning_penalty", self.pruning_penalty, 0.0, math.inf)
        check_choice("token_pruning", self.token_pruning, TOKEN_PRUNING_MODES)
        check_choice("exit_objective", self.exit_objective, EXIT_OBJECTIVES)
        check_choice("exit_pooling", self.exit_pooling, EXIT_POOLINGS, optional=True)
        check_choice("exit_criterion", self.exit_criterion, EXIT_CRITERIA)
        check_choice("pruning", self.pruning, PRUNING_DECISIONS)
        check_choice("exit_teacher", self.exit_teacher, EXIT_TEACHERS)
        check_between("calibration_holdout", self.calibration_holdout, 0.0, 0.5, high_open=True)
        if not _is_number(self.max_drop):
            raise ValueError(f"max_drop={self.max_drop!r} must be a number of accuracy points, e.g. 0.5.")
        check_folds(self.calibration_folds)
        if self.keep_ratios is not None:
            self.keep_ratios = check_keep_ratio_values(self.keep_ratios)
        self.pyramid_options = parse_pyramid_options(self.pyramid_options)


def parse_pyramid_options(options) -> dict:
    """`pyramid_options` (a dict, a JSON object string or None) as a dict of MagicPyramidConfig fields that no recipe
    setting names; raises `ValueError` naming a bad entry."""
    if options is None:
        return {}
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError as error:
            raise ValueError(f"pyramid_options={options!r} is not valid JSON ({error}): give a JSON object of "
                             "MagicPyramidConfig fields, e.g. '{\"exit_layers\": [2, 4, 6]}'.") from None
    if not isinstance(options, dict):
        raise ValueError(f"pyramid_options={options!r} must be a JSON object (a dict) of MagicPyramidConfig fields.")
    for name in options:
        if name in RECIPE_FIELDS:
            raise ValueError(f"pyramid_options[{name!r}]: {name} is a recipe setting of its own; set it as such "
                             f"(--{name}), not in pyramid_options.")
        if name not in CONFIG_FIELDS:
            allowed = [f for f in CONFIG_FIELDS if f not in RECIPE_FIELDS]
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"pyramid_options[{name!r}] is not a MagicPyramidConfig field{hint}; allowed: "
                             f"{', '.join(allowed)}.")
    return dict(options)


RECIPE_FIELDS = tuple(RecipeSettings.__dataclass_fields__)


@dataclass
class EvalDataArguments:
    """The validation data (used by `train` and `sweep`) and its columns."""

    _argument_group_name = "data"

    dataset: str | None = _arg(
        None, "An offline dataset (rotten_tomatoes, pang_lee, bbc_news) or a `datasets` name; its train and validation "
        "splits are used where no file is given.", ("dataset_name",))
    validation_file: str | None = _arg(None, "Validation data: CSV, TSV, JSON (lines) or Parquet.")
    text_column: str = _arg("text", "Column with the text.")
    text_pair_column: str | None = _arg(None, "Optional second text column (sentence pairs).")
    label_column: str = _arg("label", "Column with the class label.")

    def __post_init__(self):
        if not self.dataset and not self.validation_file:
            raise ValueError("no validation data: pass --validation_file FILE or --dataset NAME (with a validation split).")


@dataclass
class DataArguments(EvalDataArguments):
    """The training and validation data (`train`)."""

    train_file: str | None = _arg(None, "Training data: CSV, TSV, JSON (lines) or Parquet, with the same columns.")

    def __post_init__(self):
        if not self.dataset and not self.train_file:
            raise ValueError("no training data: pass --train_file FILE or --dataset NAME.")
        super().__post_init__()


@dataclass(kw_only=True)
class TrainRunArguments:
    """What `train` starts from and where it writes."""

    _argument_group_name = "run"

    model_name_or_path: str = _arg(
        "all-MiniLM-L6-v2", "The encoder to start from: a path or Hub id of a bare encoder or of your own fine-tuned "
        "XxxForSequenceClassification (then stage 1 is skipped). Default: the embedded all-MiniLM-L6-v2; with --preset, "
        "the preset's checkpoint.", ("backbone",))
    output_dir: str = _arg(help="Folder for the stages and, at its root, the final model and tokenizer.")
    overwrite_output_dir: bool = _arg(False, "Start over: discard the stages already in --output_dir (otherwise a rerun "
                                      "resumes them).")
    preset: str | None = _arg(
        None, "A preset of hub_configs/ (a name such as bert-base-uncased, or a JSON file): its settings replace the "
        "defaults; flags you give still win.")
    max_train_samples: int | None = _arg(None, "Train on a seeded subsample of this many rows.")
    max_eval_samples: int | None = _arg(None, "Evaluate on a seeded subsample of this many rows.")

    def __post_init__(self):
        check_count("max_train_samples", self.max_train_samples, optional=True)
        check_count("max_eval_samples", self.max_eval_samples, optional=True)


@dataclass(kw_only=True)
class SweepArguments:
    """How `sweep` calibrates the speed of a trained model."""

    _argument_group_name = "sweep"

    model_name_or_path: str = _arg(help="The trained Magic Pyramid folder (train's --output_dir).", aliases=("model",))
    stock_model: str | None = _arg(None, "The stock fine-tuned model to compare with. Default: the one train recorded, "
                                   "else the pyramid's own backbone weights run as a stock model.")
    max_length: int = _arg(DEFAULT_MAX_LENGTH, "Tokens per input after truncation.", ("max_seq_length",))
    max_drop: float | None = _arg(
        None, "Accuracy points the stored default speed may lose, e.g. 0.5: the fastest setting within it becomes the "
        "default (config.json only). When none is that close, the most accurate setting is stored with a warning.")
    strict: bool = _arg(False, "With --max_drop: exit with status 1 when no setting meets it (the most accurate setting "
                        "is still stored).")
    max_samples: int | None = _arg(None, "Calibrate on a seeded subsample of this many validation rows.",
                                   ("max_eval_samples",))
    batch_size: int = _arg(32, "Batch size of the measurements.", ("per_device_eval_batch_size",))
    batch1_samples: int = _arg(100, "Samples timed one at a time (0 skips the batch-1 timing).")
    report_dir: str | None = _arg(None, "Where calibration.json and calibration.png go. Default: the model folder.")
    quantize: str | None = _arg(
        None, "Calibrate the model quantized this way (int8: dynamic int8 Linear layers, CPU), against the fp32 stock "
        "model. Writes calibration_int8.json / .png; with --max_drop its default speed is stored there (applied by "
        "hf_magicpyramid.load_quantized), config.json keeps the fp32 default.")
    calibration_folds: int = _arg(
        5, "With --max_drop: guard the choice against selection bias by K-fold cross-validation of the rule (choose on "
        "K-1 folds, score on the held-out one): when the cheapest setting within --max_drop lands beyond it on held-out "
        "samples, the choice is made within a tighter budget (0.75, 0.5, 0.25, 0 times it; else the exact model). 0: off.")

    def __post_init__(self):
        check_choice("quantize", self.quantize, QUANTIZATION_METHODS, optional=True)
        check_folds(self.calibration_folds)
        if self.max_drop is not None and not _is_number(self.max_drop):
            raise ValueError(f"max_drop={self.max_drop!r} must be a number of accuracy points, e.g. 0.5.")
        check_count("max_length", self.max_length)
        check_count("max_samples", self.max_samples, optional=True)
        check_count("batch_size", self.batch_size)
        check_count("batch1_samples", self.batch1_samples, minimum=0)


@dataclass(kw_only=True)
class PushArguments:
    """What `push` uploads, and where."""

    _argument_group_name = "push"

    model_name_or_path: str = _arg(help="The saved model folder (train's --output_dir, or save_pretrained output).",
                                   aliases=("model",))
    repo_id: str = _arg(help="The Hub repo, 'name' or 'namespace/name'.", aliases=("hub_model_id",))
    token: str | None = _arg(None, "A Hub token with write access. Default: HF_TOKEN or the `hf auth login` token.",
                             ("hub_token",))
    private: bool = _arg(False, "Create the repo private (an existing repo keeps its visibility).", ("hub_private_repo",))
    revision: str | None = _arg(None, "Push to this branch (created if missing).")
    commit_message: str | None = _arg(None, "The commit message.")
    create_pr: bool = _arg(False, "Open a pull request instead of committing to the branch.")
    license: str | None = _arg(None, "License in a generated model card. Default: the hub module's (apache-2.0).")
    include: list[str] = _arg(help="More files of the folder to upload (glob patterns); by default only the model, its "
                              "tokenizer, card, calibration and code go.", default_factory=list)
    allow_missing_tokenizer: bool = _arg(False, "Push even when the folder has no tokenizer.")


@dataclass(kw_only=True)
class PredictArguments:
    """What `predict` classifies, with which model, and where it writes."""

    _argument_group_name = "predict"

    model_name_or_path: str = _arg(help="The model: a Magic Pyramid folder (train's --output_dir) or Hub id, or any "
                                   "fine-tuned XxxForSequenceClassification.", aliases=("model",))
    input: str = _arg(help="The file to classify: .csv, .tsv, .jsonl / .json (JSON lines) or .parquet, of any size.",
                      aliases=("input_file",))
    output: str | None = _arg(None, "Where to write: the input's format (CSV and TSV may be swapped). Default: "
                              "INPUT.predictions.EXT beside the input.", ("output_file",))
    text_column: str = _arg("text", "Column with the text.")
    text_pair_column: str | None = _arg(None, "Optional second text column (sentence pairs).")
    batch_size: int = _arg(32, "Rows per model call.", ("per_device_eval_batch_size",))
    max_length: int = _arg(DEFAULT_MAX_LENGTH, "Tokens per input after truncation (use train's --max_seq_length).",
                           ("max_seq_length",))
    exit_threshold: float | None = _arg(None, "Early-exit threshold for this run (Magic Pyramid models). Default: the "
                                        "model's stored speed.")
    keep_ratio_scale: float | None = _arg(None, "Token-pruning scale for this run (Magic Pyramid models). Default: the "
                                          "model's stored speed.")
    on_bad_row: Literal["fail", "skip"] = _arg(
        "fail", "A row with an empty or non-string text, a missing column or an undecodable line: `fail` stops naming "
        "its line; `skip` writes it with an empty label and the reason in an `error` column.")
    quantize: Literal["int8"] | None = _arg(None, "`int8`: dynamic int8 quantization of the linear layers (CPU).")
    chunk_size: int = _arg(4096, "Rows read, sorted by length, classified and committed at a time: bounds the memory "
                           "and the work redone after an interruption.")
    sort_by_length: bool = _arg(True, "Batch each chunk's rows by token count (--no_sort_by_length: batches in input "
                                "order).")
    overwrite: bool = _arg(False, "Replace an existing output file, and discard an unfinished run of another command "
                           "(otherwise a rerun of the same command resumes it).")
    device: str | None = _arg(None, "cpu, cuda, cuda:1, ... Default: the GPU of this rank when there is one, else "
                              "the CPU.")

    def __post_init__(self):
        check_count("batch_size", self.batch_size)
        check_count("max_length", self.max_length)
        check_count("chunk_size", self.chunk_size)
        check_choice("on_bad_row", self.on_bad_row, ("fail", "skip"))
        check_choice("quantize", self.quantize, ("int8",), optional=True)
        if self.exit_threshold is not None:
            check_between("exit_threshold", self.exit_threshold, 0.0, 1.0)
        if self.keep_ratio_scale is not None:
            check_between("keep_ratio_scale", self.keep_ratio_scale, 0.0, 10.0)
def _bench_lines() -> list[str]:
    from .bench import LINES  # declared once, where the lines are built

    return list(LINES)


@dataclass(kw_only=True)
class BenchArguments:
    """What `bench` measures, on which data, and where it writes."""

    _argument_group_name = "bench"

    model_name_or_path: str = _arg(help="The trained Magic Pyramid folder (train's --output_dir).", aliases=("model",))
    test_file: str | None = _arg(None, "Test data: CSV, TSV, JSON (lines) or Parquet, with a text and a label column.")
    dataset: str | None = _arg(None, "An offline dataset (rotten_tomatoes, pang_lee, bbc_news) or a `datasets` name; its "
                               "--split is measured.", ("dataset_name",))
    split: str = _arg("test", "The split of --dataset to measure.")
    text_column: str = _arg("text", "Column with the text.")
    text_pair_column: str | None = _arg(None, "Optional second text column (sentence pairs).")
    label_column: str = _arg("label", "Column with the class label.")
    stock: str | None = _arg(None, "The stock fine-tuned model to compare with. Default: the recipe's stage-1 model "
                             "(training_summary.json), else the pyramid's backbone weights.", ("stock_model",))
    slender: str | None = _arg(None, "Also measure this slender model folder (slenderize's output).")
    batch_sizes: list[int] = _arg(help="Batch sizes: 1 measures latency per sample (median, p90), larger ones "
                                  "throughput over the whole set.", default_factory=lambda: [1, 32])
    max_length: int = _arg(DEFAULT_MAX_LENGTH, "Tokens per input after truncation.", ("max_seq_length",))
    max_samples: int | None = _arg(None, "Measure a seeded subsample of this many rows (quick checks).",
                                   ("max_eval_samples",))
    latency_samples: int = _arg(100, "Samples timed one at a time for the batch-1 latency.")
    rounds: int = _arg(3, "Interleaved timing rounds (each times every line in turn); medians over rounds.")
    lines: list[str] = _arg(help="The lines to measure (stock is always measured). Default: all; a slender line "
                            "needs --slender.", default_factory=lambda: _bench_lines())
    threads: int | None = _arg(None, "torch and ONNX Runtime intra-op threads. Default: torch's default.")
    compile_backend: str = _arg("inductor", "torch.compile backend of the compiled lines (inductor needs a C++ compiler; "
                                "'eager' only checks that the code compiles, it is not faster).")
    output_dir: str | None = _arg(None, "Where bench.json, bench.md and bench.png go. Default: MODEL/bench.")

    def __post_init__(self):
        if not self.dataset and not self.test_file:
            raise ValueError("no test data: pass --test_file FILE or --dataset NAME.")
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes={self.batch_sizes!r} is invalid: give integers >= 1, e.g. 1 32.")
        check_count("max_length", self.max_length)
        check_count("max_samples", self.max_samples, optional=True)
        check_count("latency_samples", self.latency_samples)
        check_count("rounds", self.rounds)
        check_count("threads", self.threads, optional=True)
        for line in self.lines:
            check_choice("lines", line, _bench_lines())


@dataclass(kw_only=True)
class SlenderizeArguments:
    """What `slenderize` starts from, its target widths, and how it distils (COST-EFF)."""

    _argument_group_name = "slenderize"

    teacher: str = _arg(help="The fine-tuned classifier to slenderize (a folder or Hub id; stock or Magic Pyramid). It "
                        "is also the distillation teacher.", aliases=("model_name_or_path",))
    output_dir: str = _arg(help="Folder for the steps (stepK/) and, at its root, the slender model, its tokenizer and "
                           "slenderize_summary.json.")
    heads: list[int] = _arg(help="Target attention heads: one number for every layer, or one per layer (albert: equal "
                            "within a shared group).", default_factory=list)
    ffn: list[int] = _arg(help="Target FFN neurons: one number for every layer, or one per layer.", default_factory=list)
    steps: int = _arg(2, "Pruning steps toward the targets (widths shrink linearly); the model is distilled after each.")
    embedding_rank: int | None = _arg(None, "Factorise the word embeddings by truncated SVD to this rank (a vocab x rank "
                                      "table and a rank x hidden projection), shrinking with the steps. Default: keep them.")
    assistant: str | None = _arg(None, "Optional teacher assistant: a full-width multi-exit Magic Pyramid folder (e.g. "
                                 "train's output). The student starts from it and its exits teach the student's.")
    importance: Literal["taylor", "taylor_final", "magnitude"] = _arg(
        "taylor", "How heads and neurons are ranked: taylor (first-order Taylor, every exit's distillation loss), "
        "taylor_final (the final exit's only) or magnitude (weight L1).")
    importance_batches: int = _arg(8, "Training batches whose gradients the Taylor scores accumulate, per step.")
    epochs_per_step: float = _arg(1.0, "Distillation epochs after each pruning step (a fresh optimizer and schedule).")
    learning_rate: float = _arg(5e-5, "Learning rate of the distillation.")
    batch_size: int = _arg(32, "Training batch size per device.", ("per_device_train_batch_size",))
    eval_batch_size: int = _arg(64, "Evaluation batch size.", ("per_device_eval_batch_size",))
    max_length: int = _arg(DEFAULT_MAX_LENGTH, "Tokens per input after truncation.", ("max_seq_length",))
    temperature: float = _arg(1.0, "Softmax temperature of the soft cross-entropy terms.")
    final_weight: float = _arg(1.0, "Weight of the final exit's soft cross-entropy against the teacher.")
    exit_weight: float = _arg(1.0, "Weight of the exit-to-exit soft cross-entropy (mean over intermediate exits).")
    hidden_weight: float = _arg(1.0, "Weight of the hidden-state MSE on real tokens (mean over layers).")
    hard_weight: float = _arg(0.0, "Weight of the cross-entropy with the labels (mean over exits); 0 = none.")
    exit_pooling: Literal[EXIT_POOLINGS] | None = _arg(
        None, "What a new exit reads (without --assistant): cls or mean. Default: mean for sentence-embedding "
        "checkpoints, else the config's cls.")
    max_train_samples: int | None = _arg(None, "Train on a seeded subsample of this many rows.")
    max_eval_samples: int | None = _arg(None, "Evaluate on a seeded subsample of this many rows.")
    seed: int = _arg(42, "Seed of the data order and the subsampling.")
    logging_steps: int = _arg(50, "Trainer logging interval.")
    save_steps: int = _arg(500, "Trainer checkpoint interval inside a step (a rerun resumes from the last one).")
    disable_tqdm: bool | None = _arg(None, "Hide the Trainer's progress bars (default: the Trainer's choice).")

    def __post_init__(self):
        if not self.heads and not self.ffn:
            raise ValueError("no target widths: pass --heads H (and/or --ffn N), one number or one per layer.")
        for name in ("steps", "importance_batches", "batch_size", "eval_batch_size", "max_length", "logging_steps",
                     "save_steps"):
            check_count(name, getattr(self, name))
        check_count("seed", self.seed, minimum=0)
        check_count("max_train_samples", self.max_train_samples, optional=True)
        check_count("max_eval_samples", self.max_eval_samples, optional=True)
        check_count("embedding_rank", self.embedding_rank, optional=True)
        for name in ("epochs_per_step", "learning_rate", "temperature"):
            check_positive(name, getattr(self, name))
        for name in ("final_weight", "exit_weight", "hidden_weight", "hard_weight"):
            check_between(name, getattr(self, name), 0.0, math.inf)
        check_choice("importance", self.importance, ("taylor", "taylor_final", "magnitude"))
        check_choice("exit_pooling", self.exit_pooling, EXIT_POOLINGS, optional=True)
        for name in ("heads", "ffn"):
            for width in getattr(self, name):
                check_count(name, width)


__all__ = [
    "BenchArguments",
    "RecipeSettings",
    "DataArguments",
    "EvalDataArguments",
    "TrainRunArguments",
    "SweepArguments",
    "PushArguments",
    "PredictArguments",
    "DEFAULT_MAX_LENGTH",
    "parse_pyramid_options",
    "SlenderizeArguments",
]
