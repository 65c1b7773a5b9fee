"""Where the ONNX Runtime layer loop spends its time at batch 1, against the stock model exported whole.

`bench` reports that on short snippets the Magic Pyramid loop on ONNX Runtime is slower than the stock model on ONNX
Runtime at batch 1, although it runs fewer FLOPs. This splits one sample's time into the graphs the loop runs (how many
per sample, and their total) and the Python between them (exit decisions, token bookkeeping), with `cProfile`.

    python benchmarks/profile_onnx_loop.py --model RUN --dataset rotten_tomatoes --samples 100 --quantize int8

Both runners use the package's own classes (`OnnxPyramid`, `OnnxStock`) with their default session options; the
graphs are exported into --work-dir (kept, reused on a rerun). Idle machine only.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

from hf_magicpyramid import MagicPyramidForSequenceClassification  # noqa: E402
from hf_magicpyramid.data import load_dataset_by_name  # noqa: E402
from hf_magicpyramid.onnx_loop import OnnxPyramid, OnnxStock  # noqa: E402


def per_sample_ms(runner, inputs) -> float:
    start = time.perf_counter()
    for x in inputs:
        runner(**x)
    return (time.perf_counter() - start) / len(inputs) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Magic Pyramid folder from `train` (stage1_finetune/model is the stock)")
    parser.add_argument("--stock", default=None, help="default: MODEL/stage1_finetune/model")
    parser.add_argument("--dataset", default="rotten_tomatoes")
    parser.add_argument("--samples", type=int, default=100, help="test samples, each run alone (batch 1)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--quantize", default="int8", choices=("none", "int8"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work-dir", default="outputs/profile_onnx_loop")
    parser.add_argument("--output", default="profile_onnx_loop.json")
    args = parser.parse_args(argv)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quantize = None if args.quantize == "none" else args.quantize
    model = MagicPyramidForSequenceClassification.from_pretrained(args.model).eval()
    stock = AutoModelForSequenceClassification.from_pretrained(args.stock or str(Path(args.model) / "stage1_finetune" / "model")).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = load_dataset_by_name(args.dataset)["test"]["text"][: args.samples]
    inputs = [dict(tokenizer(t, return_tensors="pt", truncation=True, max_length=args.max_length)) for t in texts]
    work = Path(args.work_dir)
    runners = {"stock on ONNX Runtime": OnnxStock(stock, work / "stock", quantize=quantize),
               "Magic Pyramid on ONNX Runtime": OnnxPyramid(model, work / "pyramid", quantize=quantize)}
    times = {name: [] for name in runners}
    for name, runner in runners.items():  # warm-up
        per_sample_ms(runner, inputs[:10])
    for _ in range(args.rounds):  # interleaved rounds
        for name, runner in runners.items():
            times[name].append(per_sample_ms(runner, inputs))
    medians = {name: statistics.median(t) for name, t in times.items()}

    loop = runners["Magic Pyramid on ONNX Runtime"]
    profile = cProfile.Profile()
    profile.enable()
    outputs = [loop(**x) for x in inputs]
    profile.disable()
    stats = pstats.Stats(profile).stats
    total = next(v[3] for k, v in stats.items() if k[2] == "__call__" and k[0].endswith("onnx_loop.py"))
    session_runs = [v for k, v in stats.items() if k[0] == "~" and "onnxruntime" in k[2] and k[2].endswith(".run>")]
    runs, run_seconds = sum(v[1] for v in session_runs), sum(v[3] for v in session_runs)
    n = len(inputs)
    result = {
        "ms_per_sample": {k: round(v, 3) for k, v in medians.items()},
        "loop_over_stock": round(medians["Magic Pyramid on ONNX Runtime"] / medians["stock on ONNX Runtime"], 3),
        "profiled_ms_per_sample": round(total / n * 1e3, 3),
        "graph_runs_per_sample": round(runs / n, 2),
        "graph_ms_per_sample": round(run_seconds / n * 1e3, 3),
        "python_ms_per_sample": round((total - run_seconds) / n * 1e3, 3),
        "mean_exit_layer": round(sum(int(out.exit_layer[0]) for out in outputs) / n, 2),
        "num_layers": model.config.num_hidden_layers,
    }
    print(json.dumps(result, indent=2))
    print(f"the loop: {result['graph_runs_per_sample']} graph runs per sample, {result['graph_ms_per_sample']} ms in them and "
          f"{result['python_ms_per_sample']} ms of Python between them (profiled, which inflates Python); the stock graph: "
          f"{medians['stock on ONNX Runtime']:.2f} ms for all {result['num_layers']} layers")
    path = write_results(args.output, {"machine": machine_info(), "settings": vars(args), "result": result})
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
