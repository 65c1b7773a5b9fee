"""`predict` over a large file: rows per second and peak resident memory for four ways of classifying it.

The corpus: every Rotten Tomatoes snippet (train + validation + test, 12,751 of them), repeated in order to --rows rows
(default 100,000), written once as CSV. Each candidate runs `hf_magicpyramid.predict_file` over it in a fresh process
(so that its peak resident memory, `ru_maxrss`, is its own):

1. stock, plain loop: the stock fine-tuned model (--stock), batches of --batch-size in input order (`sort_by_length=False`);
2. stock, bucketed: the same model, each chunk's rows sorted by token count into batches;
3. Magic Pyramid (--model), bucketed, at its stored default speed (or --exit-threshold / --keep-ratio-scale);
4. Magic Pyramid with 2 processes under torchrun (gloo): each rank classifies every other chunk, rank 0 merges.

Time is the wall clock of the `predict_file` call (model loading, reading, classifying, writing and merging; not
Python's start-up), on rank 0 for torchrun (it returns after the merge). Every single-process candidate uses --threads
torch threads; each torchrun rank uses --threads // 2 (on a 2-core machine: 1 thread per rank, so that the two ranks do
not fight over the cores; set OMP_NUM_THREADS the same way when you run `torchrun ... predict` yourself). Candidates 1
and 2, and 3 and 4, are checked to agree row for row (labels, exit layers, scores within 1e-4).

    python benchmarks/bench_predict.py --model outputs/demo --stock outputs/demo/stage1_finetune/model
    python benchmarks/bench_predict.py --model outputs/demo --stock outputs/demo/stage1_finetune/model --rows 2000   # quick

Prints a Markdown table and writes benchmarks/results/predict_<rows>rows.json. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"


def write_corpus(path: Path, rows: int) -> None:
    """Rotten Tomatoes (all splits, in split order) repeated to `rows` rows: columns id_in_corpus, text."""
    from hf_magicpyramid.data import load_rotten_tomatoes

    splits = load_rotten_tomatoes()
    texts = [text for split in ("train", "validation", "test") for text in splits[split]["text"]]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id_in_corpus", "text"])
        for row in range(rows):
            writer.writerow([row % len(texts), texts[row % len(texts)]])


def worker(spec: dict) -> None:
    """One candidate, in this process (or this rank): predict_file, then its time and peak memory as JSON."""
    import torch

    torch.set_num_threads(spec["threads"])
    from hf_magicpyramid.predict import predict_file

    started = time.perf_counter()
    summary = predict_file(spec["model"], spec["input"], spec["output"], batch_size=spec["batch_size"],
                           max_length=spec["max_length"], chunk_size=spec["chunk_size"],
                           sort_by_length=spec["sort_by_length"], overwrite=True, progress=spec["rank_progress"],
                           device="cpu", **spec["knobs"])
    seconds = time.perf_counter() - started
    summary.update(seconds_total=seconds, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   threads=spec["threads"])
    Path(spec["report"].format(rank=summary["rank"])).write_text(json.dumps(summary))


def run_candidate(name: str, spec: dict, processes: int, work: Path) -> dict:
    spec = dict(spec, report=str(work / (name + "-rank{rank}.json")))
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(spec["threads"]))
    if processes == 1:
        command = [sys.executable, __file__, "--worker", str(spec_path)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   __file__, "--worker", str(spec_path)]
    print(f"[{name}] {' '.join(command[-4:])}", file=sys.stderr, flush=True)
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"[{name}] failed with exit code {completed.returncode}")
    ranks = [json.loads((work / f"{name}-rank{rank}.json").read_text()) for rank in range(processes)]
    first = ranks[0]
    return {
        "candidate": name, "processes": processes, "threads_per_process": spec["threads"],
        "sort_by_length": spec["sort_by_length"], "model": spec["model"], "knobs": spec["knobs"],
        "rows": first["rows"], "seconds": first["seconds_total"], "rows_per_second": first["rows"] / first["seconds_total"],
        "peak_rss_mib_per_process": [round(r["peak_rss_mib"], 1) for r in ranks],
        "classified_rows_per_process": [r["classified_rows"] for r in ranks],
        "output": spec["output"],
    }


def agree(first: str, second: str) -> bool:
    """Same labels and exit layers row for row, scores within 1e-4 (thread counts change the last float digits)."""
    with open(first, encoding="utf-8", newline="") as a, open(second, encoding="utf-8", newline="") as b:
        rows_a, rows_b = list(csv.DictReader(a)), list(csv.DictReader(b))
    return len(rows_a) == len(rows_b) and all(
        x["id_in_corpus"] == y["id_in_corpus"] and x["label"] == y["label"] and x["exit_layer"] == y["exit_layer"]
        and abs(float(x["score"]) - float(y["score"])) <= 1e-4 for x, y in zip(rows_a, rows_b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="A Magic Pyramid model folder (train's --output_dir).")
    parser.add_argument("--stock", help="The stock fine-tuned model folder (e.g. MODEL/stage1_finetune/model).")
    parser.add_argument("--rows", type=int, default=100_000, help="Rows in the corpus.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--exit-threshold", type=float, default=None, help="Default: the model's stored speed.")
    parser.add_argument("--keep-ratio-scale", type=float, default=None, help="Default: the model's stored speed.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of a single process; each "
                        "of the 2 torchrun ranks gets threads // 2 (at least 1).")
    parser.add_argument("--work-dir", default=None, help="Where the corpus and outputs go. Default: a temporary folder.")
    parser.add_argument("--output", default=None, help="Result JSON. Default: benchmarks/results/predict_<rows>rows.json")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    if not args.model or not args.stock:
        parser.error("--model and --stock are required")

    with tempfile.TemporaryDirectory(prefix="bench_predict-") as scratch:
        work = Path(args.work_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / f"rotten_tomatoes_{args.rows}.csv"
        if not corpus.exists():
            write_corpus(corpus, args.rows)
        base = dict(input=str(corpus), batch_size=args.batch_size, max_length=args.max_length,
                    chunk_size=args.chunk_size, threads=args.threads, rank_progress=True, knobs={})
        knobs = {k: v for k, v in (("exit_threshold", args.exit_threshold), ("keep_ratio_scale", args.keep_ratio_scale))
                 if v is not None}
        candidates = [
            ("stock-plain-loop", dict(base, model=args.stock, sort_by_length=False), 1),
            ("stock-bucketed", dict(base, model=args.stock, sort_by_length=True), 1),
            ("pyramid-bucketed", dict(base, model=args.model, sort_by_length=True, knobs=knobs), 1),
            ("pyramid-2-processes", dict(base, model=args.model, sort_by_length=True, knobs=knobs,
                                         threads=max(1, args.threads // 2)), 2),
        ]
        results = []
        for name, spec, processes in candidates:
            spec["output"] = str(work / f"{name}.csv")
            results.append(run_candidate(name, spec, processes, work))

        stock_same = agree(results[0]["output"], results[1]["output"])
        pyramid_same = agree(results[2]["output"], results[3]["output"])

    plain = results[0]["rows_per_second"]
    lines = ["| candidate | processes x threads | rows/s | vs plain loop | seconds | peak RSS (MiB, per process) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['candidate']} | {r['processes']} x {r['threads_per_process']} | {r['rows_per_second']:.0f} | "
                     f"{r['rows_per_second'] / plain:.2f}x | {r['seconds']:.1f} | "
                     f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mib_per_process'])} |")
    table = "\n".join(lines)
    print(table)
    print(f"stock plain loop and bucketed agree: {stock_same}; Magic Pyramid with 1 and 2 processes agree: "
          f"{pyramid_same} (labels, exit layers, scores within 1e-4)")
    sys.path.insert(0, str(HERE))
    from common import load_average, machine_info

    report = {"rows": args.rows, "batch_size": args.batch_size, "max_length": args.max_length,
              "chunk_size": args.chunk_size, "threads": args.threads, "model": args.model, "stock": args.stock,
              "results": [{k: v for k, v in r.items() if k != "output"} for r in results],
              "stock_outputs_agree": stock_same, "pyramid_outputs_agree": pyramid_same, "table": table,
              "machine": machine_info(), "load_average_end": load_average()}
    output = Path(args.output) if args.output else RESULTS_DIR / f"predict_{args.rows}rows.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")
    return 0 if stock_same and pyramid_same else 1


if __name__ == "__main__":
    sys.exit(main())
