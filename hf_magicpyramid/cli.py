"""`hf-magicpyramid` command line: `train`, `sweep` (calibrate the speed), and `push` (when `hub.py` is installed).

    hf-magicpyramid train --backbone all-MiniLM-L6-v2 --dataset rotten_tomatoes --output-dir out/rt
    hf-magicpyramid train --backbone PATH_OR_ID --train-file train.csv --validation-file dev.csv --output-dir out/x
    hf-magicpyramid sweep --model out/rt --dataset rotten_tomatoes --max-drop 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _add_data_arguments(parser: argparse.ArgumentParser, train: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        help="An offline dataset (rotten_tomatoes, pang_lee, bbc_news) or a `datasets` name; its train/validation splits "
        "are used unless files are given.",
    )
    if train:
        group.add_argument("--train-file", help="Training data: CSV, TSV, JSON (lines) or Parquet.")
    group.add_argument("--validation-file", help="Validation data, same format.")
    group.add_argument("--text-column", default="text", help="Column with the text (default: text).")
    group.add_argument("--text-pair-column", default=None, help="Optional second text column (sentence pairs).")
    group.add_argument("--label-column", default="label", help="Column with the class label (default: label).")
    group.add_argument("--max-length", type=int, default=128, help="Tokens per input after truncation (default: 128).")


def _load_splits(args, need_train: bool):
    from .training import load_named_dataset, load_text_files

    train = validation = None
    if getattr(args, "train_file", None) or args.validation_file:
        files = load_text_files(getattr(args, "train_file", None), args.validation_file)
        train, validation = files.get("train"), files.get("validation")
    if args.dataset and (train is None or validation is None):
        named = load_named_dataset(args.dataset)
        train = train if train is not None else named.get("train")
        validation = validation if validation is not None else named.get("validation")
    if need_train and train is None:
        raise SystemExit("error: no training data: pass --train-file FILE or --dataset NAME.")
    if validation is None:
        raise SystemExit("error: no validation data: pass --validation-file FILE or --dataset NAME (with a validation split).")
    return train, validation


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="Train a Magic Pyramid classifier (fine-tune, learn pruning, fine-tune pruned, train exits).",
        description="Each stage runs in a subfolder of --output-dir and is resumable: re-run the same command after an "
        "interruption. The final model and tokenizer are saved at the root of --output-dir.",
    )
    parser.add_argument("--backbone", default="all-MiniLM-L6-v2", help="Path or Hub id of the encoder (default: the embedded all-MiniLM-L6-v2).")
    parser.add_argument("--output-dir", required=True, help="Folder for the stages and the final model.")
    parser.add_argument(
        "--preset",
        default=None,
        help="A preset of hub_configs/ (name such as 'bert-base-uncased', or a JSON path): its config fields and training "
        "hyperparameters become the defaults; flags given explicitly still win, and --backbone defaults to its checkpoint.",
    )
    _add_data_arguments(parser, train=True)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=float, default=3.0, help="Stage 1 (backbone + head) epochs (default: 3).")
    group.add_argument("--pruning-epochs", type=float, default=1.0, help="Stage 2 (LTP soft phase) epochs (default: 1).")
    group.add_argument("--pruned-finetune-epochs", type=float, default=1.0, help="Stage 3 epochs (default: 1).")
    group.add_argument("--exit-epochs", type=float, default=2.0, help="Stage 4 (exits) epochs (default: 2).")
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--gradient-accumulation-steps", type=int, default=1)
    group.add_argument("--learning-rate", type=float, default=5e-5)
    group.add_argument("--exit-learning-rate", type=float, default=5e-4)
    group.add_argument("--threshold-learning-rate", type=float, default=2e-3)
    group.add_argument("--max-train-samples", type=int, default=None, help="Subsample the training data (seeded).")
    group.add_argument("--max-eval-samples", type=int, default=None, help="Subsample the validation data (seeded).")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--save-steps", type=int, default=500, help="Trainer checkpoint interval inside a stage (for resuming).")
    group.add_argument("--logging-steps", type=int, default=50)
    group = parser.add_argument_group("model")
    group.add_argument("--token-pruning", choices=("topk", "threshold", "none"), default="topk",
                       help="topk: a fixed pyramid schedule (default); threshold: LTP's learned thresholds (stage 2).")
    group.add_argument("--keep-ratios", type=_float_list, default=None, help="topk: comma-separated kept share per layer.")
    group.add_argument("--pruning-penalty", type=float, default=None, help="LTP λ (default: the config's 0.1).")
    group.add_argument("--exit-objective", choices=("self_distillation", "two_stage", "joint"), default="self_distillation")
    group.add_argument("--exit-pooling", choices=("cls", "mean"), default=None, help="Default: mean for sentence-embedding models, else cls.")
    group.add_argument("--exit-criterion", choices=("entropy", "confidence", "patience"), default="entropy")
    group.add_argument("--distillation-alpha", type=float, default=0.5, help="Weight of the stage-1 teacher in stages 2-3 (0 disables).")
    parser.set_defaults(func=run_train)
    parser.set_defaults(parser_defaults={action.dest: action.default for action in parser._actions})


# Preset keys → recipe settings. A preset's other config fields (exit_layers, token_importance, ...) pass through as
# `pyramid_options`.
_PRESET_SETTINGS = ("token_pruning", "keep_ratios", "exit_objective", "exit_pooling", "exit_criterion")
_PRESET_TRAINING = {
    "learning_rate": "learning_rate",
    "exit_learning_rate": "exit_learning_rate",
    "batch_size": "batch_size",
    "max_length": "max_length",
    "pruning_penalty": "pruning_penalty",
}
_PRESET_EPOCHS = {"finetune": "epochs", "pruning": "pruned_finetune_epochs", "exits": "exit_epochs"}


def apply_preset(args, defaults: dict) -> dict:
    """Fill `args` from a preset where the user left a flag at its default; return the extra config fields."""
    from .presets import load_preset, pyramid_options

    preset = load_preset(args.preset)
    fields = pyramid_options(args.preset)
    training = preset.get("training", {})
    wanted = {name: fields.pop(name) for name in _PRESET_SETTINGS if name in fields}
    wanted.update({dest: training[key] for key, dest in _PRESET_TRAINING.items() if key in training})
    wanted.update({dest: training["epochs"][key] for key, dest in _PRESET_EPOCHS.items() if key in training.get("epochs", {})})
    wanted["backbone"] = preset["backbone"]["checkpoint"]
    for dest, value in wanted.items():
        if getattr(args, dest) == defaults.get(dest):
            setattr(args, dest, value)
    fields.pop("pruning_penalty", None)  # a recipe setting above
    return fields


def run_train(args) -> int:
    from .training import RecipeSettings, train_magic_pyramid

    extra_fields = apply_preset(args, args.parser_defaults) if args.preset else {}
    train, validation = _load_splits(args, need_train=True)
    # Every flag named like a recipe setting goes to the recipe as that setting.
    settings = {field.name: getattr(args, field.name) for field in dataclasses.fields(RecipeSettings) if hasattr(args, field.name)}
    summary = train_magic_pyramid(
        args.backbone,
        train,
        validation,
        args.output_dir,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        pyramid_options=extra_fields,
        **settings,
    )
    print(json.dumps({k: summary.get(k) for k in ("final_model", "eval_accuracy", "stock_model")}, indent=2))
    return 0


def add_sweep_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="Calibrate the speed knobs on validation data: accuracy, exit layer, kept tokens, FLOPs and measured speedup.",
        description="Writes calibration.json and calibration.png into --model (or --report-dir). With --max-drop, stores "
        "the fastest setting within that accuracy drop as the model's default speed (config.json only; weights untouched).",
    )
    parser.add_argument("--model", required=True, help="A trained Magic Pyramid folder.")
    parser.add_argument("--stock-model", default=None, help="The stock fine-tuned model to compare with (default: the "
                        "one recorded by `train`, else the pyramid's own backbone weights run as a stock model).")
    _add_data_arguments(parser, train=False)
    parser.add_argument("--max-drop", type=float, default=None, help="Accuracy points the chosen default may lose (e.g. 0.5). "
                        "When no setting is that close, the most accurate setting measured is stored and a warning printed.")
    parser.add_argument("--strict", action="store_true", help="With --max-drop: exit with status 1 when no setting meets it "
                        "(the most accurate setting is still stored).")
    parser.add_argument("--max-samples", type=int, default=None, help="Subsample the validation data (seeded).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch1-samples", type=int, default=100, help="Samples timed at batch 1 (0 skips).")
    parser.add_argument("--report-dir", default=None, help="Where calibration.json/png go (default: --model).")
    parser.set_defaults(func=run_sweep)


def run_sweep(args) -> int:
    from .calibration import calibrate_folder

    _, validation = _load_splits(args, need_train=False)
    result = calibrate_folder(
        args.model,
        validation,
        stock_model=args.stock_model,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        max_length=args.max_length,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        batch1_samples=args.batch1_samples,
        max_drop=args.max_drop,
        report_dir=args.report_dir,
        dataset_name=f"{args.dataset or args.validation_file} (validation)",
    )
    print(result["table"])
    if result.get("chosen"):
        print(f"Chosen default speed: {json.dumps(result['chosen']['setting'])}")
    if args.strict and result.get("budget_met") is False:
        print(f"error: no setting is within --max-drop {args.max_drop} points of the reference accuracy (--strict).", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-magicpyramid", description="Magic Pyramid: early exits + token pruning for BERT-family encoders.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_sweep_parser(subparsers)
    try:  # the Hub helpers are optional: the CLI works without them
        from . import hub
    except ImportError:
        hub = None
    if hub is not None and hasattr(hub, "add_push_parser"):
        hub.add_push_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None and args.command == "push":
        from .hub import run_push

        func = run_push
    try:
        return int(func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
