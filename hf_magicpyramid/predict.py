"""Classify a file of any size, or a stream of texts: chunked, length-bucketed, resumable, sharded under torchrun.

    from hf_magicpyramid import predict_file
    predict_file("out/rt", "reviews.csv", "reviews.scored.csv", on_bad_row="skip")

    hf-magicpyramid predict --model out/rt --input reviews.csv --output reviews.scored.csv
    torchrun --nproc_per_node 2 -m hf_magicpyramid.cli predict --model out/rt --input big.jsonl --output big.out.jsonl

How it works:

- **Reading.** CSV, TSV, JSON lines and Parquet (by extension), with the rules of `data.load_text_files` (cells are text
  exactly as written, a header line, blank lines are not rows, UTF-8 with an optional byte-order mark; TSV splits at
  tabs with no quoting), but streamed: `chunk_size` consecutive rows at a time (Parquet through
  `pyarrow.parquet.ParquetFile.iter_batches`), so memory is bounded by the chunk, not by the file.
- **Throughput.** Each chunk is tokenised, its rows sorted by token count into batches of `batch_size` (little padding),
  classified, and put back in input order.
- **Output.** The same format as the output file's extension (by default the input's), one row per input row, in input
  order: the input's columns, then `label` (the `id2label` name), `score` (its softmax probability), `exit_layer` (the
  1-based layer the row left the model after; the last layer for a stock model), `id` (the row's 0-based index in the
  input) when the input has no `id` column, and `error` with `on_bad_row="skip"`. A name the input already uses gets a
  `predicted_` prefix (a test file's own `label` column stays).
- **Bad rows.** An empty text, a missing column (a CSV row with too few or too many fields, a JSON object without the
  key), a value that is not a string (a JSON number or null, a Parquet null), or a line that is not UTF-8 or not a JSON
  object is reported with its line number (Parquet: its 1-based row). `on_bad_row="fail"` stops there;
  `"skip"` writes the row with an empty label and the reason in `error`. No row is ever dropped.
- **Restart.** Every finished chunk is committed as a part file (written, then renamed: a part is whole or absent) in
  `OUTPUT.parts/`, next to a `manifest.json` fingerprint of the run (input file, model, settings). The same command
  run again skips the committed chunks; at the end the parts are merged into OUTPUT (written, then renamed) and the
  folder is removed. A different input, model or setting over an unfinished run is an error naming what differs; an
  existing OUTPUT is never replaced without `overwrite=True`.
- **Scale-out.** Under `torchrun` (RANK / WORLD_SIZE in the environment), rank `r` classifies the chunks whose index is
  `r` modulo the world size; every rank reads the whole file to find the chunk boundaries (reading is cheap next to the
  model). The parts folder must be shared by the ranks (one machine, or a shared file system across `--nnodes`); rank 0
  merges after a barrier (gloo). Each process uses its own CPU threads: give each `OMP_NUM_THREADS=cores/processes`.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import torch

from .data import _DELIMITERS, _header, _json_kind, delimited_records

__all__ = ["BAD_ROW_POLICIES", "PREDICT_FORMATS", "predict_file", "predict_texts"]

logger = logging.getLogger(__name__)

# Extension -> format. `.json` is read as JSON lines (one object per line): a single JSON array cannot be streamed.
PREDICT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "jsonl", ".jsonl": "jsonl", ".parquet": "parquet"}
BAD_ROW_POLICIES = ("fail", "skip")
DEFAULT_CHUNK_SIZE = 4096
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# Test hook: a process exits abruptly (os._exit, no clean-up) after committing this many chunks, to test restarts.
_STOP_AFTER_ENV = "HF_MAGICPYRAMID_PREDICT_STOP_AFTER_CHUNKS"
_SHOWN_BAD_ROWS = 5


# ---------------------------------------------------------------------------------------------------------------------
# Classifying texts
# ---------------------------------------------------------------------------------------------------------------------


class _Classifier:
    """A model, its tokenizer and the call settings: `classify(texts, pairs)` -> (label names, scores, exit layers), in
    the order given, the batches built by token count when `sort_by_length`."""

    def __init__(self, model, tokenizer, *, batch_size, max_length, exit_threshold=None, keep_ratio_scale=None,
                 sort_by_length=True, device=None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.sort_by_length = batch_size, max_length, sort_by_length
        config = model.config
        if getattr(config, "num_labels", 0) < 2:
            raise ValueError(f"The model has num_labels={getattr(config, 'num_labels', None)}: predict classifies "
                             "(num_labels >= 2); a regression model is not supported.")
        self.id2label = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
        self.num_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        knobs = {"exit_threshold": exit_threshold, "keep_ratio_scale": keep_ratio_scale}
        self.knobs = {name: value for name, value in knobs.items() if value is not None}
        accepted = inspect.signature(model.forward).parameters
        refused = [name for name in self.knobs if name not in accepted]
        if refused:
            raise ValueError(f"{', '.join(refused)} is a Magic Pyramid speed knob, but {type(model).__name__} does not "
                             "take it: load a Magic Pyramid model, or leave it unset.")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_left = getattr(tokenizer, "padding_side", "right") == "left"

    def classify(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None):
        """texts (and pairs): lists of strings of one length n -> (n label names, n scores, n exit layers)."""
        n = len(texts)
        if n == 0:
            return [], [], []
        encoded = self.tokenizer(list(texts), None if pairs is None else list(pairs), truncation=True,
                                 max_length=self.max_length)
        names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in encoded]
        lengths = [len(ids) for ids in encoded["input_ids"]]
        order = sorted(range(n), key=lengths.__getitem__) if self.sort_by_length else list(range(n))
        labels: List[str] = [""] * n
        scores: List[float] = [0.0] * n
        exits: List[int] = [0] * n
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                rows = order[start : start + self.batch_size]
                width = max(lengths[i] for i in rows)
                batch = {}
                for name in names:
                    fill = self.pad_id if name == "input_ids" else 0
                    tensor = torch.full((len(rows), width), fill, dtype=torch.long)
                    for slot, i in enumerate(rows):
                        values = torch.tensor(encoded[name][i], dtype=torch.long)
                        if self.pad_left:
                            tensor[slot, width - lengths[i] :] = values
                        else:
                            tensor[slot, : lengths[i]] = values
                    batch[name] = tensor.to(self.device)
                output = self.model(**batch, **self.knobs)
                probabilities = torch.softmax(output.logits.float(), dim=-1)
                best, best_id = probabilities.max(dim=-1)
                exit_layer = getattr(output, "exit_layer", None)
                exit_list = exit_layer.tolist() if exit_layer is not None else [self.num_layers] * len(rows)
                for slot, i in enumerate(rows):
                    labels[i] = self.id2label[int(best_id[slot])]
                    scores[i] = float(best[slot])
                    exits[i] = int(exit_list[slot])
        return labels, scores, exits


def _load_model(model, tokenizer, device, quantize):
    """(model, tokenizer, model description for the fingerprint) from a folder / Hub id or from objects."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from . import MagicPyramidConfig  # noqa: F401  (registers the Auto classes)

    loaded_here = isinstance(model, (str, os.PathLike))
    if loaded_here:
        name = str(model)
        loaded = AutoModelForSequenceClassification.from_pretrained(name)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(name)
        model = loaded
    elif tokenizer is None:
        raise ValueError("predict got a model object but no tokenizer: pass tokenizer=..., or pass the model's folder.")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    description = _model_fingerprint(model)  # before quantizing: the fingerprint says which weights
    model.eval()
    if device is None:
        # A loaded model goes to this rank's GPU when there is one; a model object stays where the caller put it.
        # int8 runs on the CPU only.
        device = ("cpu" if quantize else _default_device()) if loaded_here else next(model.parameters()).device
    model.to(device)
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize={quantize!r} is not supported; choose 'int8' or leave it unset.")
        if torch.device(device).type != "cpu":
            raise ValueError("quantize='int8' (dynamic int8) runs on the CPU only; pass device='cpu'.")
        from .quantization import apply_quantized_speed, quantize_model

        model = quantize_model(model, method="int8")
        if loaded_here:  # the speed `sweep --quantize int8` calibrated for the int8 model, when the folder has one
            apply_quantized_speed(model, name, "int8")
    return model, tokenizer, description, device


def _default_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def _model_fingerprint(model) -> dict:
    """What identifies the weights: the class, the config and a digest of every tensor's sum and shape."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            if tensor.is_floating_point():
                digest.update(repr(round(float(tensor.double().sum()), 6)).encode())
    config = model.config.to_dict()
    config.pop("transformers_version", None)
    config_text = json.dumps(config, sort_keys=True, default=str)
    return {"class": type(model).__name__, "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
            "weights_sha256": digest.hexdigest()}


def predict_texts(model, texts: Iterable, tokenizer=None, *, batch_size: int = 32, max_length: int = 128,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, exit_threshold: float | None = None,
                  keep_ratio_scale: float | None = None, sort_by_length: bool = True, device=None,
                  quantize: str | None = None) -> Iterator[dict]:
    """Classify a stream of texts, yielding `{"label", "score", "exit_layer"}` per text, in order.

    `texts` is any iterable (a generator over a huge source is fine: `chunk_size` texts are held at a time) of strings,
    or of (text, text_pair) tuples for a sentence-pair model. `model` is a folder / Hub id (its tokenizer is loaded
    with it) or a model object with `tokenizer`. Raises `ValueError` naming the position of an empty or non-string text.
    """
    _check_settings(batch_size, max_length, chunk_size)
    model, tokenizer, _, device = _load_model(model, tokenizer, device, quantize)
    classifier = _Classifier(model, tokenizer, batch_size=batch_size, max_length=max_length,
                             exit_threshold=exit_threshold, keep_ratio_scale=keep_ratio_scale,
                             sort_by_length=sort_by_length, device=device)
    firsts: List[str] = []
    seconds: List[str] = []
    paired = None
    position = 0

    def flush():
        labels, scores, exits = classifier.classify(firsts, seconds if paired else None)
        for label, score, exit_layer in zip(labels, scores, exits):
            yield {"label": label, "score": score, "exit_layer": exit_layer}
        firsts.clear()
        seconds.clear()

    for item in texts:
        is_pair = isinstance(item, tuple)
        if paired is None:
            paired = is_pair
        parts = item if is_pair else (item,)
        if is_pair != paired or len(parts) != (2 if paired else 1):
            raise ValueError(f"text {position} is {item!r}: give all strings, or all (text, text_pair) tuples.")
        for part in parts:
            problem = _text_problem(part, "text")
            if problem:
                raise ValueError(f"text {position}: {problem}.")
        firsts.append(parts[0])
        if paired:
            seconds.append(parts[1])
        position += 1
        if len(firsts) >= chunk_size:
            yield from flush()
    if firsts:
        yield from flush()


def _text_problem(value, column: str) -> Optional[str]:
    """Why a cell cannot be classified, or None."""
    if isinstance(value, str):
        return None if value.strip() else f"the {column!r} value is empty"
    if value is None:
        return f"the {column!r} value is null"
    kind = _json_kind(value) or type(value).__name__
    return f"the {column!r} value is {kind} ({json.dumps(value, default=str)[:40]}), not a text"


def _check_settings(batch_size, max_length, chunk_size):
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is out of range: it must be an integer >= 1.")


# ---------------------------------------------------------------------------------------------------------------------
# Reading in chunks
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """`chunk_size` consecutive rows: per row its place in the file, text (and pair) or the reason it is bad, and what
    the writer needs to write the input's columns back (cells, objects, or an Arrow record batch)."""

    index: int
    first_row: int  # 0-based index of the chunk's first row in the file
    places: List[str] = field(default_factory=list)  # "line 7" / "row 7"
    texts: List[Optional[str]] = field(default_factory=list)
    pairs: List[Optional[str]] = field(default_factory=list)
    errors: List[Optional[str]] = field(default_factory=list)
    records: list = field(default_factory=list)  # csv/tsv: list of cells; jsonl: dict (or None)
    batch: object = None  # parquet: pyarrow.RecordBatch

    def __len__(self):
        return len(self.places)


class _Reader:
    """Streams an input file as `_Chunk`s. `columns` (the input's column names) is known once `open()` ran."""

    def __init__(self, path: str, fmt: str, text_column: str, pair_column: Optional[str], chunk_size: int):
        self.path, self.fmt, self.chunk_size = path, fmt, chunk_size
        self.text_column, self.pair_column = text_column, pair_column
        self.columns: List[str] = []
        self.total_rows: Optional[int] = None  # known up front for Parquet only

    # Each reader yields (place, record, text, pair, error) per row; `chunks()` groups them.
    def chunks(self) -> Iterator[_Chunk]:
        if self.fmt == "parquet":
            yield from self._parquet_chunks()
            return
        rows = self._delimited_rows() if self.fmt in _DELIMITERS else self._json_rows()
        chunk = _Chunk(0, 0)
        count = 0
        for place, record, text, pair, error in rows:
            chunk.places.append(place)
            chunk.records.append(record)
            chunk.texts.append(text)
            chunk.pairs.append(pair)
            chunk.errors.append(error)
            count += 1
            if len(chunk) == self.chunk_size:
                yield chunk
                chunk = _Chunk(chunk.index + 1, count)
        if count == 0:
            raise ValueError(f"The input file {self.path} holds no rows: pass a file with data.")
        if len(chunk):
            yield chunk

    def _missing_column(self, column: str, role: str):
        flag = "--text-column" if role == "text" else "--text-pair-column"
        return ValueError(f"The input file {self.path} has no {role} column {column!r}; its columns are {self.columns}. "
                          f"Choose one with {flag}.")

    def _delimited_rows(self):
        with open(self.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            header = None
            for start, end, record in delimited_records(handle, self.fmt, f"The input file {self.path}"):
                if header is None:
                    if any(_has_surrogates(name) for name in record):
                        raise ValueError(f"The input file {self.path} is not UTF-8 in its header (line {start}): save it "
                                         "as UTF-8.")
                    header = _header(record, self.path, "input", start)
                    self.columns = header
                    if self.text_column not in header:
                        raise self._missing_column(self.text_column, "text")
                    if self.pair_column is not None and self.pair_column not in header:
                        raise self._missing_column(self.pair_column, "text pair")
                    text_at = header.index(self.text_column)
                    pair_at = None if self.pair_column is None else header.index(self.pair_column)
                    continue
                place = f"line {start}"
                error = None
                if any(_has_surrogates(cell) for cell in record):
                    error = f"{place}: {_bad_bytes(record)}, which UTF-8 does not allow"
                    record = [_replace_surrogates(cell) for cell in record]
                elif len(record) != len(header):
                    lines = place if end == start else f"lines {start}-{end}"
                    error = (f"{lines}: {len(record)} field(s) where the header names {len(header)}"
                             + (" (a quote opened there may run on)" if end > start else ""))
                text = record[text_at] if error is None else None
                pair = record[pair_at] if error is None and pair_at is not None else None
                if error is None:
                    problem = _text_problem(text, self.text_column) or (
                        None if pair_at is None else _text_problem(pair, self.pair_column))
                    if problem:
                        error = f"{place}: {problem}"
                yield place, record, text, pair, error
        if header is None:
            raise ValueError(f"The input file {self.path} is empty: it needs a header line naming the columns and one "
                             "row per line after it.")

    def _json_rows(self):
        example = '{"text": "a fine film"}'
        first_object = True
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                place = f"line {number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad = raw[error.start : error.end].hex(" ")
                    yield place, None, None, None, f"{place}: holds the byte(s) {bad}, which UTF-8 does not allow"
                    continue
                if not line.strip():
                    continue
                if first_object and line.lstrip().startswith("["):
                    raise ValueError(f"The input file {self.path} holds a JSON array: predict streams JSON lines; write "
                                     f"one object per line, such as {example}.")
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    yield place, None, None, None, (f"{place}: not valid JSON ({error.msg} at column {error.colno}); "
                                                    f"write one object per line, such as {example}")
                    continue
                if not isinstance(row, dict):
                    yield place, None, None, None, f"{place}: holds {_json_kind(row) or 'null'}, not a JSON object"
                    continue
                if first_object:
                    self.columns = list(row)
                    first_object = False
                error = None
                for column in (self.text_column, self.pair_column):
                    if column is None:
                        continue
                    if column not in row:
                        error = f"{place}: the object has no {column!r} key (its keys: {list(row)[:10]})"
                    else:
                        error = _text_problem(row[column], column)
                        error = error and f"{place}: {error}"
                    if error:
                        break
                text = row.get(self.text_column) if error is None else None
                pair = row.get(self.pair_column) if error is None and self.pair_column else None
                yield place, row, text, pair, error

    def _parquet_chunks(self):
        import pyarrow
        import pyarrow.parquet

        try:
            parquet = pyarrow.parquet.ParquetFile(self.path)
        except (pyarrow.ArrowException, OSError) as error:
            raise ValueError(f"The input file {self.path} is not a readable Parquet file ({error}).") from None
        self.columns = list(parquet.schema_arrow.names)
        self.schema = parquet.schema_arrow
        self.total_rows = parquet.metadata.num_rows
        if self.text_column not in self.columns:
            raise self._missing_column(self.text_column, "text")
        if self.pair_column is not None and self.pair_column not in self.columns:
            raise self._missing_column(self.pair_column, "text pair")
        if self.total_rows == 0:
            raise ValueError(f"The input file {self.path} has columns {self.columns} but no rows: pass a file with data.")
        pending: list = []
        pending_rows = 0
        index = first_row = 0

        def make(batch, index, first_row):
            chunk = _Chunk(index, first_row, batch=batch)
            texts = batch.column(self.text_column).to_pylist()
            pairs = batch.column(self.pair_column).to_pylist() if self.pair_column else [None] * len(texts)
            for offset, (text, pair) in enumerate(zip(texts, pairs)):
                place = f"row {first_row + offset + 1}"
                problem = _text_problem(text, self.text_column) or (
                    None if self.pair_column is None else _text_problem(pair, self.pair_column))
                chunk.places.append(place)
                chunk.errors.append(problem and f"{place}: {problem}")
                chunk.texts.append(None if problem else text)
                chunk.pairs.append(None if problem else pair)
            return chunk

        # Batches may come shorter at row-group ends: regroup into exactly chunk_size rows.
        for batch in parquet.iter_batches(batch_size=self.chunk_size):
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= self.chunk_size:
                table = pyarrow.Table.from_batches(pending)
                rest = table.slice(self.chunk_size)
                yield make(_one_batch(table.slice(0, self.chunk_size), self.schema), index, first_row)
                index += 1
                first_row += self.chunk_size
                pending = rest.to_batches() if rest.num_rows else []
                pending_rows = rest.num_rows
        if pending_rows:
            yield make(_one_batch(pyarrow.Table.from_batches(pending), self.schema), index, first_row)


def _one_batch(table, schema):
    import pyarrow

    table = table.combine_chunks()
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    return pyarrow.RecordBatch.from_pylist([], schema=schema) if not batches else pyarrow.concat_batches(batches)


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= character <= "\udcff" for character in text)


def _replace_surrogates(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _bad_bytes(record) -> str:
    for cell in record:
        for character in cell:
            if "\udc80" <= character <= "\udcff":
                return f"holds the byte {ord(character) - 0xDC00:02x}"
    return "holds bytes"


# ---------------------------------------------------------------------------------------------------------------------
# Writing parts and merging
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """The output's columns: the input's, then the added ones under their names (`predicted_` when taken)."""

    fmt: str
    input_columns: List[str]
    label: str
    score: str
    exit_layer: str
    id: Optional[str]
    error: Optional[str]

    @classmethod
    def build(cls, fmt: str, input_columns: Sequence[str], skip: bool) -> "_Layout":
        taken = set(input_columns)

        def name(base):
            return base if base not in taken else f"predicted_{base}"

        return cls(fmt, list(input_columns), name("label"), name("score"), name("exit_layer"),
                   None if "id" in taken else "id", name("error") if skip else None)

    @property
    def added(self) -> List[str]:
        return [n for n in (self.label, self.score, self.exit_layer, self.id, self.error) if n is not None]

    def header(self) -> List[str]:
        return self.input_columns + self.added

    def added_values(self, row_id, label, score, exit_layer, error):
        values = {self.label: label, self.score: score, self.exit_layer: exit_layer}
        if self.id is not None:
            values[self.id] = row_id
        if self.error is not None:
            values[self.error] = error or ""
        return values


def _write_part(path: Path, layout: _Layout, chunk: _Chunk, labels, scores, exits) -> None:
    """Write one chunk's output rows to `path` (rows only: the merge writes the header)."""
    fmt = layout.fmt
    rows = range(len(chunk))
    ids = [chunk.first_row + i for i in rows]
    if fmt in _DELIMITERS:
        width = len(layout.input_columns)
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = _csv_writer(handle, fmt)
            for i in rows:
                cells = list(chunk.records[i][:width]) + [""] * max(0, width - len(chunk.records[i]))
                bad = bool(chunk.errors[i])
                added = layout.added_values(ids[i], labels[i], "" if bad else repr(scores[i]), "" if bad else exits[i],
                                            chunk.errors[i])
                if fmt == "tsv" and any(("\t" in c or "\n" in c or "\r" in c) for c in cells if isinstance(c, str)):
                    raise ValueError(f"{chunk.places[i]} holds a tab or a line break, which a TSV output cannot hold: "
                                     "write the output as .csv.")
                writer.writerow(cells + [added[name] for name in layout.added])
    elif fmt == "jsonl":
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            for i in rows:
                row = dict(chunk.records[i]) if chunk.records[i] is not None else {}
                bad = bool(chunk.errors[i])
                row.update(layout.added_values(ids[i], labels[i], None if bad else scores[i],
                                               None if bad else exits[i], chunk.errors[i]))
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        import pyarrow
        import pyarrow.parquet

        bad = [bool(e) for e in chunk.errors]
        added = {layout.label: pyarrow.array(labels, pyarrow.string()),
                 layout.score: pyarrow.array([None if b else s for b, s in zip(bad, scores)], pyarrow.float64()),
                 layout.exit_layer: pyarrow.array([None if b else e for b, e in zip(bad, exits)], pyarrow.int64())}
        if layout.id is not None:
            added[layout.id] = pyarrow.array(ids, pyarrow.int64())
        if layout.error is not None:
            added[layout.error] = pyarrow.array([e or "" for e in chunk.errors], pyarrow.string())
        columns = list(chunk.batch.columns) + [added[name] for name in layout.added]
        table = pyarrow.Table.from_arrays(columns, names=layout.header())
        pyarrow.parquet.write_table(table.replace_schema_metadata(None), path)


def _csv_writer(handle, fmt):
    if fmt == "tsv":
        return csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, lineterminator="\n")
    return csv.writer(handle, delimiter=",", lineterminator="\n")


def _merge(parts: List[Path], layout: _Layout, target: Path) -> None:
    """Concatenate the parts (in chunk order) into `target`, with the header for CSV/TSV."""
    if layout.fmt == "parquet":
        import pyarrow.parquet

        writer = None
        try:
            for part in parts:
                source = pyarrow.parquet.ParquetFile(part)
                if writer is None:
                    writer = pyarrow.parquet.ParquetWriter(target, source.schema_arrow)
                for batch in source.iter_batches():
                    writer.write_batch(batch)
        finally:
            if writer is not None:
                writer.close()
        return
    with open(target, "wb") as out:
        if layout.fmt in _DELIMITERS:
            header = _encoded_row(layout.header(), layout.fmt)
            out.write(header)
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)


def _encoded_row(cells, fmt) -> bytes:
    import io

    buffer = io.StringIO()
    _csv_writer(buffer, fmt).writerow(cells)
    return buffer.getvalue().encode("utf-8")


def _atomic_json(path: Path, value) -> None:
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(temporary, path)


def _file_fingerprint(path: str) -> dict:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns}


def _part_name(index: int, rows: int, fmt: str) -> str:
    extension = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "parquet": "parquet"}[fmt]
    return f"chunk-{index:09d}-{rows}.{extension}"


def _format_of(path: str, role: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in PREDICT_FORMATS:
        raise ValueError(f"The {role} file {path!r} has extension {suffix!r}; supported: "
                         f"{', '.join(sorted(PREDICT_FORMATS))}.")
    return PREDICT_FORMATS[suffix]


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def _distributed():
    """(rank, world size, whether this call created the process group) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    # Long timeout: after a restart the ranks' remaining work can differ by a lot before the merge barrier.
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), True


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _differences(old: dict, new: dict, prefix: str = "") -> List[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} then, {b!r} now)")
    return out


def _prepare_parts(parts_dir: Path, fingerprint: dict, overwrite: bool, output: Path) -> int:
    """Create or check the parts folder (rank 0). Returns the number of chunks already committed."""
    manifest_path = parts_dir / MANIFEST
    if parts_dir.exists():
        if not manifest_path.is_file():
            raise ValueError(f"{parts_dir} exists but is not an unfinished predict run (no {MANIFEST}): move it away, "
                             "or choose another --output.")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") != fingerprint:
            if not overwrite:
                changed = _differences(manifest.get("fingerprint", {}), fingerprint)
                raise ValueError(
                    f"{parts_dir} holds an unfinished run of another command (it differs in: {'; '.join(changed[:4])}). "
                    f"Rerun that command to finish it, or pass --overwrite to discard it and start over.")
            shutil.rmtree(parts_dir)
    if not parts_dir.exists():
        parts_dir.mkdir(parents=True)
        _atomic_json(manifest_path, {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "output": str(output)})
    return len([part for part in parts_dir.glob("chunk-*") if ".tmp" not in part.name])


def predict_file(model, input_file, output_file=None, *, tokenizer=None, text_column: str = "text",
                 text_pair_column: str | None = None, batch_size: int = 32, max_length: int = 128,
                 exit_threshold: float | None = None, keep_ratio_scale: float | None = None,
                 on_bad_row: str = "fail", quantize: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 overwrite: bool = False, sort_by_length: bool = True, device=None, progress: bool = True) -> dict:
    """Classify every row of `input_file` into `output_file` (see the module docstring for formats, columns, bad rows,
    restart and torchrun).

    Args:
        model: a model folder or Hub id (a Magic Pyramid model, or any `AutoModelForSequenceClassification`), or a model
            object (then pass `tokenizer`).
        input_file, output_file: paths; the format follows each extension (.csv, .tsv, .json/.jsonl = JSON lines,
            .parquet). Default output: `INPUT.predictions.EXT` beside the input.
        exit_threshold, keep_ratio_scale: per-call speed of a Magic Pyramid model (default: its stored speed).
        on_bad_row: "fail" (stop at the first bad row, naming its line) or "skip" (write it with an empty label and the
            reason in an `error` column).
        quantize: "int8" for dynamic int8 quantization on the CPU.
        chunk_size: rows read, classified and committed at a time (memory and restart granularity).
        overwrite: replace an existing output file, and discard an unfinished run of another command.
        sort_by_length: batch by token count (off: batches in input order, the plain loop).

    Returns a summary: rows, bad_rows, chunks, resumed_chunks (committed by an earlier run), output, seconds, rows_per_second
    (this process's classified rows), rank, world_size. Under torchrun every rank returns; rank 0 writes the output.
    """
    _check_settings(batch_size, max_length, chunk_size)
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not supported; choose one of {', '.join(BAD_ROW_POLICIES)}.")
    input_path = Path(input_file)
    if not input_path.is_file():
        raise FileNotFoundError(f"The input file {str(input_file)!r} does not exist.")
    input_format = _format_of(str(input_path), "input")
    if output_file is None:
        output_file = input_path.with_name(input_path.stem + ".predictions" + input_path.suffix)
    output_path = Path(output_file)
    output_format = _format_of(str(output_path), "output")
    if output_path.resolve() == input_path.resolve():
        raise ValueError(f"The output file {str(output_path)!r} is the input file: choose another --output.")
    if output_format != input_format and {input_format, output_format} != {"csv", "tsv"}:
        raise ValueError(f"The output {output_path.name} is {output_format} but the input {input_path.name} is "
                         f"{input_format}: the output keeps the input's format (CSV and TSV may be swapped); give the "
                         f"output the input's extension ({input_path.suffix}).")
    if output_path.exists() and not overwrite:
        raise FileExistsError(f"The output file {str(output_path)!r} exists: pass --overwrite to replace it, or "
                              "choose another --output.")

    rank, world, created_group = _distributed()
    try:
        return _run(model, tokenizer, input_path, input_format, output_path, output_format, rank, world,
                    text_column=text_column, text_pair_column=text_pair_column, batch_size=batch_size,
                    max_length=max_length, exit_threshold=exit_threshold, keep_ratio_scale=keep_ratio_scale,
                    on_bad_row=on_bad_row, quantize=quantize, chunk_size=chunk_size, overwrite=overwrite,
                    sort_by_length=sort_by_length, device=device, progress=progress)
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(model, tokenizer, input_path, input_format, output_path, output_format, rank, world, *, text_column,
         text_pair_column, batch_size, max_length, exit_threshold, keep_ratio_scale, on_bad_row, quantize, chunk_size,
         overwrite, sort_by_length, device, progress) -> dict:
    model, tokenizer, model_description, device = _load_model(model, tokenizer, device, quantize)
    classifier = _Classifier(model, tokenizer, batch_size=batch_size, max_length=max_length,
                             exit_threshold=exit_threshold, keep_ratio_scale=keep_ratio_scale,
                             sort_by_length=sort_by_length, device=device)
    fingerprint = {
        "input": _file_fingerprint(str(input_path)),
        "model": model_description,
        "settings": {"text_column": text_column, "text_pair_column": text_pair_column, "max_length": max_length,
                     "exit_threshold": exit_threshold, "keep_ratio_scale": keep_ratio_scale, "on_bad_row": on_bad_row,
                     "quantize": quantize, "chunk_size": chunk_size, "output_format": output_format},
    }
    parts_dir = output_path.with_name(output_path.name + ".parts")
    error = None
    if rank == 0:
        try:
            committed = _prepare_parts(parts_dir, fingerprint, overwrite, output_path)
            if committed:
                logger.warning("Resuming %s: %d chunk(s) already done in %s.", output_path, committed, parts_dir)
        except Exception as raised:  # let the other ranks leave the barrier, then raise
            error = raised
    if world > 1:
        import torch.distributed as dist

        failed = [error is not None]
        dist.broadcast_object_list(failed, src=0)
        if failed[0]:
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 could not prepare {parts_dir}; see its error.")
    elif error is not None:
        raise error

    reader = _Reader(str(input_path), input_format, text_column, text_pair_column, chunk_size)
    stop_after = int(os.environ.get(_STOP_AFTER_ENV, "0") or 0)
    layout = None
    total_rows = bad_rows = classified = resumed = chunks = 0
    shown_bad = 0
    started = time.perf_counter()
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(unit=" rows", desc="predict" if world == 1 else f"predict (rank 0 of {world})", dynamic_ncols=True)
    committed_now = 0
    try:
        for chunk in reader.chunks():
            if layout is None:
                layout = _Layout.build(output_format, reader.columns, on_bad_row == "skip")
                if bar is not None and reader.total_rows is not None:
                    bar.total = -(-reader.total_rows // world)
            chunks += 1
            total_rows += len(chunk)
            bad = [e for e in chunk.errors if e]
            bad_rows += len(bad)
            if bad and on_bad_row == "fail":
                raise ValueError(f"The input file {input_path}, {bad[0]}. Fix that row, or pass --on-bad-row skip to "
                                 "write it with an empty label and the reason in an `error` column.")
            if chunk.index % world != rank:
                continue
            for message in bad:
                if shown_bad < _SHOWN_BAD_ROWS:
                    logger.warning("Bad row in %s, %s (written with an empty label).", input_path, message)
                shown_bad += 1
            part = parts_dir / _part_name(chunk.index, len(chunk), output_format)
            if part.exists():
                resumed += 1
                continue
            good = [i for i, e in enumerate(chunk.errors) if not e]
            labels = [""] * len(chunk)
            scores = [0.0] * len(chunk)
            exits = [0] * len(chunk)
            got = classifier.classify([chunk.texts[i] for i in good],
                                      None if text_pair_column is None else [chunk.pairs[i] for i in good])
            for slot, i in enumerate(good):
                labels[i], scores[i], exits[i] = got[0][slot], got[1][slot], got[2][slot]
            temporary = part.with_name(part.name + f".tmp{os.getpid()}")
            _write_part(temporary, layout, chunk, labels, scores, exits)
            os.replace(temporary, part)  # the commit: a part file is whole or absent
            classified += len(chunk)
            committed_now += 1
            if bar is not None:
                bar.update(len(chunk))
            if stop_after and committed_now >= stop_after:
                os._exit(17)  # test hook: an abrupt stop, as a kill would
            del chunk
    except BaseException:
        if bar is not None:
            bar.close()
        raise
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    if shown_bad > _SHOWN_BAD_ROWS:
        logger.warning("%d bad row(s) in %s in all (written with an empty label and the reason in %r).",
                       shown_bad, input_path, layout.error)

    _barrier(world)
    if rank == 0:
        parts = []
        expected_rows = 0
        for index in range(chunks):
            found = sorted(parts_dir.glob(f"chunk-{index:09d}-*.*"))
            found = [p for p in found if ".tmp" not in p.name]
            if len(found) != 1:
                raise RuntimeError(f"Chunk {index} of {chunks} has {len(found)} part file(s) in {parts_dir}; "
                                   "rerun the same command to redo it.")
            expected_rows += int(found[0].stem.split("-")[2])
            parts.append(found[0])
        if expected_rows != total_rows:
            raise RuntimeError(f"The parts in {parts_dir} hold {expected_rows} rows but the input has {total_rows}.")
        temporary = parts_dir / ("merged" + output_path.suffix)
        _merge(parts, layout, temporary)
        os.replace(temporary, output_path)
        shutil.rmtree(parts_dir, ignore_errors=True)
    _barrier(world)
    return {"rows": total_rows, "bad_rows": bad_rows, "chunks": chunks, "resumed_chunks": resumed,
            "classified_rows": classified, "output": str(output_path), "seconds": seconds,
            "rows_per_second": classified / seconds if seconds > 0 else None, "rank": rank, "world_size": world}
