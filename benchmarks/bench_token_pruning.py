"""Token pruning on CPU (issue 4): do fewer tokens per layer really save what the FLOPs say?

A bert-base-sized random model (BertConfig() defaults, num_labels=2) against the same model converted with
`MagicPyramidForSequenceClassification.from_backbone(stock, token_pruning="topk", keep_ratios=..., exit_layers=[12])`
(no intermediate exits, so only pruning is measured), with fixed keep schedules:

- pyramid: the default, layer 1 sees every token, the kept share falls linearly to 0.5 at layer 12;
- aggressive: the same pyramid down to 0.2;
- once: layers 1-2 see every token, layers 3-12 the best half (pruned once, after layer 2).

Importance `cls_attention` under sdpa (recomputed from the q/k projections) against the stock model under sdpa, and
`mean_attention` under eager (read from the attention probabilities) against the stock model under eager. Every
layer's kept-token count is checked against ceil(keep_ratio · length).

Speedup = stock time / candidate time (median over interleaved rounds); FLOP speedup = stock FLOPs / FLOPs actually
run (`hf_magicpyramid.flops`, importance scores included); efficiency = speedup / FLOP speedup.

    python benchmarks/bench_token_pruning.py --threads 1  # full run, about 15 minutes on 2 cores
    python benchmarks/bench_token_pruning.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_arguments,
    flops_of_run,
    load_average,
    machine_info,
    markdown_table,
    random_batch,
    speed_cells,
    same_weights_other_attention,
    stock_bert,
    time_interleaved,
    write_results,
)

from hf_magicpyramid import MagicPyramidForSequenceClassification  # noqa: E402
from hf_magicpyramid.configuration_magic_pyramid import default_keep_ratios  # noqa: E402

NUM_LAYERS = 12
SCHEDULES = {
    "pyramid 1.0→0.5": default_keep_ratios(NUM_LAYERS, 0.5),
    "aggressive 1.0→0.2": default_keep_ratios(NUM_LAYERS, 0.2),
    "once after layer 2 → 0.5": [1.0, 1.0] + [0.5] * (NUM_LAYERS - 2),
}
EAGER_SCHEDULES = ("pyramid 1.0→0.5",)
OFF_ROW_MAX_TOKENS = 8192  # the "pruning off" overhead row only where a forward is cheap (batch × seq_len)


def build_candidates(stock_sdpa, stock_eager, batch_size, seq_len, eager):
    """name → (model, baseline name, keep ratios or None)."""
    convert = MagicPyramidForSequenceClassification.from_backbone
    candidates = {"stock sdpa": (stock_sdpa, "stock sdpa", None)}
    if batch_size * seq_len <= OFF_ROW_MAX_TOKENS:
        candidates["pruning off (sdpa)"] = (convert(stock_sdpa, exit_layers=[NUM_LAYERS]).eval(), "stock sdpa", [1.0] * NUM_LAYERS)
    for name, ratios in SCHEDULES.items():
        model = convert(stock_sdpa, exit_layers=[NUM_LAYERS], token_pruning="topk", keep_ratios=ratios, token_importance="cls_attention")
        candidates[f"{name}, cls_attention (sdpa)"] = (model.eval(), "stock sdpa", ratios)
    if eager:
        candidates["stock eager"] = (stock_eager, "stock eager", None)
        for name in EAGER_SCHEDULES:
            ratios = SCHEDULES[name]
            model = convert(stock_eager, exit_layers=[NUM_LAYERS], token_pruning="topk", keep_ratios=ratios, token_importance="mean_attention")
            candidates[f"{name}, mean_attention (eager)"] = (model.eval(), "stock eager", ratios)
    return candidates


def expected_kept(ratios, length: int) -> list[int]:
    return [max(1, math.ceil(length * ratio - 1e-9)) for ratio in ratios]


def run_setting(stock_sdpa, stock_eager, seq_len, batch_size, repeats, warmup, seed, eager, log):
    input_ids, attention_mask = random_batch(batch_size, seq_len, seed=seed)
    candidates = build_candidates(stock_sdpa, stock_eager, batch_size, seq_len, eager)

    checks = {}
    with torch.inference_mode():
        for name, (model, baseline, ratios) in candidates.items():
            if ratios is None:
                continue
            output = model(input_ids=input_ids, attention_mask=attention_mask)
            kept = output.kept_tokens
            expected = torch.tensor(expected_kept(ratios, seq_len)).expand_as(kept)
            if not torch.equal(kept.cpu(), expected):
                raise AssertionError(f"{name}: kept tokens {kept[0].tolist()} differ from the schedule {expected[0].tolist()}")
            stock = candidates[baseline][0]
            checks[name] = dict(
                flops=flops_of_run(model, stock, output, attention_mask),
                kept_tokens=kept[0].tolist(),
                mean_kept_share=float(kept.float().mean() / seq_len),
            )

    calls = {
        name: (lambda model=model: model(input_ids=input_ids, attention_mask=attention_mask))
        for name, (model, _, _) in candidates.items()
    }
    started = time.perf_counter()
    timing = time_interleaved(calls, repeats, warmup=warmup, seed=seed, progress=log)
    elapsed = time.perf_counter() - started

    rows = []
    for name, (_, baseline, _) in candidates.items():
        entry = dict(name=name, baseline=baseline, median_s=timing.median(name), min_s=timing.minimum(name), times_s=timing.times[name], cpu_times_s=timing.cpu_times[name])
        if name != baseline:
            speedup = timing.paired_speedup(baseline, name)
            flops = checks[name]["flops"]
            flop_speedup = flops["full"] / flops["actual"]
            entry.update(
                checks[name],
                speedup=speedup,
                speedup_iqr=timing.spread(baseline, name),
                cpu_speedup=timing.cpu_speedup(baseline, name),
                speedup_min=timing.min_speedup(baseline, name),
                flop_speedup=flop_speedup,
                efficiency=speedup / flop_speedup,
                efficiency_min=timing.min_speedup(baseline, name) / flop_speedup,
            )
        rows.append(entry)
    return dict(seq_len=seq_len, batch_size=batch_size, repeats=repeats, seconds=elapsed, load_average_end=load_average(), rows=rows)


def layer_scaling(stock, token_counts, batch_size: int, repeats: int, seed: int) -> list[dict]:
    """Per-layer time of the stock layers on `n` tokens per sample (all 12 layers in turn, so weights stream from memory
    as in a forward), against the FLOP ratio to the first count: where fewer tokens stop paying what the FLOPs say."""
    from hf_magicpyramid.flops import layer_flops

    config = stock.config
    layers = stock.bert.encoder.layer
    head_dim = config.hidden_size // config.num_attention_heads
    calls = {}
    for n in token_counts:
        hidden = torch.randn(batch_size, n, config.hidden_size, generator=torch.Generator().manual_seed(seed))

        def run(hidden=hidden):
            for layer in layers:
                layer(hidden, None)

        calls[n] = run
    timing = time_interleaved(calls, repeats, warmup=1, seed=seed)
    first = token_counts[0]
    rows = []
    for n in token_counts:
        flops = layer_flops(config.hidden_size, config.num_attention_heads, head_dim, config.intermediate_size, n)
        first_flops = layer_flops(config.hidden_size, config.num_attention_heads, head_dim, config.intermediate_size, first)
        per_layer = statistics.median(timing.cpu_times[n]) / len(layers)
        speedup = statistics.median(timing.cpu_times[first]) / statistics.median(timing.cpu_times[n])
        rows.append(
            dict(
                tokens=n,
                per_layer_cpu_ms=per_layer * 1e3,
                speedup=speedup,
                flop_speedup=first_flops / flops,
                efficiency=speedup / (first_flops / flops),
                gflops_per_s=batch_size * flops / per_layer / 1e9,
            )
        )
    return rows


def scaling_table(rows: list[dict]) -> str:
    headers = ["tokens per sample", "CPU ms per layer", "speedup vs first", "FLOP speedup", "efficiency", "GFLOP/s"]
    return markdown_table(
        headers,
        [[r["tokens"], r["per_layer_cpu_ms"], r["speedup"], r["flop_speedup"], r["efficiency"], r["gflops_per_s"]] for r in rows],
    )


def table(setting: dict) -> str:
    headers = ["model", "vs", "mean kept share", "ms (median)", "speedup", "speedup IQR", "CPU-time speedup", "FLOP speedup", "efficiency", "efficiency (CPU time)"]
    out = []
    for row in setting["rows"]:
        if row["name"] == row["baseline"]:
            out.append([row["name"], "", 1.0, row["median_s"] * 1e3, 1.0, "", 1.0, 1.0, "", ""])
            continue
        out.append([row["name"], row["baseline"], row["mean_kept_share"], *speed_cells(row)])
    return markdown_table(headers, out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_repeats=15)
    parser.add_argument("--repeats-large", type=int, default=7, help="timed rounds when batch × seq_len ≥ 2048")
    parser.add_argument("--repeats-huge", type=int, default=3, help="timed rounds when batch × seq_len ≥ 8192 (batch 32 at seq 512)")
    parser.add_argument("--seq-lens", default="512,128", help="comma-separated sequence lengths")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager / mean_attention rows")
    parser.add_argument(
        "--layer-scaling",
        default=None,
        help="instead of the schedules: time the stock layers on these token counts per sample (comma-separated, e.g. "
        "128,96,64,48,32,26,16) at each batch size, to see where fewer tokens stop paying",
    )
    args = parser.parse_args(argv)
    seq_lens = [int(v) for v in args.seq_lens.split(",")]
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.repeats_large = min(args.repeats_large, 2)
        args.repeats_huge = min(args.repeats_huge, 1)
        args.batch_sizes = [1, 4]
        seq_lens = [256]
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message):
        print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    info = machine_info()
    print(f"# token pruning: {info['cpu']}, {info['logical_cpus']} CPUs, {info['torch_threads']} torch threads, "
          f"torch {info['torch']}, transformers {info['transformers']}, load {info.get('load_average_start')}")
    stock_sdpa = stock_bert("sdpa", seed=args.seed)
    stock_eager = None if args.no_eager else same_weights_other_attention(stock_sdpa, "eager")
    if args.layer_scaling:
        counts = [int(v) for v in args.layer_scaling.split(",")]
        scaling = {}
        for batch_size in args.batch_sizes:
            log(f"layer scaling, batch {batch_size}: {args.repeats} rounds")
            scaling[batch_size] = layer_scaling(stock_sdpa, counts, batch_size, args.repeats, args.seed)
            print(f"\n### stock layers (sdpa) by tokens per sample, batch {batch_size} ({args.repeats} rounds, CPU time)\n")
            print(scaling_table(scaling[batch_size]), flush=True)
        payload = dict(benchmark="layer_scaling", machine=info, argv=sys.argv[1:], batches=scaling)
        path = write_results(args.output or "layer_scaling.json", payload)
        print(f"\nresults written to {path}")
        return payload
    settings = []
    for seq_len in seq_lens:
        for batch_size in args.batch_sizes:
            tokens = batch_size * seq_len
            repeats = args.repeats_huge if tokens >= 8192 else args.repeats_large if tokens >= 2048 else args.repeats
            log(f"seq {seq_len}, batch {batch_size}: {repeats} rounds")
            setting = run_setting(stock_sdpa, stock_eager, seq_len, batch_size, repeats, args.warmup, args.seed, not args.no_eager, log)
            settings.append(setting)
            print(f"\n### seq {seq_len}, batch {batch_size} ({repeats} rounds, load at end {setting['load_average_end']})\n")
            print(table(setting), flush=True)
    payload = dict(benchmark="token_pruning", schedules=SCHEDULES, machine=info, argv=sys.argv[1:], settings=settings)
    path = write_results(args.output or ("token_pruning_quick.json" if args.quick else "token_pruning.json"), payload)
    print(f"\nresults written to {path}")
    return payload


if __name__ == "__main__":
    main()
