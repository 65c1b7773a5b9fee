"""Early exit on CPU (issue 3): does leaving the batch at layer k really save what the FLOPs say?

A bert-base-sized random model (BertConfig() defaults, num_labels=2, sdpa) against the same model converted with
`MagicPyramidForSequenceClassification.from_backbone`:

- exits off: no intermediate exit heads (the Magic Pyramid loop's own overhead), and a converted model's default
  (a head after every layer, exit_threshold=None: the heads run but nobody leaves);
- exit forced at layer k: exit_layers=[k], exit_criterion="entropy", exit_threshold=1.0 (normalised entropy < 1 holds
  unless the logits are exactly uniform); every sample's `exit_layer` is checked to be k;
- mixed exits (batch > 1): exit_layers=[3, 6, 9], threshold 0.5, and exit heads whose classifier is solved (least
  squares on the layer's pooled states) so that chosen samples are confident at their planned layer and exactly
  uncertain (logit margin 0) elsewhere: a third leave at each of 3, 6, 9 ("thirds"), or a quarter at each of 3, 6, 9, 12
  ("quarters"). The planned layers are checked against `exit_layer`.

Speedup = stock time / candidate time (median over interleaved rounds); FLOP speedup = stock FLOPs / FLOPs actually run
(`hf_magicpyramid.flops`); efficiency = speedup / FLOP speedup.

    python benchmarks/bench_early_exit.py --threads 1     # full run, about 6 minutes on 2 cores
    python benchmarks/bench_early_exit.py --quick         # smoke run (under a minute)
"""

from __future__ import annotations

import argparse
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
    stock_bert,
    time_interleaved,
    write_results,
)

from hf_magicpyramid import MagicPyramidForSequenceClassification  # noqa: E402
from hf_magicpyramid.exits import pool  # noqa: E402

MIXED_PLANS = {
    "thirds": (3, 6, 9),  # a third of the batch leaves at each
    "quarters": (3, 6, 9, 12),  # a quarter at each, the last quarter runs every layer
}
MIXED_EXIT_LAYERS = [3, 6, 9]
MIXED_THRESHOLD = 0.5
CONFIDENT_MARGIN = 20.0  # logit margin of a sample planned to leave: normalised entropy ≈ 3e-8


def planned_exit_layers(batch_size: int, layers: tuple[int, ...], seed: int) -> torch.Tensor:
    """(batch,) planned exit layer of each sample: equal shares of `layers`, in a random order over the batch."""
    plan = torch.tensor([layers[i * len(layers) // batch_size] for i in range(batch_size)])
    return plan[torch.randperm(batch_size, generator=torch.Generator().manual_seed(seed))]


@torch.no_grad()
def craft_exit_heads(model, stock, input_ids, attention_mask, plan: torch.Tensor) -> None:
    """Give each intermediate exit head of `model` a classifier whose logit margin is CONFIDENT_MARGIN for the samples
    planned to leave there and 0 (normalised entropy exactly 1) for the others; the pooled states come from the stock
    model's hidden states, which the pyramid loop reproduces exactly."""
    hidden_states = stock(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    for key, head in model.exits.items():
        layer = int(key)
        features = torch.tanh(head.dense(head.norm(pool(hidden_states[layer], attention_mask, head.pooling))))
        target = CONFIDENT_MARGIN * (plan == layer).to(torch.float64)
        # Minimum-norm solution of features · w = target (batch equations, hidden unknowns: exact).
        weight = torch.linalg.pinv(features.to(torch.float64)) @ target
        head.classifier.weight.zero_()
        head.classifier.bias.zero_()
        head.classifier.weight[0].copy_(weight.to(head.classifier.weight.dtype))


def build_candidates(stock, exit_layers_to_force, batch_size, input_ids, attention_mask, seed):
    """name → (pyramid model or None, expected exit layers (batch,) or None)."""
    convert = MagicPyramidForSequenceClassification.from_backbone
    candidates = {
        "stock": (stock, None),
        "exits off, no exit heads": (convert(stock, exit_layers=[12]).eval(), torch.full((batch_size,), 12)),
        "exits off, 11 idle heads": (convert(stock).eval(), torch.full((batch_size,), 12)),
    }
    for k in exit_layers_to_force:
        model = convert(stock, exit_layers=[k], exit_criterion="entropy", exit_threshold=1.0).eval()
        candidates[f"exit at {k}"] = (model, torch.full((batch_size,), k))
    if batch_size > 1:
        for name, layers in MIXED_PLANS.items():
            plan = planned_exit_layers(batch_size, layers, seed)
            model = convert(stock, exit_layers=MIXED_EXIT_LAYERS, exit_criterion="entropy", exit_threshold=MIXED_THRESHOLD).eval()
            craft_exit_heads(model, stock, input_ids, attention_mask, plan)
            candidates[f"mixed {name} ({'/'.join(map(str, layers))})"] = (model, plan)
    return candidates


def exit_histogram(exit_layer: torch.Tensor) -> str:
    values, counts = exit_layer.unique(return_counts=True)
    return " ".join(f"{int(v)}:{int(c)}" for v, c in zip(values, counts))


def run_setting(stock, seq_len, batch_size, exit_layers_to_force, repeats, warmup, seed, log):
    input_ids, attention_mask = random_batch(batch_size, seq_len, seed=seed)
    candidates = build_candidates(stock, exit_layers_to_force, batch_size, input_ids, attention_mask, seed)

    # Check every candidate exits where it should, and count what it ran.
    checks = {}
    with torch.inference_mode():
        reference = stock(input_ids=input_ids, attention_mask=attention_mask).logits
        for name, (model, expected) in candidates.items():
            if model is stock:
                continue
            output = model(input_ids=input_ids, attention_mask=attention_mask)
            if not torch.equal(output.exit_layer.cpu(), expected):
                raise AssertionError(f"{name}: expected exit layers {exit_histogram(expected)}, got {exit_histogram(output.exit_layer)}")
            final = output.exit_layer == 12
            max_diff = float((output.logits[final] - reference[final]).abs().max()) if bool(final.any()) else None
            checks[name] = dict(
                flops=flops_of_run(model, stock, output, attention_mask),
                exits=exit_histogram(output.exit_layer),
                mean_exit_layer=float(output.exit_layer.float().mean()),
                final_logits_max_diff=max_diff,
            )

    calls = {
        name: (lambda model=model: model(input_ids=input_ids, attention_mask=attention_mask))
        for name, (model, _) in candidates.items()
    }
    started = time.perf_counter()
    timing = time_interleaved(calls, repeats, warmup=warmup, seed=seed, progress=log)
    elapsed = time.perf_counter() - started

    rows = []
    for name in candidates:
        entry = dict(name=name, median_s=timing.median(name), min_s=timing.minimum(name), times_s=timing.times[name], cpu_times_s=timing.cpu_times[name])
        if name != "stock":
            speedup = timing.paired_speedup("stock", name)
            flops = checks[name]["flops"]
            flop_speedup = flops["full"] / flops["actual"]
            entry.update(
                checks[name],
                speedup=speedup,
                speedup_iqr=timing.spread("stock", name),
                cpu_speedup=timing.cpu_speedup("stock", name),
                speedup_min=timing.min_speedup("stock", name),
                flop_speedup=flop_speedup,
                efficiency=speedup / flop_speedup,
                efficiency_min=timing.min_speedup("stock", name) / flop_speedup,
            )
        rows.append(entry)
    return dict(seq_len=seq_len, batch_size=batch_size, repeats=repeats, seconds=elapsed, load_average_end=load_average(), rows=rows)


def table(setting: dict) -> str:
    headers = ["model", "exits (layer:samples)", "ms (median)", "speedup", "speedup IQR", "CPU-time speedup", "FLOP speedup", "efficiency", "efficiency (CPU time)"]
    out = []
    for row in setting["rows"]:
        if row["name"] == "stock":
            out.append([row["name"], "12:all", row["median_s"] * 1e3, 1.0, "", 1.0, 1.0, "", ""])
            continue
        out.append([row["name"], row["exits"], *speed_cells(row)])
    return markdown_table(headers, out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_repeats=20)
    parser.add_argument("--repeats-large", type=int, default=7, help="timed rounds when batch × seq_len ≥ 2048")
    parser.add_argument("--seq-lens", default="128", help="comma-separated sequence lengths")
    parser.add_argument("--exit-layers", default="2,4,6,9,12", help="layers to force the exit at, comma-separated")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args(argv)
    seq_lens = [int(v) for v in args.seq_lens.split(",")]
    forced = [int(v) for v in args.exit_layers.split(",")]
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.repeats_large = min(args.repeats_large, 2)
        args.batch_sizes = [1, 8]
        forced = [2, 6]
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message):
        print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    info = machine_info()
    print(f"# early exit: {info['cpu']}, {info['logical_cpus']} CPUs, {info['torch_threads']} torch threads, "
          f"torch {info['torch']}, transformers {info['transformers']}, load {info.get('load_average_start')}")
    stock = stock_bert(args.attn, seed=args.seed)
    settings = []
    for seq_len in seq_lens:
        for batch_size in args.batch_sizes:
            repeats = args.repeats_large if batch_size * seq_len >= 2048 else args.repeats
            log(f"seq {seq_len}, batch {batch_size}: {repeats} rounds")
            setting = run_setting(stock, seq_len, batch_size, forced, repeats, args.warmup, args.seed, log)
            settings.append(setting)
            print(f"\n### seq {seq_len}, batch {batch_size} ({repeats} rounds, load at end {setting['load_average_end']})\n")
            print(table(setting), flush=True)
    payload = dict(benchmark="early_exit", attn_implementation=args.attn, machine=info, argv=sys.argv[1:], settings=settings)
    path = write_results(args.output or ("early_exit_quick.json" if args.quick else "early_exit.json"), payload)
    print(f"\nresults written to {path}")
    return payload


if __name__ == "__main__":
    main()
