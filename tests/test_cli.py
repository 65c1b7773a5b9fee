"""The command line: flags from the dataclasses of `arguments.py`, run_glue-style aliases, help, preset precedence,
validation before any work, and `push` through the command line against a local Hub."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer

import hf_magicpyramid  # noqa: F401
from hf_magicpyramid import MagicPyramidForSequenceClassification
from hf_magicpyramid.arguments import DataArguments, RecipeSettings, TrainRunArguments
from hf_magicpyramid.cli import COMMANDS, main, parse_arguments

from tiny import make_tiny_backbone, tiny_stock

DATA = ["--dataset", "rotten_tomatoes"]  # parsing only: no dataset is loaded before a command runs


def train_args(*flags) -> tuple[TrainRunArguments, DataArguments, RecipeSettings]:
    return parse_arguments("train", ["--output_dir", "unused", *DATA, *flags])


def spellings(option: str) -> set[str]:
    return {option, option.replace("_", "-")}


def help_text(command: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping: each help text stays whole
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


# ---------------------------------------------------------------------------------------------------------------------
# Help: every field, its aliases, its default, examples
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_field_with_aliases_and_default(command, capsys, monkeypatch):
    text = help_text(command, capsys, monkeypatch)
    for dtype in COMMANDS[command][0]:
        for field in dataclasses.fields(dtype):
            for flag in spellings(f"--{field.name}") | set(field.metadata.get("aliases", ())):
                assert f"{flag} " in text or f"{flag}," in text, (command, flag)
            help_line = " ".join(field.metadata["help"].replace("%%", "%").split())
            assert help_line in text, (command, field.name)
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                assert f"{help_line} (required)" in text, (command, field.name)
            elif "Default:" not in help_line:
                default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
                assert f"{help_line} (default: {default})" in text, (command, field.name)
    assert f"hf-magicpyramid {command} --" in text.split("examples:", 1)[1]  # the epilog's examples


def test_overview_help_names_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "sweep", "push")) and "example:" in out


def test_teacher_and_exit_temperatures_are_told_apart(capsys, monkeypatch):
    assert "distillation_temperature" not in RecipeSettings.__dataclass_fields__
    text = help_text("train", capsys, monkeypatch)
    assert "--teacher_temperature" in text and "--distillation_temperature" not in text
    assert "Not the config's distillation_temperature, which is the exits' self-distillation temperature" in text


# ---------------------------------------------------------------------------------------------------------------------
# Aliases: the names run_glue.py users type, with or without dashes, and the old names
# ---------------------------------------------------------------------------------------------------------------------


def test_run_glue_names_with_or_without_dashes_and_the_old_names():
    expected = train_args("--backbone", "m", "--batch-size", "16", "--epochs", "2", "--max-length", "256")
    assert expected[0].model_name_or_path == "m" and expected[2].batch_size == 16
    assert expected[2].epochs == 2.0 and expected[2].max_length == 256
    for flags in (
        ("--model_name_or_path", "m", "--per_device_train_batch_size", "16", "--num_train_epochs", "2", "--max_seq_length", "256"),
        ("--model-name-or-path", "m", "--per-device-train-batch-size", "16", "--num-train-epochs", "2", "--max-seq-length", "256"),
        ("--model_name_or_path=m", "--batch_size=16", "--epochs=2", "--max_length=256"),
    ):
        assert train_args(*flags) == expected, flags
    for spelling in ("--output_dir", "--output-dir"):
        run, _, _ = parse_arguments("train", [spelling, "out/x", *DATA])
        assert run.output_dir == "out/x"


@pytest.mark.parametrize("command", ["train", "sweep", "push"])
def test_one_model_flag_across_commands(command):
    required = {"train": ["--output_dir", "o", *DATA], "sweep": DATA, "push": ["--repo_id", "alice/x"]}[command]
    old = {"train": "--backbone", "sweep": "--model", "push": "--model"}[command]
    for flag in ("--model_name_or_path", "--model-name-or-path", old):
        parsed = parse_arguments(command, [flag, "some/model", *required])
        assert parsed[0].model_name_or_path == "some/model", flag


def test_sweep_and_push_aliases():
    sweep, data = parse_arguments("sweep", ["--model", "out", "--validation-file", "dev.csv", "--max-drop", "0.5",
                                            "--per_device_eval_batch_size", "8", "--max_eval_samples", "40", "--strict"])
    assert (sweep.max_drop, sweep.batch_size, sweep.max_samples, sweep.strict) == (0.5, 8, 40, True)
    assert data.validation_file == "dev.csv" and data.text_column == "text"
    (push,) = parse_arguments("push", ["--model", "out", "--hub_model_id", "alice/x", "--hub_token", "t", "--private",
                                       "--create-pr", "--include", "notes.md", "extra/*.json"])
    assert (push.repo_id, push.token, push.private, push.create_pr) == ("alice/x", "t", True, True)
    assert push.include == ["notes.md", "extra/*.json"] and push.license is None


def test_list_and_json_settings():
    _, _, settings = train_args("--keep_ratios", "1", "0.8", "0.5", "--pyramid_options", '{"exit_layers": [2, 3]}')
    assert settings.keep_ratios == [1.0, 0.8, 0.5] and settings.pyramid_options == {"exit_layers": [2, 3]}
    assert train_args()[2] == RecipeSettings()  # nothing given: the dataclass defaults, declared once


# ---------------------------------------------------------------------------------------------------------------------
# Presets: their values first, every flag given on top (even one equal to its default)
# ---------------------------------------------------------------------------------------------------------------------


def test_flags_win_over_a_preset_even_when_equal_to_the_default():
    run, _, settings = train_args("--preset", "bert-base-uncased", "--backbone", "all-MiniLM-L6-v2",
                                  "--exit-objective", "self_distillation")
    assert run.model_name_or_path == "all-MiniLM-L6-v2"  # the default value, given explicitly
    assert settings.exit_objective == "self_distillation"  # the default value, given explicitly; the preset says joint
    assert settings.learning_rate == 2e-5 and settings.warmup_ratio == 0.1  # the rest still comes from the preset

    _, _, settings = train_args("--preset", "deberta-v3-base", "--batch_size", "32", "--max_seq_length", "128",
                                "--warmup_ratio", "0.06")
    assert (settings.batch_size, settings.max_length, settings.warmup_ratio) == (32, 128, 0.06)  # all three defaults
    run, _, settings = train_args("--preset", "deberta-v3-base")
    assert run.model_name_or_path == "microsoft/deberta-v3-base"
    assert (settings.batch_size, settings.max_length, settings.warmup_ratio) == (16, 128, 0.1)  # the preset's


def test_pyramid_options_merge_over_the_preset():
    _, _, settings = train_args("--preset", "all-MiniLM-L6-v2", "--pyramid_options",
                                '{"distillation_temperature": 4.0, "min_kept_tokens": 2}')
    assert settings.pyramid_options == {"exit_layers": [1, 2, 3, 4, 5, 6], "token_importance": "cls_attention",
                                        "distillation_temperature": 4.0, "min_kept_tokens": 2}


# ---------------------------------------------------------------------------------------------------------------------
# Validation: at parse time, one line naming the value and what is allowed, nothing written
# ---------------------------------------------------------------------------------------------------------------------

BAD_TRAIN = [
    (["--epochs", "-1"], "epochs=-1.0 is out of range: it must be a number > 0."),
    (["--num_train_epochs", "0"], "epochs=0.0 is out of range: it must be a number > 0."),
    (["--exit_epochs", "0"], "exit_epochs=0.0 is out of range: it must be a number > 0."),
    (["--max-train-samples", "0"], "max_train_samples=0 is out of range: it must be an integer >= 1 (or omitted for all of them)."),
    (["--max_eval_samples", "-5"], "max_eval_samples=-5 is out of range: it must be an integer >= 1 (or omitted for all of them)."),
    (["--learning_rate", "-0.001"], "learning_rate=-0.001 is out of range: it must be a number > 0."),
    (["--exit_learning_rate=-1e-4"], "exit_learning_rate=-0.0001 is out of range: it must be a number > 0."),
    (["--threshold_learning_rate", "0"], "threshold_learning_rate=0.0 is out of range: it must be a number > 0."),
    (["--batch-size", "0"], "batch_size=0 is out of range: it must be an integer >= 1."),
    (["--per_device_eval_batch_size", "0"], "eval_batch_size=0 is out of range: it must be an integer >= 1."),
    (["--max_seq_length", "0"], "max_length=0 is out of range: it must be an integer >= 1."),
    (["--warmup_ratio", "1.0"], "warmup_ratio=1.0 is out of range: it must be a number in [0.0, 1.0)."),
    (["--weight_decay", "-0.1"], "weight_decay=-0.1 is out of range: it must be a number in [0.0, inf]."),
    (["--distillation_alpha", "1.5"], "distillation_alpha=1.5 is out of range: it must be a number in [0.0, 1.0]."),
    (["--teacher_temperature", "0"], "teacher_temperature=0.0 is out of range: it must be a number > 0."),
    (["--pruning_penalty", "-1"], "pruning_penalty=-1.0 is out of range: it must be a number in [0.0, inf]."),
    (["--token-pruning", "topK"], "argument --token_pruning/--token-pruning: invalid choice: 'topK' (choose from 'none', 'topk', 'threshold')"),
    (["--exit-objective", "distill"], "argument --exit_objective/--exit-objective: invalid choice: 'distill' (choose from 'joint', 'two_stage', 'self_distillation')"),
    (["--exit-pooling", "max"], "argument --exit_pooling/--exit-pooling: invalid choice: 'max' (choose from 'cls', 'mean')"),
    (["--exit-criterion", "margin"], "argument --exit_criterion/--exit-criterion: invalid choice: 'margin' (choose from 'entropy', 'confidence', 'patience')"),
    (["--keep-ratios", "0.9", "0.5"], "keep_ratios[0]=0.9: layer 1 always runs on every token, so the first entry must be 1.0."),
    (["--keep-ratios", "1", "0.5", "0.7"], "keep_ratios must not increase (a removed token cannot come back), but keep_ratios[2]=0.7 > keep_ratios[1]=0.5."),
    (["--pyramid_options", '{"exit_treshold": 0.1}'], "pyramid_options['exit_treshold'] is not a MagicPyramidConfig field (did you mean 'exit_threshold'?); allowed: "),
    (["--pyramid_options", '{"exit_objective": "joint"}'], "pyramid_options['exit_objective']: exit_objective is a recipe setting of its own; set it as such (--exit_objective), not in pyramid_options."),
    (["--pyramid_options", "exit_layers=2"], "pyramid_options='exit_layers=2' is not valid JSON"),
    (["--preset", "gpt2"], "Unknown preset 'gpt2'. Available presets: "),
    (["--pruning", "sometimes"], "argument --pruning: invalid choice: 'sometimes' (choose from 'auto', 'on', 'off')"),
    (["--calibration_folds", "1"], "calibration_folds=1 is out of range: it must be 0 (off) or an integer >= 2."),
    (["--calibration_holdout", "0.5"], "calibration_holdout=0.5 is out of range: it must be a number in [0.0, 0.5)."),
    (["--exit_teacher", "stage1"], "argument --exit_teacher/--exit-teacher: invalid choice: 'stage1' (choose from 'final_exit', 'every_exit')"),
    (["--max_drop", "nan"], "max_drop=nan must be a number of accuracy points, e.g. 0.5."),
]


@pytest.mark.parametrize("flags,message", BAD_TRAIN, ids=[" ".join(flags) for flags, _ in BAD_TRAIN])
def test_bad_train_settings_fail_at_parse_time(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output_dir", str(out), "--train_file", str(tmp_path / "missing.csv"),
              "--validation_file", str(tmp_path / "missing.csv"), *flags])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("hf-magicpyramid train: error: " + message), lines
    assert len(lines) == 2 and lines[0].startswith("usage: hf-magicpyramid train")  # short usage, one error line
    assert not out.exists()  # nothing ran (the data files do not even exist)


def test_keep_ratios_out_of_range_fail_at_parse_time(capsys):
    for ratios, bad in ((["1", "1.5"], "keep_ratios[1]=1.5"), (["1", "0"], "keep_ratios[1]=0.0")):
        with pytest.raises(SystemExit):
            main(["train", "--output_dir", "unused", *DATA, "--keep_ratios", *ratios])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert bad in error and "is out of range" in error


@pytest.mark.parametrize("argv,message", [
    (["train", "--output_dir", "o"], "no training data: pass --train_file FILE or --dataset NAME."),
    (["train", "--output_dir", "o", "--train_file", "t.csv"], "no validation data: pass --validation_file FILE or --dataset NAME (with a validation split)."),
    (["train", *DATA], "the following arguments are required: --output_dir/--output-dir"),
    (["sweep", *DATA], "the following arguments are required: --model_name_or_path/--model-name-or-path/--model"),
    (["sweep", "--model", "m"], "no validation data: pass --validation_file FILE or --dataset NAME (with a validation split)."),
    (["sweep", "--model", "m", *DATA, "--batch_size", "0"], "batch_size=0 is out of range: it must be an integer >= 1."),
    (["sweep", "--model", "m", *DATA, "--max_samples", "0"], "max_samples=0 is out of range: it must be an integer >= 1 (or omitted for all of them)."),
    (["sweep", "--model", "m", *DATA, "--batch1_samples", "-1"], "batch1_samples=-1 is out of range: it must be an integer >= 0."),
    (["sweep", "--model", "m", *DATA, "--calibration_folds", "1"], "calibration_folds=1 is out of range: it must be 0 (off) or an integer >= 2."),
    (["push", "--model", "m"], "the following arguments are required: --repo_id/--repo-id/--hub_model_id/--hub-model-id"),
    (["train", "--output_dir", "o", *DATA, "--out", "x"], "unrecognized arguments: --out x"),
])
def test_missing_or_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"hf-magicpyramid {argv[0]}: error: {message}"


def test_recipe_settings_check_values_for_api_callers_too():
    with pytest.raises(ValueError, match=r"^epochs=-1 is out of range: it must be a number > 0\.$"):
        RecipeSettings(epochs=-1)
    with pytest.raises(ValueError, match=r"^token_pruning='topK' is not supported; choose one of 'none', 'topk', 'threshold'\.$"):
        RecipeSettings(token_pruning="topK")
    with pytest.raises(ValueError, match=r"^exit_pooling='max' is not supported; choose one of 'cls', 'mean' or None"):
        RecipeSettings(exit_pooling="max")
    assert RecipeSettings(keep_ratios=[1, 0.5]).keep_ratios == [1.0, 0.5]
    assert RecipeSettings(pyramid_options=None).pyramid_options == {}


# ---------------------------------------------------------------------------------------------------------------------
# The real thing: train with a preset and run_glue flags; push through the command line
# ---------------------------------------------------------------------------------------------------------------------


def write_toy_csv(path: Path, n: int, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    rows = ["text,label"]
    for i in range(n):
        ids = torch.randint(10, 94, (int(torch.randint(4, 12, (1,), generator=generator)),), generator=generator).tolist()
        ids[0] = i % 2  # the marker word says the label
        rows.append(" ".join(f"w{j}" for j in ids) + ("," + ("pos" if i % 2 else "neg")))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_train_with_a_preset_passes_every_value_to_the_recipe_and_config(tmp_path):
    backbone = make_tiny_backbone(tmp_path / "backbone")
    preset = {
        "name": "tiny", "description": "A tiny test preset.",
        "backbone": {"checkpoint": str(backbone), "model_type": "bert", "num_hidden_layers": 4},
        "exit_layers": [2, 4], "exit_pooling": "mean", "exit_criterion": "confidence", "exit_objective": "two_stage",
        "token_pruning": "none", "token_importance": "mean_attention", "min_kept_tokens": 2,
        "training": {"learning_rate": 1e-3, "exit_learning_rate": 2e-3, "epochs": 1, "exit_epochs": 1, "batch_size": 8,
                     "max_length": 24, "warmup_ratio": 0.2, "weight_decay": 0.02, "seed": 7,
                     "distillation_temperature": 3.0, "pruning_penalty": 0.2},
    }
    preset_file = tmp_path / "tiny.json"
    preset_file.write_text(json.dumps(preset))
    out = tmp_path / "out"
    argv = ["train", "--preset", str(preset_file), "--train_file", str(write_toy_csv(tmp_path / "train.csv", 24, 0)),
            "--validation_file", str(write_toy_csv(tmp_path / "dev.csv", 12, 1)), "--output_dir", str(out),
            "--per_device_train_batch_size", "6", "--logging_steps", "2", "--disable_tqdm", "true"]
    _, _, resolved = parse_arguments("train", argv[1:])
    assert main(argv) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["settings"] == json.loads(json.dumps(dataclasses.asdict(resolved)))  # the recipe got them all
    settings = summary["settings"]
    assert settings["batch_size"] == 6  # the flag beat the preset's 8
    for key, value in preset["training"].items():
        if key in settings and key != "batch_size":
            assert settings[key] == value, key
    assert summary["stages"]["stage4_exits"]["status"] == "trained"
    config = json.loads((out / "config.json").read_text())
    for key in ("exit_layers", "exit_pooling", "exit_criterion", "exit_objective", "token_pruning", "token_importance",
                "min_kept_tokens"):
        assert config[key] == preset[key], key
    assert config["distillation_temperature"] == 3.0 and config["pruning_penalty"] == 0.2


def test_push_through_the_command_line(tmp_path, capsys):
    from hub_server import LocalHub, hub_environment

    folder = tmp_path / "model"
    make_tiny_backbone(tmp_path / "backbone")
    tokenizer = BertTokenizer.from_pretrained(str(tmp_path / "backbone"))
    model = MagicPyramidForSequenceClassification.from_backbone(tiny_stock("bert", num_labels=2), exit_layers=[2, 4])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client"):
        code = main(["push", "--model_name_or_path", str(folder), "--repo_id", "alice/cli-pyramid", "--token", hub.token,
                     "--commit_message", "from the CLI", "--private"])
        assert code == 0, capsys.readouterr().err
        assert "Pushed " + str(folder) + " to " in capsys.readouterr().out
        repo = hub.repos[("model", "alice/cli-pyramid")]
        commit = repo.resolve("main")
        assert repo.private and commit.message.startswith("from the CLI")
        assert {"config.json", "model.safetensors", "tokenizer_config.json", "README.md"} <= set(commit.files)

        code = main(["push", "--model", str(folder), "--repo-id", "alice/bad name", "--token", hub.token])
        assert code == 1
        assert "hf-magicpyramid push: error: Invalid Hub repo id 'alice/bad name'" in capsys.readouterr().err
