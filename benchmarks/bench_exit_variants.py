"""Exit variants on a real task (issue 12): today's exits (self-distillation, backbone frozen, full head) against the
joint option (backbone unfrozen, every exit distilled from the stage-1 model, depth-weighted) and the light exit head.

Each variant is the recipe with its defaults plus the variant's settings (all three share stage 1, the plain
fine-tune, copied between their folders). Reported on the test split: accuracy per exit, the final exit's, and the
calibrated default that `train` saved (chosen on validation within --max-drop of stage 1): its accuracy, paired
difference to stage 1 and mean exit layer. Accuracy only: no timing (run on a busy machine).

    nice python benchmarks/bench_exit_variants.py --max-train 2000 --epochs 1           # about 30 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import hf_magicpyramid  # noqa: E402,F401
from hf_magicpyramid.calibration import _batches, paired_difference  # noqa: E402
from hf_magicpyramid.data import load_dataset_by_name  # noqa: E402
from hf_magicpyramid.training import default_backbone, prepare_dataset, train_magic_pyramid  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "today (self_distillation, frozen backbone, full head)": {},
    "joint, every exit distilled from stage 1": {"exit_objective": "joint", "exit_teacher": "every_exit"},
    "light head (self_distillation, frozen backbone)": {"pyramid_options": {"exit_head": "light"}},
}


@torch.inference_mode()
def exit_answers(model, batches, labels):
    """(per-exit correct (num_exits, n), default-speed correct (n,), default-speed exit layers (n,))."""
    model.eval()
    per_exit, default, layers = [], [], []
    for batch in batches:
        everything = model(**batch, output_all_exits=True)  # every exit's logits, at the saved pruning setting
        per_exit.append(torch.stack([logits.argmax(-1) for logits in everything.exit_logits]))
        out = model(**batch)
        default.append(out.logits.argmax(-1))
        layers.append(out.exit_layer)
    return torch.cat(per_exit, dim=1) == labels, torch.cat(default) == labels, torch.cat(layers).double()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="rotten_tomatoes")
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=1.0, help="Every stage's epochs (stage 1, 3, 4).")
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--variants", nargs="+", type=int, default=list(range(len(VARIANTS))), help="Indices into the variants.")
    parser.add_argument("--cache-dir", default=str(ROOT / "outputs" / "bench_exit_variants"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results_exit_variants.json"))
    args = parser.parse_args()

    data = load_dataset_by_name(args.task)
    tokenizer = AutoTokenizer.from_pretrained(default_backbone())
    cache = Path(args.cache_dir)
    results = {}
    first_stage1 = None
    for index, (name, options) in enumerate(VARIANTS.items()):
        if index not in args.variants:
            continue
        out = cache / f"{args.task}-n{args.max_train}-e{args.epochs:g}-variant{index}"
        if first_stage1 is not None and not (out / "stage1_finetune").exists():
            shutil.copytree(first_stage1, out / "stage1_finetune")  # the same plain fine-tune for every variant
        print(f"=== {name} ===", flush=True)
        start = time.perf_counter()
        summary = train_magic_pyramid(
            default_backbone(), data["train"], data["validation"], out, tokenizer=tokenizer, max_train_samples=args.max_train,
            epochs=args.epochs, pruned_finetune_epochs=args.epochs, exit_epochs=args.epochs, max_drop=args.max_drop,
            disable_tqdm=True, logging_steps=20, **options,
        )
        first_stage1 = first_stage1 or out / "stage1_finetune"
        model = AutoModelForSequenceClassification.from_pretrained(str(out))
        stock = AutoModelForSequenceClassification.from_pretrained(str(out / summary["stock_model"])).eval()
        test = prepare_dataset(data["test"], tokenizer, dict(model.config.label2id), split="test", max_samples=args.max_test)
        labels = torch.tensor(test["labels"])
        batches = _batches(test, tokenizer, 64)
        per_exit, default, layers = exit_answers(model, batches, labels)
        with torch.inference_mode():
            reference = torch.cat([stock(**b).logits.argmax(-1) for b in batches]) == labels
        difference, half_width = paired_difference(default, reference)
        chosen = (summary.get("calibration") or {}).get("chosen") or {}
        results[name] = {
            "options": options, "minutes": round((time.perf_counter() - start) / 60, 1),
            "pruning_kept": summary["pruning_decision"]["kept"], "default_speed": summary["default_speed"],
            "test_samples": len(labels),
            "stage1_test_accuracy": round(float(reference.double().mean() * 100), 2),
            "per_exit_test_accuracy": {str(layer): round(float(c.double().mean() * 100), 2)
                                       for layer, c in zip(model.exit_layers, per_exit)},
            "default_test_accuracy": round(float(default.double().mean() * 100), 2),
            "default_difference": round(difference, 2), "default_difference_interval": round(half_width, 2),
            "default_test_mean_exit_layer": round(float(layers.mean()), 2),
            "calibrated_validation": {k: chosen.get(k) for k in ("accuracy", "difference", "difference_interval", "mean_exit_layer", "flops_ratio")},
            "budget_met": (summary.get("calibration") or {}).get("budget_met"),
        }
        print(json.dumps(results[name], indent=2), flush=True)
        Path(args.results).write_text(json.dumps(results, indent=2))
    print(f"Results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
