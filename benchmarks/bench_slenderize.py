"""COST-EFF slenderization on all-MiniLM-L6-v2 + Rotten Tomatoes: the stock fine-tuned model against the slender model
alone, the slender model with Magic Pyramid at its calibrated speed, and the three importance methods at equal widths.

For each: parameters, mean analytic FLOPs per test snippet, test accuracy with its paired 95% interval against the
stock model, and wall-clock speedup at batch 1 and 32 against the stock model in the same run (interleaved rounds).

    # the full run (idle machine; about 1-2 h on 2 CPU cores, most of it the three slenderizations)
    python benchmarks/bench_slenderize.py --teacher outputs/demo/stage1_finetune/model --assistant outputs/demo \
        --heads 4 --ffn 512 --embedding-rank 128 --steps 2

    # a smoke check (minutes): tiny data and widths
    python benchmarks/bench_slenderize.py --teacher outputs/demo/stage1_finetune/model --quick

Without --teacher, the stock model is fine-tuned first (--teacher-epochs on the training snippets).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, time_interleaved, write_results  # noqa: E402

from hf_magicpyramid import MagicPyramidForSequenceClassification  # noqa: E402
from hf_magicpyramid.calibration import calibrate_folder, paired_difference  # noqa: E402
from hf_magicpyramid.data import load_dataset_by_name, prepare_dataset  # noqa: E402
from hf_magicpyramid.flops import full_model_flops  # noqa: E402
from hf_magicpyramid.slenderize import DistillationWeights, slenderize  # noqa: E402
from hf_magicpyramid.training import default_backbone  # noqa: E402


def fine_tune_teacher(train, output: Path, epochs: float, max_length: int) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    path = default_backbone()
    tokenizer = AutoTokenizer.from_pretrained(path)
    label2id = {"rotten": 0, "fresh": 1}
    model = AutoModelForSequenceClassification.from_pretrained(path, id2label={0: "rotten", 1: "fresh"}, label2id=label2id)
    data = prepare_dataset(train, tokenizer, label2id, max_length=max_length)
    args = TrainingArguments(str(output / "checkpoints"), num_train_epochs=epochs, learning_rate=5e-5,
                             per_device_train_batch_size=32, report_to="none", save_strategy="no", warmup_steps=0.06)
    Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer)).train()
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


@torch.inference_mode()
def predictions(model, batches, pyramid: bool):
    """(per-sample correct, per-sample FLOPs) over the test batches at the model's own speed."""
    correct, flops = [], []
    for batch in batches:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if pyramid:
            out = model(**inputs, output_flops=True)
            flops += out.flops.tolist()
        else:
            out = model(**inputs)
            flops += full_model_flops(model, inputs["attention_mask"]).tolist()
        correct += (out.logits.argmax(-1) == labels).tolist()
    return correct, flops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="the stock fine-tuned classifier (default: fine-tune one first)")
    parser.add_argument("--assistant", default=None, help="a full-width Magic Pyramid with trained exits (e.g. outputs/demo): "
                        "the students start from it and its exits teach theirs; without it the first step of 'taylor' "
                        "ranks by the final exit only (fresh exits), so pass one to compare taylor with taylor_final")
    parser.add_argument("--dataset", default="rotten_tomatoes", help="a dataset name that `load_dataset_by_name` knows "
                        "(rotten_tomatoes, bbc_news, ...); --teacher must then be fine-tuned on it")
    parser.add_argument("--output-dir", default="outputs/bench_slenderize")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--embedding-rank", type=int, default=None, help="SVD rank of the word embeddings (default: keep)")
    parser.add_argument("--epochs-per-step", type=float, default=1.0)
    parser.add_argument("--importance-batches", type=int, default=16)
    parser.add_argument("--methods", default="taylor,taylor_final,magnitude")
    parser.add_argument("--max-train", type=int, default=None, help="training snippets (default: all)")
    parser.add_argument("--max-eval", type=int, default=500, help="validation snippets (distillation checks, calibration)")
    parser.add_argument("--max-test", type=int, default=None, help="test snippets (default: all)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-drop", type=float, default=1.0, help="calibration budget of slender + Magic Pyramid (points)")
    parser.add_argument("--teacher-epochs", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per batch size")
    parser.add_argument("--batch1-samples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 96 train / 64 eval / 64 test, widths 8/1024, 1 step")
    parser.add_argument("--output", default="slenderize.json")
    args = parser.parse_args(argv)
    if not args.teacher and args.dataset != "rotten_tomatoes":
        parser.error("--teacher is needed with --dataset other than rotten_tomatoes (the built-in fine-tune knows its labels only)")
    if args.quick:
        args.max_train, args.max_eval, args.max_test, args.max_length = 96, 64, 64, 24
        args.heads, args.ffn, args.steps, args.importance_batches, args.epochs_per_step = 8, 1024, 1, 1, 0.5
        args.repeats, args.batch1_samples, args.teacher_epochs = 2, 4, 1.0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    splits = load_dataset_by_name(args.dataset)
    train, validation, test = splits["train"], splits["validation"], splits["test"]
    if args.max_train:
        train = train.shuffle(seed=0).select(range(args.max_train))
    if args.max_eval:
        validation = validation.shuffle(seed=0).select(range(min(args.max_eval, len(validation))))
    if args.max_test:
        test = test.shuffle(seed=0).select(range(min(args.max_test, len(test))))
    teacher_dir = Path(args.teacher) if args.teacher else fine_tune_teacher(train, out / "teacher", args.teacher_epochs, args.max_length)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    stock = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    label2id = dict(stock.config.label2id)
    test_data = prepare_dataset(test, tokenizer, label2id, split="test", max_length=args.max_length).with_format("torch")
    collator = DataCollatorWithPadding(tokenizer)
    batches = list(torch.utils.data.DataLoader(test_data, batch_size=32, collate_fn=collator))

    models: dict[str, tuple[torch.nn.Module, bool]] = {"stock fine-tuned": (stock, False)}
    summaries = {}
    for method in args.methods.split(","):
        folder = out / f"slender_{method}"
        start = time.perf_counter()
        summaries[method] = slenderize(
            str(teacher_dir), train, validation, folder, heads=args.heads, ffn=args.ffn, steps=args.steps,
            embedding_rank=args.embedding_rank, assistant=args.assistant,
            importance=method, importance_batches=args.importance_batches, epochs_per_step=args.epochs_per_step,
            max_length=args.max_length, weights=DistillationWeights(),
        )
        summaries[method]["wall_seconds"] = round(time.perf_counter() - start, 1)
        models[f"slender ({method})"] = (MagicPyramidForSequenceClassification.from_pretrained(folder).eval(), True)
    # slender + Magic Pyramid: the Taylor-with-exits model calibrated on validation (its exits were distilled too).
    first = args.methods.split(",")[0]
    calibration = calibrate_folder(
        out / f"slender_{first}", validation, stock_model=str(teacher_dir), max_drop=args.max_drop,
        max_length=args.max_length, batch1_samples=0, log=print,
    )
    models[f"slender ({first}) + Magic Pyramid"] = (MagicPyramidForSequenceClassification.from_pretrained(out / f"slender_{first}").eval(), True)

    reference_correct, reference_flops = predictions(stock, batches, pyramid=False)
    rows, results = [], {}
    for name, (model, pyramid) in models.items():
        correct, flops = predictions(model, batches, pyramid)
        difference, half_width = paired_difference(correct, reference_correct)
        results[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "mean_flops": sum(flops) / len(flops),
            "flop_speedup": sum(reference_flops) / sum(flops),
            "accuracy": sum(correct) / len(correct),
            "difference_points": difference,
            "half_width_points": half_width,
        }
    # Wall clock, interleaved, against the stock model in the same rounds.
    singles = [{k: v[i : i + 1] for k, v in batches[0].items() if k != "labels"} for i in range(min(args.batch1_samples, len(batches[0]["labels"])))]
    for batch_size, inputs in ((32, [{k: v for k, v in b.items() if k != "labels"} for b in batches[:4]]), (1, singles)):
        candidates = {name: (lambda m=model, xs=inputs: [m(**x) for x in xs]) for name, (model, _) in models.items()}
        timing = time_interleaved(candidates, repeats=args.repeats)
        for name in models:
            results[name][f"speedup_b{batch_size}"] = timing.paired_speedup("stock fine-tuned", name)
            results[name][f"ms_b{batch_size}"] = timing.median(name) / sum(x["input_ids"].shape[0] for x in inputs) * 1e3
    for name, row in results.items():
        rows.append([name, f"{row['parameters'] / 1e6:.1f}M", f"{row['mean_flops'] / 1e6:.1f}M", row["flop_speedup"],
                     f"{100 * row['accuracy']:.1f}", f"{row['difference_points']:+.1f} ± {row['half_width_points']:.1f}",
                     row["speedup_b1"], row["speedup_b32"]])
    table = markdown_table(["model", "params", "FLOPs/snippet", "FLOP speedup", "test acc %", "Δ vs stock (95%)",
                            "speedup b1", "speedup b32"], rows)
    print(table)
    path = write_results(args.output, {
        "machine": machine_info(), "settings": vars(args), "test_samples": len(test_data), "results": results,
        "slenderize": summaries, "calibration_chosen": calibration.get("chosen"), "table": table,
    })
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
