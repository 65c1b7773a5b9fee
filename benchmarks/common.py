"""Shared helpers of the CPU benchmarks: models, inputs, interleaved timing, FLOP counts, tables and result files.

Timing is built for a shared, noisy machine: every candidate runs once per round, in a fresh random order each
round, so that load from other processes hits all candidates alike; each candidate's speed is reported as the median,
over rounds, of (baseline time in that round / candidate time in that round), next to the ratio of the fastest times.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------------------------------


def stock_bert(attn_implementation: str = "sdpa", num_labels: int = 2, seed: int = 0, **config_overrides):
    """A randomly initialised bert-base-sized `BertForSequenceClassification` (BertConfig() defaults: 12 layers,
    hidden 768, 12 heads, FFN 3072), in eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(num_labels=num_labels, **config_overrides)
    model = BertForSequenceClassification._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def same_weights_other_attention(model, attn_implementation: str):
    """A copy of a stock model running another attention implementation (same weights)."""
    import copy

    twin = copy.deepcopy(model)
    twin.set_attn_implementation(attn_implementation)
    return twin.eval()


def random_batch(batch_size: int, seq_len: int, vocab_size: int = 30522, seed: int = 0):
    """(input_ids, attention_mask), both (batch_size, seq_len); every token real (no padding), [CLS] first."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (batch_size, seq_len), generator=generator)
    input_ids[:, 0] = 101  # [CLS]
    input_ids[:, -1] = 102  # [SEP]
    return input_ids, torch.ones_like(input_ids)


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per call of each candidate, one entry per round (rounds interleave the candidates)."""

    times: dict[str, list[float]] = field(default_factory=dict)
    cpu_times: dict[str, list[float]] = field(default_factory=dict)  # process CPU seconds (all threads) per call

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def minimum(self, name: str) -> float:
        return min(self.times[name])

    def paired_speedup(self, baseline: str, name: str) -> float:
        """Median over rounds of baseline time / candidate time, both from the same round."""
        return statistics.median(b / c for b, c in zip(self.times[baseline], self.times[name]))

    def min_speedup(self, baseline: str, name: str) -> float:
        """Fastest baseline time / fastest candidate time: the least disturbed run of each."""
        return self.minimum(baseline) / self.minimum(name)

    def cpu_speedup(self, baseline: str, name: str) -> float:
        """Median baseline CPU time / median candidate CPU time: the work done, blind to time spent descheduled (but
        counting the threads' spin-waits)."""
        return statistics.median(self.cpu_times[baseline]) / statistics.median(self.cpu_times[name])

    def spread(self, baseline: str, name: str) -> tuple[float, float]:
        """(25th, 75th) percentiles of the per-round speedups."""
        ratios = sorted(b / c for b, c in zip(self.times[baseline], self.times[name]))
        if len(ratios) < 4:
            return ratios[0], ratios[-1]
        quartiles = statistics.quantiles(ratios, n=4)
        return quartiles[0], quartiles[2]


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Timing:
    """Run every candidate `warmup` times, then `repeats` rounds of one call each, in a shuffled order per round.

    Candidates are zero-argument callables (run under `torch.inference_mode()` by the caller or here).
    """
    order = list(candidates)
    rng = random.Random(seed)
    timing = Timing({name: [] for name in order}, {name: [] for name in order})
    with torch.inference_mode():
        for _ in range(warmup):
            for name in order:
                candidates[name]()
        for round_index in range(repeats):
            rng.shuffle(order)
            for name in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                candidates[name]()
                timing.times[name].append(time.perf_counter() - start)
                timing.cpu_times[name].append(time.process_time() - start_cpu)
            if progress is not None:
                progress(f"round {round_index + 1}/{repeats} done")
    return timing


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------------


def flops_of_run(pyramid, stock, output, attention_mask) -> dict:
    """Per-batch FLOPs from `hf_magicpyramid.flops`: `full` (the stock model on every sample's real tokens) and
    `actual` (what the pyramid model ran, exit heads and importance scoring included)."""
    from hf_magicpyramid.exits import exit_rule_can_fire
    from hf_magicpyramid.flops import full_model_flops, sample_flops

    config = pyramid.config
    heads_ran = exit_rule_can_fire(config.exit_criterion, config.exit_threshold, config.patience, config.problem_type)
    full = full_model_flops(stock, attention_mask).sum()
    actual = sample_flops(pyramid, output.kept_tokens, output.exit_layer, count_exit_heads=heads_ran).sum()
    return {"full": float(full), "actual": float(actual), "source": "hf_magicpyramid.flops"}


# ---------------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import transformers

    info = {
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def speed_cells(row: dict) -> list:
    """The timing columns every speed table shares: ms, speedup, its IQR, CPU-time speedup, FLOP speedup, efficiencies."""
    low, high = row["speedup_iqr"]
    return [
        row["median_s"] * 1e3,
        row["speedup"],
        f"{low:.2f}–{high:.2f}",
        row["cpu_speedup"],
        row["flop_speedup"],
        row["efficiency"],
        row["cpu_speedup"] / row["flop_speedup"],
    ]


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            if math.isnan(value):
                return "–"
            return f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    if not path.is_absolute() and path.parent == Path("."):
        path = RESULTS_DIR / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def parse_int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_common_arguments(parser, default_repeats: int) -> None:
    parser.add_argument("--repeats", type=int, default=default_repeats, help="timed rounds per setting (large settings use --repeats-large)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of every candidate before the rounds")
    parser.add_argument("--batch-sizes", type=parse_int_list, default=[1, 32], help="comma-separated, e.g. 1,32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, all cores)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: tiny repeats, small batches")
    parser.add_argument("--output", default=None, help="JSON file (default: benchmarks/results/<name>.json)")
    parser.add_argument("--seed", type=int, default=0)


__all__ = [
    "Timing",
    "add_common_arguments",
    "flops_of_run",
    "load_average",
    "machine_info",
    "markdown_table",
    "random_batch",
    "same_weights_other_attention",
    "stock_bert",
    "time_interleaved",
    "write_results",
]
