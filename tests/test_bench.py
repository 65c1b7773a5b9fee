"""`hf-magicpyramid bench` on a tiny model folder: every line and column, the JSON, the Markdown table and a real PNG.

Timings here mean nothing (tiny model, one round, a busy machine); the test checks what is produced. The compiled lines
use torch.compile's "eager" backend (dynamo without inductor's C++ build, minutes on this machine): the same code path.
"""

from __future__ import annotations

import json
import sys

import datasets
import pytest

from tiny import sharpen_exits, stock_and_pyramid, word_tokenizer

from hf_magicpyramid.bench import BENCH_JSON, BENCH_MD, BENCH_PNG, LINES, run_bench
from hf_magicpyramid.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLUMNS = ("accuracy", "difference", "difference_interval", "latency_ms_batch1_median", "latency_ms_batch1_p90",
           "speedup_batch1", "samples_per_second_batch8", "speedup_batch8", "mean_flops", "flops_ratio", "parameters",
           "disk_bytes")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny pyramid (exits and pruning on, a stored default speed) with its tokenizer, the stock model it came
    from recorded as the recipe does (training_summary.json), and a test CSV."""
    root = tmp_path_factory.mktemp("bench")
    stock, model = stock_and_pyramid("bert", num_labels=2, exit_criterion="entropy", exit_pooling="mean",
                                     token_pruning="topk", keep_ratios=[1.0, 0.6, 0.5, 0.3])
    sharpen_exits(model, std=8.0)
    model.set_speed(exit_threshold=0.3, keep_ratio_scale=1.0)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    word_tokenizer(model_dir).save_pretrained(model_dir)
    stock.save_pretrained(model_dir / "stage1_finetune" / "model")
    (model_dir / "training_summary.json").write_text(json.dumps({"stock_model": "stage1_finetune/model"}))
    rows = [{"text": " ".join(f"w{(7 * i + j) % 90}" for j in range(3 + i % 9)), "label": f"LABEL_{i % 2}"} for i in range(24)]
    datasets.Dataset.from_list(rows).to_csv(str(root / "test.csv"))
    return root


def test_bench_writes_every_line_and_column(folder, capsys):
    pytest.importorskip("onnxruntime")
    out = folder / "out"
    code = main(["bench", "--model", str(folder / "model"), "--test_file", str(folder / "test.csv"), "--slender",
                 str(folder / "model" / "stage1_finetune" / "model"), "--batch_sizes", "1", "8", "--rounds", "1",
                 "--latency_samples", "3", "--compile_backend", "eager", "--output_dir", str(out)])
    assert code == 0
    report = json.loads((out / BENCH_JSON).read_text())
    assert [line["line"] for line in report["lines"]] == list(LINES)
    for line in report["lines"]:
        assert line["skipped"] is None, line
        for column in COLUMNS:
            assert isinstance(line[column], (int, float)), (line["line"], column)
    by_key = {line["line"]: line for line in report["lines"]}
    stock = by_key["stock"]
    assert stock["difference"] == 0 and stock["speedup_batch8"] == 1 and stock["flops_ratio"] == 1
    assert "stage1_finetune" in report["header"]["stock_model"]  # found through training_summary.json
    assert report["header"]["load_average_1_5_15min"] and report["header"]["num_samples"] == 24
    # The pyramid exits and prunes at its stored speed: fewer FLOPs than stock, the same on its ONNX Runtime loop.
    assert by_key["pyramid"]["flops_ratio"] < 1
    assert by_key["pyramid_ort"]["mean_flops"] == pytest.approx(by_key["pyramid"]["mean_flops"])
    assert by_key["pyramid_ort"]["accuracy"] == by_key["pyramid"]["accuracy"]
    assert "fp32 default" in by_key["pyramid_int8"]["note"]  # no int8 calibration in this folder: said so
    assert by_key["slender"]["flops_ratio"] == 1  # the stock folder given as --slender

    # The targets, each met or missed with the ratio that decides it.
    assert len(report["targets"]) == 3 and all(isinstance(t["met"], bool) and t["ratio"] > 0 for t in report["targets"])

    table = (out / BENCH_MD).read_text()
    assert "load average" in table and "Targets:" in table
    for heading in ("accuracy %", "vs stock (pt, 95%)", "batch 1 ms (median / p90)", "batch 8 samples/s",
                    "batch 8 speedup", "mean MFLOPs", "params (M)", "disk (MB)"):
        assert heading in table
    rows = [row for row in table.splitlines() if row.startswith("| ") and "---" not in row]
    assert len(rows) == 1 + len(LINES)

    png = (out / BENCH_PNG).read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(out / BENCH_PNG))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels[..., :3].std() > 0.05  # drawn, not blank


def test_a_missing_optional_dependency_skips_its_lines_with_the_reason(folder, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the onnx extra were not installed
    report = run_bench(folder / "model", datasets.load_dataset("csv", data_files=str(folder / "test.csv"))["train"],
                       lines=("stock", "stock_ort", "pyramid_ort_int8"), batch_sizes=(1, 8), rounds=1, latency_samples=2,
                       output_dir=tmp_path, log=lambda *_: None)
    by_key = {line["line"]: line for line in report["lines"]}
    assert by_key["stock"]["skipped"] is None
    for key in ("stock_ort", "pyramid_ort_int8"):
        assert "onnxruntime not installed" in by_key[key]["skipped"]
    assert "skipped: ImportError: onnxruntime not installed" in (tmp_path / BENCH_MD).read_text()


def test_bad_bench_arguments_fail_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", "x", "--dataset", "rotten_tomatoes", "--lines", "stock", "turbo"])
    assert "lines='turbo'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", "x"])
    assert "--test_file FILE or --dataset NAME" in capsys.readouterr().err
