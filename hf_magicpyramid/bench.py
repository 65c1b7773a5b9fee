"""`hf-magicpyramid bench`: every way a CPU user could speed up the classifier, measured in one run on the same inputs.

Lines (each is skipped, with the reason, when its optional dependency is missing or it fails to build or run):

| key | what |
| --- | --- |
| stock | the stock fine-tuned classifier, fp32 (`--stock`, else the recipe's stage-1 model from training_summary.json) |
| stock_int8 | the same with int8 dynamic quantization (`quantization.quantize_model`) |
| stock_compiled | the same under `torch.compile(dynamic=True)` (inductor; needs a C++ compiler) |
| stock_ort | the stock model exported whole to ONNX Runtime, fp32 (`pip install 'hf-magicpyramid[onnx]'`) |
| stock_ort_int8 | the same, int8 (`onnxruntime.quantization.quantize_dynamic`) |
| pyramid | the Magic Pyramid model at its stored (calibrated) default speed |
| pyramid_int8 | int8, at the speed `sweep --quantize int8` calibrated for it (else the fp32 default, noted) |
| pyramid_compiled | each layer module under `torch.compile(dynamic=True)`; the loop between layers stays eager |
| pyramid_ort | the ONNX Runtime layer loop (`onnx_loop.OnnxPyramid`), fp32 |
| pyramid_ort_int8 | the same, int8 graphs |
| slender | `--slender DIR`, at its stored default speed |

Per line: accuracy, its paired difference to the stock model with the 95% half-width (`calibration.paired_difference`,
same samples), batch-1 latency (median and p90 over samples, each sample's median over rounds), throughput at every
other batch size (median pass over rounds), speedup over the stock model, mean FLOPs per sample (`flops.py`; the
compiled and int8 lines count the same operations as their fp32 model), parameters, weights on disk. Timing runs in
rounds, each round timing every line in turn (interleaved), so that load from other processes hits all lines alike;
the machine's load average is in the header. Writes bench.json, bench.md and bench.png (speedup against accuracy change).
"""

from __future__ import annotations

import copy
import datetime
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .calibration import _batches, _stock_model_for, paired_difference, quantized_default
from .flops import full_model_flops, sample_flops
from .modeling_magic_pyramid import MagicPyramidForSequenceClassification
from .quantization import quantize_model

LINES = ("stock", "stock_int8", "stock_compiled", "stock_ort", "stock_ort_int8",
         "pyramid", "pyramid_int8", "pyramid_compiled", "pyramid_ort", "pyramid_ort_int8", "slender")
LABELS = {
    "stock": "stock fp32",
    "stock_int8": "stock + int8 (torch)",
    "stock_compiled": "stock + torch.compile",
    "stock_ort": "stock on ONNX Runtime fp32",
    "stock_ort_int8": "stock on ONNX Runtime int8",
    "pyramid": "Magic Pyramid",
    "pyramid_int8": "Magic Pyramid + int8 (torch)",
    "pyramid_compiled": "Magic Pyramid + torch.compile (layers)",
    "pyramid_ort": "Magic Pyramid on ONNX Runtime fp32",
    "pyramid_ort_int8": "Magic Pyramid on ONNX Runtime int8",
    "slender": "slender model",
}
BENCH_JSON, BENCH_MD, BENCH_PNG = "bench.json", "bench.md", "bench.png"


@dataclass
class Line:
    """One way of running the classifier: `call(batch) -> output with .logits` (and .exit_layer / .kept_tokens for a
    pyramid), `flops(batch, output) -> (batch,)` FLOPs per sample."""

    key: str
    call: Callable | None = None
    flops: Callable | None = None
    parameters: int | None = None
    disk_bytes: int | None = None
    note: str = ""
    skipped: str | None = None
    results: dict[str, Any] = field(default_factory=dict)


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _folder_bytes(folder) -> int | None:
    files = list(Path(folder).glob("*.safetensors")) or list(Path(folder).glob("*.bin"))
    return sum(f.stat().st_size for f in files) or None


def _state_bytes(model) -> int:
    """Bytes of the model's state dict as torch.save writes it (packed int8 weights included)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _pyramid_flops(model):
    def flops(batch, out):
        if getattr(out, "flops", None) is not None:
            return out.flops
        return sample_flops(model, out.kept_tokens, out.exit_layer)
    return flops


def _stock_flops(model):
    return lambda batch, out: full_model_flops(model, batch["attention_mask"])


def _forward(model, pyramid: bool = False):
    """`call(batch)` running `model`; for a torch Magic Pyramid model the accuracy pass also asks for its FLOPs."""
    call = _ForwardCall(model)
    call.accepts_output_flops = pyramid
    return call


def compile_layers(model, backend: str = "inductor"):
    """A copy of `model` whose layer modules run under torch.compile(dynamic=True): batch and sequence sizes vary
    from call to call (samples exit, tokens are pruned), so static shapes would recompile on every new shape."""
    compiled = copy.deepcopy(model)
    seen = set()
    for layer in compiled.layers:
        if id(layer) not in seen:  # albert shares layer modules
            layer.compile(dynamic=True, backend=backend)
            seen.add(id(layer))
    return compiled


def _stock_source(model_dir: Path, stock: str | None) -> str | None:
    return stock or _stock_model_for(model_dir)


def build_lines(model_dir, stock_path, slender, wanted, work_dir, compile_backend: str = "inductor", log=print) -> tuple[list[Line], Any, Any]:
    """The lines to measure (skipped ones carry their reason), the pyramid and the stock model."""
    from .onnx_loop import OnnxPyramid, OnnxStock, onnx_missing, weights_on_disk

    model_dir = Path(model_dir)
    pyramid = MagicPyramidForSequenceClassification.from_pretrained(str(model_dir)).eval()
    if stock_path:
        stock = AutoModelForSequenceClassification.from_pretrained(str(stock_path)).eval()
        stock_note = f"from {stock_path}"
        stock_bytes = _folder_bytes(stock_path)
    else:
        stock = copy.deepcopy(pyramid.backbone).eval()
        stock_note = "no stock model recorded: the pyramid's own backbone weights, run as a stock model"
        stock_bytes = _state_bytes(stock)
    onnx_reason = onnx_missing()
    lines = []

    def add(key, build):
        if key not in wanted:
            return
        line = Line(key)
        try:
            build(line)
        except Exception as error:  # noqa: BLE001 - a line that cannot be built is reported, not fatal
            line.skipped = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            log(f"bench: {key} skipped: {line.skipped}")
        lines.append(line)

    def stock_line(line):
        line.call, line.flops = _forward(stock), _stock_flops(stock)
        line.parameters, line.disk_bytes, line.note = _parameters(stock), stock_bytes, stock_note

    def stock_int8(line):
        quantized = quantize_model(stock)
        line.call, line.flops = _forward(quantized), _stock_flops(stock)
        line.parameters, line.disk_bytes = _parameters(stock), _state_bytes(quantized)

    def stock_compiled(line):
        compiled = torch.compile(copy.deepcopy(stock), dynamic=True, backend=compile_backend)
        line.call, line.flops = _forward(compiled), _stock_flops(stock)
        line.parameters, line.disk_bytes = _parameters(stock), stock_bytes
        line.note = f"backend {compile_backend}"

    def stock_ort(quantize):
        def build(line):
            if onnx_reason:
                raise ImportError(onnx_reason)
            runner = OnnxStock(stock, Path(work_dir) / "stock_onnx", quantize=quantize)
            line.call, line.flops = _forward(runner), _stock_flops(stock)
            line.parameters, line.disk_bytes = _parameters(stock), runner.path.stat().st_size
        return build

    def pyramid_line(line):
        line.call, line.flops = _forward(pyramid, pyramid=True), _pyramid_flops(pyramid)
        line.parameters, line.disk_bytes = _parameters(pyramid), _folder_bytes(model_dir)
        line.note = _speed_note(pyramid.config)

    def pyramid_int8(line):
        quantized = quantize_model(pyramid)
        setting = quantized_default(model_dir, "int8")
        if setting is not None:
            quantized.set_speed(**setting)
            line.note = _speed_note(quantized.config) + " (calibrated for int8)"
        else:
            line.note = _speed_note(quantized.config) + " (the fp32 default: no calibration_int8.json, run sweep --quantize int8)"
        line.call, line.flops = _forward(quantized, pyramid=True), _pyramid_flops(quantized)
        line.parameters, line.disk_bytes = _parameters(pyramid), _state_bytes(quantized)

    def pyramid_compiled(line):
        compiled = compile_layers(pyramid, compile_backend)
        line.call, line.flops = _forward(compiled, pyramid=True), _pyramid_flops(compiled)
        line.parameters, line.disk_bytes = _parameters(pyramid), _folder_bytes(model_dir)
        line.note = _speed_note(pyramid.config) + f", backend {compile_backend}"

    def pyramid_ort(quantize):
        def build(line):
            if onnx_reason:
                raise ImportError(onnx_reason)
            folder = Path(work_dir) / "pyramid_onnx"
            runner = OnnxPyramid(pyramid, folder, quantize=quantize)
            line.call, line.flops = _forward(runner), _pyramid_flops(pyramid)
            line.parameters, line.disk_bytes = _parameters(pyramid), weights_on_disk(folder, quantize)
            line.note = _speed_note(pyramid.config) + ("" if quantize is None else " (the fp32 default)")
        return build

    def slender_line(line):
        model = AutoModelForSequenceClassification.from_pretrained(str(slender)).eval()
        is_pyramid = hasattr(model, "exit_layers")
        line.call = _forward(model, pyramid=is_pyramid)
        line.flops = _pyramid_flops(model) if is_pyramid else _stock_flops(model)
        line.parameters, line.disk_bytes = _parameters(model), _folder_bytes(slender)
        line.note = _speed_note(model.config) if is_pyramid else f"from {slender}"

    add("stock", stock_line)
    add("stock_int8", stock_int8)
    add("stock_compiled", stock_compiled)
    add("stock_ort", stock_ort(None))
    add("stock_ort_int8", stock_ort("int8"))
    add("pyramid", pyramid_line)
    add("pyramid_int8", pyramid_int8)
    add("pyramid_compiled", pyramid_compiled)
    add("pyramid_ort", pyramid_ort(None))
    add("pyramid_ort_int8", pyramid_ort("int8"))
    if slender:
        add("slender", slender_line)
    return lines, pyramid, stock


def _speed_note(config) -> str:
    knob = "patience" if config.exit_criterion == "patience" else "exit_threshold"
    value = getattr(config, knob)
    parts = [f"{knob}={'never' if value is None else value}"]
    if config.token_pruning == "topk":
        parts.append(f"keep_ratio_scale={config.keep_ratio_scale}")
    elif config.token_pruning == "threshold":
        parts.append(f"prune_threshold_offset={config.prune_threshold_offset}")
    return ", ".join(parts)


def _predictions(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@torch.inference_mode()
def run_bench(
    model_dir,
    dataset,
    *,
    stock: str | None = None,
    slender: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    batch_sizes=(1, 32),
    max_length: int = 128,
    max_samples: int | None = None,
    latency_samples: int = 100,
    rounds: int = 3,
    lines=LINES,
    output_dir=None,
    dataset_name: str = "",
    threads: int | None = None,
    compile_backend: str = "inductor",
    seed: int = 42,
    log=print,
) -> dict:
    """Measure every line on `dataset` (text + label columns); write bench.json / bench.md / bench.png into
    `output_dir` (default: `<model_dir>/bench`). Returns the report dict."""
    from tqdm.auto import tqdm

    from .data import prepare_dataset

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json: pass the folder of a trained Magic Pyramid model (--model).")
    unknown = [name for name in lines if name not in LINES]
    if unknown:
        raise ValueError(f"Unknown bench line(s) {unknown}: choose from {', '.join(LINES)}.")
    if "stock" not in lines:
        lines = ("stock", *lines)  # the reference of every comparison
    if threads:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir) if output_dir else model_dir / "bench"
    output_dir.mkdir(parents=True, exist_ok=True)
    stock_path = _stock_source(model_dir, stock)
    work = tempfile.TemporaryDirectory(prefix="hf-magicpyramid-bench-")
    try:
        built, pyramid, stock_model = build_lines(model_dir, stock_path, slender, lines, work.name, compile_backend, log=log)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        encoded = prepare_dataset(
            dataset, tokenizer, dict(pyramid.config.label2id), text_column=text_column, text_pair_column=text_pair_column,
            label_column=label_column, max_length=max_length, split="test", max_samples=max_samples, seed=seed,
        )
        labels = torch.tensor(encoded["labels"])
        num_samples = len(labels)
        big_sizes = sorted({int(b) for b in batch_sizes if int(b) > 1})
        batches = {size: _batches(encoded, tokenizer, size) for size in big_sizes}
        columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in encoded.column_names]
        singles = [{c: torch.tensor([encoded[i][c]]) for c in columns} for i in range(min(latency_samples, num_samples))] \
            if 1 in batch_sizes else []
        accuracy_batches = batches[big_sizes[-1]] if big_sizes else _batches(encoded, tokenizer, 32)
        active = [line for line in built if line.skipped is None]

        # Accuracy and FLOPs (also the warm-up: compilation and ONNX Runtime's first-run allocations happen here).
        for line in tqdm(active, desc="bench: accuracy and FLOPs", unit="line"):
            try:
                start = time.perf_counter()
                predictions, flops = [], []
                for batch in accuracy_batches:
                    out = _call_with_flops(line, batch)
                    predictions.append(_predictions(out.logits))
                    flops.append(line.flops(batch, out).double())
                line.results["first_pass_seconds"] = round(time.perf_counter() - start, 3)
                if line.key.endswith("_compiled"):  # compilation happens in this first pass, not in the timed rounds
                    line.note += f"; compiling took about {line.results['first_pass_seconds']:.0f} s"
                line.results["_correct"] = (torch.cat(predictions) == labels)
                line.results["mean_flops"] = float(torch.cat(flops).mean())
                for single in singles[:2]:
                    line.call(single)
            except Exception as error:  # noqa: BLE001 - e.g. torch.compile failing on this machine
                line.skipped = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
                log(f"bench: {line.key} skipped: {line.skipped}")
        active = [line for line in active if line.skipped is None]
        if not any(line.key == "stock" for line in active):
            raise RuntimeError("bench: the stock line failed, so nothing can be compared: " + str(built[0].skipped))

        # Timing: interleaved rounds, every line in turn within a round.
        pass_seconds = {line.key: {size: [] for size in big_sizes} for line in active}
        single_seconds = {line.key: [[] for _ in singles] for line in active}
        progress = tqdm(total=rounds * len(active), desc="bench: timing rounds", unit="line")
        for round_index in range(rounds):
            order = active[round_index % len(active):] + active[: round_index % len(active)]  # rotate the order
            for line in order:
                for size in big_sizes:
                    start = time.perf_counter()
                    for batch in batches[size]:
                        line.call(batch)
                    pass_seconds[line.key][size].append(time.perf_counter() - start)
                for index, single in enumerate(singles):
                    start = time.perf_counter()
                    line.call(single)
                    single_seconds[line.key][index].append(time.perf_counter() - start)
                progress.update(1)
        progress.close()

        stock_line = next(line for line in active if line.key == "stock")
        stock_correct = stock_line.results["_correct"]
        for line in active:
            results = line.results
            correct = results.pop("_correct")
            difference, half_width = paired_difference(correct, stock_correct)
            results["accuracy"] = round(float(correct.double().mean() * 100), 3)
            results["difference"] = round(difference, 3)
            results["difference_interval"] = round(half_width, 3)
            for size in big_sizes:
                results[f"samples_per_second_batch{size}"] = round(num_samples / statistics.median(pass_seconds[line.key][size]), 2)
            if singles:
                per_sample = [statistics.median(times) for times in single_seconds[line.key]]
                results["latency_ms_batch1_median"] = round(1000 * statistics.median(per_sample), 3)
                results["latency_ms_batch1_p90"] = round(1000 * _quantile(per_sample, 0.9), 3)
        reference = stock_line.results
        for line in active:
            results = line.results
            for size in big_sizes:
                key = f"samples_per_second_batch{size}"
                results[f"speedup_batch{size}"] = round(results[key] / reference[key], 3)
            if singles:
                results["speedup_batch1"] = round(reference["latency_ms_batch1_median"] / results["latency_ms_batch1_median"], 3)
            results["flops_ratio"] = round(results["mean_flops"] / reference["mean_flops"], 4)
    finally:
        work.cleanup()

    report = {
        "header": _header(dataset_name, num_samples, max_length, rounds, batch_sizes, len(singles), model_dir, stock_path),
        "batch_sizes": sorted({int(b) for b in batch_sizes}),
        "lines": [
            {"line": line.key, "label": LABELS[line.key], "parameters": line.parameters, "disk_bytes": line.disk_bytes,
             "note": line.note, "skipped": line.skipped, **({} if line.skipped else line.results)}
            for line in built
        ],
    }
    report["targets"] = check_targets(report)
    report["output_dir"] = str(output_dir)
    write_report(report, output_dir)
    log(format_markdown(report))
    return report


def _call_with_flops(line: Line, batch):
    """The accuracy pass: a torch Magic Pyramid line also returns its per-sample FLOPs (a little bookkeeping, not timed)."""
    if getattr(line.call, "accepts_output_flops", False):
        return line.call(batch, output_flops=True)
    return line.call(batch)


class _ForwardCall:
    """`model(**batch)`; `accepts_output_flops` marks the torch Magic Pyramid lines."""

    accepts_output_flops = False

    def __init__(self, model):
        self.model = model

    def __call__(self, batch, **extra):
        return self.model(**batch, **extra)


def _header(dataset_name, num_samples, max_length, rounds, batch_sizes, latency_samples, model_dir, stock_path) -> dict:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    versions = {"torch": torch.__version__}
    for name in ("transformers", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores",
        "load_average_1_5_15min": load,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "dataset": dataset_name,
        "num_samples": num_samples,
        "latency_samples": latency_samples,
        "max_length": max_length,
        "rounds": rounds,
        "model": str(model_dir),
        "stock_model": None if stock_path is None else str(stock_path),
    }


# The targets: (reference line, factor, batch sizes it applies to: "all" or 1).
TARGETS = (("stock_int8", 1.5, "all"), ("stock_ort_int8", 1.0, 1))
TARGET_ACCURACY_POINTS = 1.0


def check_targets(report: dict) -> list[dict]:
    """Whether the fastest Magic Pyramid line within 1 accuracy point of the stock model beats int8 alone by 1.5x (at
    batch 1 and at the largest batch) and ONNX Runtime int8 alone at batch 1; by how much each is met or missed."""
    lines = {line["line"]: line for line in report["lines"] if not line["skipped"]}
    sizes = [1] if 1 in report["batch_sizes"] else []
    sizes += [max(report["batch_sizes"])] if max(report["batch_sizes"]) > 1 else []
    candidates = [line for key, line in lines.items()
                  if key.startswith("pyramid") and line["difference"] >= -TARGET_ACCURACY_POINTS - 1e-9]
    results = []
    for reference, factor, applies in TARGETS:
        for size in sizes if applies == "all" else [s for s in sizes if s == applies]:
            key = f"speedup_batch{size}"
            target = {"target": f"fastest Magic Pyramid line (within {TARGET_ACCURACY_POINTS:g} point of stock) at least "
                                f"{factor:g}x {LABELS[reference]} at batch {size}"}
            if reference not in lines or not candidates:
                why = f"{LABELS[reference]} was not measured" if reference not in lines else \
                    f"no Magic Pyramid line is within {TARGET_ACCURACY_POINTS:g} point of the stock accuracy"
                results.append({**target, "met": None, "why": why})
                continue
            best = max(candidates, key=lambda line: line[key])
            ratio = best[key] / lines[reference][key]
            results.append({**target, "best_line": best["label"], "ratio": round(ratio, 3), "met": ratio >= factor,
                            "why": f"{best['label']} is {ratio:.2f}x {LABELS[reference]} (needs {factor:g}x"
                                   f"{'' if ratio >= factor else f': {(1 - ratio / factor) * 100:.0f}% short'}); its FLOPs ratio "
                                   f"to stock is {best['flops_ratio']:.3f}, its speedup over stock {best[key]:.2f}x"})
    return results


def format_markdown(report: dict) -> str:
    header = report["header"]
    sizes = [b for b in report["batch_sizes"] if b > 1]
    has_single = 1 in report["batch_sizes"]
    load = header["load_average_1_5_15min"]
    lines = [
        f"# bench: {header['dataset']} ({header['num_samples']} samples, max length {header['max_length']})",
        "",
        f"{header['date']}; {header['machine']}; load average {load} (1/5/15 min); {header['torch_threads']} torch threads; "
        f"{header['rounds']} interleaved rounds; " + ", ".join(f"{k} {v}" for k, v in header["versions"].items() if v),
        f"model: {header['model']}; stock: {header['stock_model'] or 'the pyramid backbone'}",
        "",
    ]
    columns = ["line", "accuracy %", "vs stock (pt, 95%)"]
    if has_single:
        columns += ["batch 1 ms (median / p90)", "batch 1 speedup"]
    for size in sizes:
        columns += [f"batch {size} samples/s", f"batch {size} speedup"]
    columns += ["mean MFLOPs", "FLOPs ratio", "params (M)", "disk (MB)", "notes"]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for line in report["lines"]:
        if line["skipped"]:
            cells = [line["label"]] + ["-"] * (len(columns) - 2) + [f"skipped: {line['skipped']}"]
        else:
            cells = [line["label"], f"{line['accuracy']:.2f}", f"{line['difference']:+.2f} ± {line['difference_interval']:.2f}"]
            if has_single:
                cells += [f"{line['latency_ms_batch1_median']:.2f} / {line['latency_ms_batch1_p90']:.2f}", f"{line['speedup_batch1']:.2f}x"]
            for size in sizes:
                cells += [f"{line[f'samples_per_second_batch{size}']:.1f}", f"{line[f'speedup_batch{size}']:.2f}x"]
            cells += [f"{line['mean_flops'] / 1e6:.1f}", f"{line['flops_ratio']:.3f}",
                      f"{line['parameters'] / 1e6:.2f}" if line["parameters"] else "-",
                      f"{line['disk_bytes'] / 1e6:.1f}" if line["disk_bytes"] else "-", line["note"] or ""]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    lines += ["", "Speedups are against the stock fp32 line in the same run; accuracy differences are paired over the same "
              "samples (95% half-width). A compiled or int8 line counts the FLOPs of the operations it runs in fp32."]
    if report.get("targets"):
        lines += ["", "Targets:"]
        for target in report["targets"]:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
            lines.append(f"- {target['target']}: {verdict}. {target['why']}.")
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    markers = {1: "o"}
    for size in report["batch_sizes"]:
        key = "speedup_batch1" if size == 1 else f"speedup_batch{size}"
        points = [line for line in report["lines"] if not line["skipped"] and key in line]
        if not points:
            continue
        axis.errorbar([p["difference"] for p in points], [p[key] for p in points],
                      xerr=[p["difference_interval"] for p in points], fmt=markers.get(size, "s"), capsize=3,
                      label=f"batch {size}", alpha=0.8)
        for p in points:
            axis.annotate(p["label"], (p["difference"], p[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.axvline(0.0, color="grey", linewidth=0.8)
    axis.set_xlabel("accuracy change vs stock (points, paired 95%)")
    axis.set_ylabel("speedup over stock fp32 (wall clock)")
    header = report["header"]
    axis.set_title(f"{header['dataset']}: {header['num_samples']} samples, load {header['load_average_1_5_15min']}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(report: dict, output_dir) -> dict[str, Path]:
    output_dir = Path(output_dir)
    paths = {"json": output_dir / BENCH_JSON, "markdown": output_dir / BENCH_MD, "png": output_dir / BENCH_PNG}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(format_markdown(report) + "\n", encoding="utf-8")
    try:
        plot_report(report, paths["png"])
    except ImportError:
        paths.pop("png")
    return paths


__all__ = ["LINES", "run_bench", "format_markdown", "plot_report", "write_report", "build_lines", "compile_layers",
           "check_targets"]
