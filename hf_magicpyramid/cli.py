"""`hf-magicpyramid` command line: `train`, `sweep` (calibrate the speed) and `push` (upload to the Hub).

    hf-magicpyramid train --model_name_or_path all-MiniLM-L6-v2 --dataset rotten_tomatoes --output_dir out/rt
    hf-magicpyramid train --model_name_or_path PATH_OR_ID --train_file train.csv --validation_file dev.csv --output_dir out/x
    hf-magicpyramid sweep --model_name_or_path out/rt --dataset rotten_tomatoes --max_drop 0.5
    hf-magicpyramid push --model_name_or_path out/rt --repo_id alice/rt-pyramid

Every flag is a dataclass field of `arguments.py` (one declaration: default, help text, aliases), parsed with
`transformers.HfArgumentParser`, so each has both spellings (`--output_dir`, `--output-dir`) and the names `run_glue.py`
users type. With `--preset`, the preset fills the settings first and every flag given on the command line wins, even
one equal to its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from transformers import HfArgumentParser

from .arguments import (
    BenchArguments,
    DataArguments,
    EvalDataArguments,
    PushArguments,
    RecipeSettings,
    SlenderizeArguments,
    SweepArguments,
    TrainRunArguments,
    parse_pyramid_options,
)
from .arguments import PredictArguments

PROG = "hf-magicpyramid"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default (unless its help already says what the default is, or the flag is required) and keeps
    the examples' lines."""

    def _get_help_string(self, action):
        if action.required:
            return f"{action.help} (required)"
        if "Default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


TRAIN_EPILOG = f"""examples:
  # your own CSV (columns text,label), from the embedded all-MiniLM-L6-v2
  {PROG} train --train_file train.csv --validation_file dev.csv --output_dir out/mine

  # your own fine-tuned classifier: stage 1 is skipped, its head is kept
  {PROG} train --model_name_or_path ./my-finetuned-bert --train_file train.csv --validation_file dev.csv \\
      --output_dir out/mine --per_device_train_batch_size 16 --max_seq_length 256

  # a preset's settings; the flags you give win over it
  {PROG} train --preset bert-base-uncased --dataset rotten_tomatoes --output_dir out/rt --num_train_epochs 2

Each stage runs in a subfolder of --output_dir; rerun the same command after an interruption to resume.
The last stage calibrates the speed on the validation data (--max_drop 0.5) and saves the chosen setting as the default;
to recalibrate later: {PROG} sweep --model_name_or_path out/mine --validation_file dev.csv --max_drop 1"""

SWEEP_EPILOG = f"""examples:
  {PROG} sweep --model_name_or_path out/mine --validation_file dev.csv --max_drop 0.5
  {PROG} sweep --model_name_or_path out/rt --dataset rotten_tomatoes --max_eval_samples 500 --strict --max_drop 1"""

PUSH_EPILOG = f"""examples:
  {PROG} push --model_name_or_path out/mine --repo_id alice/my-pyramid
  {PROG} push --model_name_or_path out/mine --repo_id alice/my-pyramid --private --revision v2 --create_pr"""

BENCH_EPILOG = f"""examples:
  {PROG} bench --model out/rt --dataset rotten_tomatoes
  {PROG} bench --model out/mine --test_file test.csv --stock out/mine/stage1_finetune/model --batch_sizes 1 32 \\
      --max_length 256 --output_dir bench/mine
  {PROG} bench --model out/rt --dataset rotten_tomatoes --max_samples 200 --rounds 1 --lines stock pyramid pyramid_int8"""

# command → (dataclasses of its flags, help, description, epilog)
PREDICT_EPILOG = f"""examples:
  {PROG} predict --model out/mine --input reviews.csv --output reviews.scored.csv
  {PROG} predict --model out/mine --input big.jsonl --output big.out.jsonl --on_bad_row skip --exit_threshold 0.3
  # 2 processes (each with half the cores): rank r classifies chunks r, r+2, ...; rank 0 merges
  OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m hf_magicpyramid.cli predict --model out/mine --input big.csv --output out.csv

Rerun the same command after an interruption to resume from the last finished chunk (kept in OUTPUT.parts/)."""

COMMANDS = {
    "train": (
        (TrainRunArguments, DataArguments, RecipeSettings),
        "Train a Magic Pyramid classifier: fine-tune, learn the pruning, fine-tune pruned, train the exits.",
        "Trains in resumable stages, each in a subfolder of --output_dir, keeping token pruning only where it pays "
        "(--pruning), and ends by calibrating the speed on the validation data: the final model and tokenizer are saved "
        "at its root with the fastest setting within --max_drop points of the stage-1 fine-tune as the default "
        "(--calibrate false: the exact model, no early exit and no pruning).",
        TRAIN_EPILOG,
    ),
    "sweep": (
        (SweepArguments, EvalDataArguments),
        "Calibrate the speed knobs on validation data: accuracy, exit layer, kept tokens, FLOPs and measured speedup.",
        "Writes calibration.json and calibration.png into the model folder (or --report_dir). With --max_drop, stores "
        "the fastest setting within that accuracy drop as the model's default speed (config.json only; weights "
        "untouched).",
        SWEEP_EPILOG,
    ),
    "push": (
        (PushArguments,),
        "Upload a saved Magic Pyramid model folder to the Hugging Face Hub.",
        "Uploads the model (config, safetensors weights, custom code), its tokenizer, calibration and a model card. "
        "The folder is never modified; a model card is generated when it has no README.md.",
        PUSH_EPILOG,
    ),
    "bench": (
        (BenchArguments,),
        "Measure the model against what CPU users pick instead (int8, torch.compile, ONNX Runtime), in one run.",
        "Stock fp32 / int8 / compiled / ONNX Runtime fp32 and int8, and Magic Pyramid alone / int8 / compiled / on the "
        "ONNX Runtime layer loop (and --slender), on the same inputs in interleaved rounds: accuracy with its paired 95% "
        "interval vs stock, batch-1 latency, throughput, FLOPs, parameters, size, speedups. Writes bench.json, bench.md "
        "and bench.png. Lines whose optional dependency is missing are reported as skipped.",
        BENCH_EPILOG,
    ),
    "slenderize": (
        (SlenderizeArguments, DataArguments),
        "Slenderize a fine-tuned classifier (COST-EFF): fewer heads and FFN neurons in every layer, by distillation.",
        "Prunes attention heads and FFN neurons by importance toward --heads / --ffn in --steps steps, distilling from "
        "the teacher after each; every layer keeps its exit. Each step is saved in a subfolder of --output_dir (a rerun "
        "resumes after the last complete one); the slender Magic Pyramid model, its tokenizer and "
        "slenderize_summary.json go to its root.",
        f"""examples:
  {PROG} slenderize --teacher out/rt/stage1_finetune/model --dataset rotten_tomatoes --heads 4 --ffn 512 \\
      --steps 2 --output_dir out/rt-slender
  {PROG} slenderize --teacher ./my-finetuned-bert --train_file train.csv --validation_file dev.csv --heads 6 \\
      --ffn 1536 --assistant out/mine --output_dir out/mine-slender
Then calibrate it: {PROG} sweep --model_name_or_path out/rt-slender --dataset rotten_tomatoes --stock_model TEACHER""",
    ),
    "predict": (
        (PredictArguments,),
        "Classify a CSV, TSV, JSON lines or Parquet file of any size: streamed, length-bucketed, resumable, torchrun-ready.",
        "Writes the input's rows in order with `label`, `score` and `exit_layer` (and `id` when the input has none) added. "
        "Reads and commits --chunk_size rows at a time, so memory does not grow with the file.",
        PREDICT_EPILOG,
    ),
}

_NOT_GIVEN = object()  # marks a flag that was not on the command line


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, HfArgumentParser]]:
    """The top-level parser and one `HfArgumentParser` per command (name → parser)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Magic Pyramid: early exits + token pruning for BERT-family encoders. "
        f"Run `{PROG} COMMAND --help` for a command's flags.",
        epilog=f"example: {PROG} train --train_file train.csv --validation_file dev.csv --output_dir out/mine",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=HfArgumentParser)
    commands = {}
    for name, (types, help_text, description, epilog) in COMMANDS.items():
        commands[name] = subparsers.add_parser(
            name, dataclass_types=types, help=help_text, description=description, epilog=epilog,
            formatter_class=HelpFormatter, allow_abbrev=False, usage="%(prog)s [--FLAG VALUE ...] (--help lists them)",
        )
    return parser, commands


def build_parser() -> argparse.ArgumentParser:
    return build_parsers()[0]


def given_flags(parser: argparse.ArgumentParser, types, argv: list[str]) -> dict:
    """The values of the flags actually on the command line, by field name (a flag equal to its default included)."""
    names = [f.name for dtype in types for f in dataclasses.fields(dtype) if f.init]
    # argparse fills in a default only where the namespace has no value yet: a prefilled marker survives exactly for
    # the flags that were not given.
    namespace = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, _NOT_GIVEN)))
    return {name: value for name, value in vars(namespace).items() if value is not _NOT_GIVEN and name in names}


def resolve_train_values(given: dict) -> dict:
    """`train`'s settings by field name: the preset's (when --preset is given), then every flag given on top."""
    if not given.get("preset"):
        return dict(given)
    from .presets import preset_arguments

    values = preset_arguments(given["preset"])
    options = values.pop("pyramid_options")
    values.update(given)
    # Config fields merge: the preset's, then those given in --pyramid_options.
    values["pyramid_options"] = {**options, **parse_pyramid_options(given.get("pyramid_options"))}
    return values


def parse_arguments(command: str, argv: list[str], parser: HfArgumentParser | None = None) -> tuple:
    """Parse one command's flags into its dataclasses (see `COMMANDS`). Exits with status 2 and a one-line error for
    a flag or value that is not allowed."""
    parser = parser or build_parsers()[1][command]
    types = COMMANDS[command][0]
    given = given_flags(parser, types, argv)
    try:
        values = resolve_train_values(given) if command == "train" else given
        return tuple(dtype(**{f.name: values[f.name] for f in dataclasses.fields(dtype) if f.name in values})
                     for dtype in types)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))


def _load_splits(data: EvalDataArguments, need_train: bool):
    from .training import load_named_dataset, load_text_files

    train = validation = None
    train_file = getattr(data, "train_file", None)
    if train_file or data.validation_file:
        files = load_text_files(train_file, data.validation_file)
        train, validation = files.get("train"), files.get("validation")
    if data.dataset and (train is None or validation is None):
        named = load_named_dataset(data.dataset)
        train = train if train is not None else named.get("train")
        validation = validation if validation is not None else named.get("validation")
    if need_train and train is None:
        raise ValueError("no training data: pass --train_file FILE or --dataset NAME.")
    if validation is None:
        raise ValueError(f"no validation data: dataset {data.dataset!r} has no validation split; pass --validation_file FILE.")
    return train, validation


def run_train(run: TrainRunArguments, data: DataArguments, settings: RecipeSettings) -> int:
    from .training import train_magic_pyramid

    train, validation = _load_splits(data, need_train=True)
    extra = {}
    if run.overwrite_output_dir:
        # Passed only when given until train_magic_pyramid takes the keyword everywhere this CLI runs.
        extra["overwrite_output_dir"] = True
    summary = train_magic_pyramid(
        run.model_name_or_path,
        train,
        validation,
        run.output_dir,
        text_column=data.text_column,
        text_pair_column=data.text_pair_column,
        label_column=data.label_column,
        max_train_samples=run.max_train_samples,
        max_eval_samples=run.max_eval_samples,
        **{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)},
        **extra,
    )
    print(json.dumps({k: summary.get(k) for k in ("final_model", "eval_accuracy", "stock_model", "default_speed")}, indent=2))
    return 0


def run_sweep(sweep: SweepArguments, data: EvalDataArguments) -> int:
    from .calibration import calibrate_folder

    _, validation = _load_splits(data, need_train=False)
    result = calibrate_folder(
        sweep.model_name_or_path,
        validation,
        stock_model=sweep.stock_model,
        text_column=data.text_column,
        text_pair_column=data.text_pair_column,
        label_column=data.label_column,
        max_length=sweep.max_length,
        max_samples=sweep.max_samples,
        batch_size=sweep.batch_size,
        batch1_samples=sweep.batch1_samples,
        max_drop=sweep.max_drop,
        report_dir=sweep.report_dir,
        quantize=sweep.quantize,
        dataset_name=f"{data.dataset or data.validation_file} (validation)",
        folds=sweep.calibration_folds,
    )
    print(result["table"])
    if result.get("chosen"):
        print(f"Chosen default speed: {json.dumps(result['chosen']['setting'])}")
    if sweep.strict and result.get("budget_met") is False:
        print(f"error: no setting is within --max_drop {sweep.max_drop} points of the reference accuracy (--strict).",
              file=sys.stderr)
        return 1
    return 0


def run_push(push: PushArguments) -> int:
    """Upload with `hub.push_to_hub`; print the commit URL. Returns the exit code (0 ok, 1 error)."""
    from . import hub

    options = dict(token=push.token, revision=push.revision, commit_message=push.commit_message, create_pr=push.create_pr)
    # Only what was asked for: the hub module's own defaults hold otherwise (an existing repo keeps its visibility).
    if push.private:
        options["private"] = True
    if push.license is not None:
        options["license"] = push.license
    if push.include:
        options["include"] = tuple(push.include)
    if push.allow_missing_tokenizer:
        options["require_tokenizer"] = False
    try:
        commit = hub.push_to_hub(push.model_name_or_path, push.repo_id, **options)
    except (ValueError, OSError, getattr(hub, "HubPushError", OSError)) as error:
        print(f"{PROG} push: error: {error}", file=sys.stderr)
        return 1
    url = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or str(commit)
    oid = getattr(commit, "oid", None)
    print(f"Pushed {push.model_name_or_path} to {url}" + (f" (commit {oid})" if oid else ""))
    return 0


def run_bench(args: BenchArguments) -> int:
    from .bench import run_bench as bench

    if args.test_file:
        from .data import load_text_files

        dataset, name = load_text_files(test_file=args.test_file)["test"], args.test_file
    else:
        from .data import load_named_dataset

        splits = load_named_dataset(args.dataset)
        if args.split not in splits:
            raise ValueError(f"dataset {args.dataset!r} has no split {args.split!r}; its splits are {list(splits)}.")
        dataset, name = splits[args.split], f"{args.dataset} ({args.split})"
    report = bench(
        args.model_name_or_path, dataset, stock=args.stock, slender=args.slender, text_column=args.text_column,
        text_pair_column=args.text_pair_column, label_column=args.label_column, batch_sizes=args.batch_sizes,
        max_length=args.max_length, max_samples=args.max_samples, latency_samples=args.latency_samples,
        rounds=args.rounds, lines=tuple(args.lines), output_dir=args.output_dir, dataset_name=name, threads=args.threads,
        compile_backend=args.compile_backend,
    )
    print(f"Wrote bench.json, bench.md and bench.png to {report['output_dir']}")
    return 0


def run_predict(arguments: PredictArguments) -> int:
    """Classify a file with `predict.predict_file`; print its summary (rank 0). Returns the exit code."""
    import dataclasses as _dataclasses
    import logging

    from .predict import predict_file

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = {f.name: getattr(arguments, f.name) for f in _dataclasses.fields(arguments)}
    model, input_file, output_file = options.pop("model_name_or_path"), options.pop("input"), options.pop("output")
    try:
        summary = predict_file(model, input_file, output_file, **options)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if summary["rank"] == 0:
        print(json.dumps(summary, indent=2))
    return 0




def run_slenderize(run: SlenderizeArguments, data: DataArguments) -> int:
    from .slenderize import DistillationWeights, slenderize

    train, validation = _load_splits(data, need_train=True)
    config_full = None
    if not run.heads or not run.ffn:  # only one target given: the other stays at the teacher's full width
        from transformers import AutoConfig

        from .configuration_magic_pyramid import MagicPyramidConfig
        from .training import resolve_backbone

        config = AutoConfig.from_pretrained(resolve_backbone(run.teacher))
        if not isinstance(config, MagicPyramidConfig):
            config = MagicPyramidConfig(backbone_config=config)
        config_full = (config.full_heads, config.full_ffn)
    summary = slenderize(
        run.teacher,
        train,
        validation,
        run.output_dir,
        heads=run.heads or config_full[0],
        ffn=run.ffn or config_full[1],
        steps=run.steps,
        embedding_rank=run.embedding_rank,
        assistant=run.assistant,
        importance=run.importance,
        importance_batches=run.importance_batches,
        epochs_per_step=run.epochs_per_step,
        learning_rate=run.learning_rate,
        batch_size=run.batch_size,
        eval_batch_size=run.eval_batch_size,
        max_length=run.max_length,
        weights=DistillationWeights(final=run.final_weight, exits=run.exit_weight, hidden=run.hidden_weight,
                                    hard=run.hard_weight, temperature=run.temperature),
        exit_pooling=run.exit_pooling,
        text_column=data.text_column,
        text_pair_column=data.text_pair_column,
        label_column=data.label_column,
        max_train_samples=run.max_train_samples,
        max_eval_samples=run.max_eval_samples,
        seed=run.seed,
        logging_steps=run.logging_steps,
        save_steps=run.save_steps,
        disable_tqdm=run.disable_tqdm,
    )
    print(json.dumps({k: summary.get(k) for k in ("final_model", "heads_per_layer", "ffn_per_layer", "embedding_rank", "parameters",
                                                  "teacher_parameters", "eval_accuracy", "teacher_eval_accuracy")}, indent=2))
    return 0


RUNS = {
    "train": run_train, "sweep": run_sweep, "push": run_push, "bench": run_bench, "predict": run_predict,
    "slenderize": run_slenderize,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parsers()
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # the overview (--help), or the error naming the commands; exits
        return 2
    arguments = parse_arguments(argv[0], argv[1:], commands[argv[0]])
    try:
        return int(RUNS[argv[0]](*arguments) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
