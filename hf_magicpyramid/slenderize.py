"""COST-EFF slenderization: fewer attention heads and FFN neurons in every layer, every exit kept, trained by distillation.

- Distillation losses (`soft_cross_entropy`, `hidden_mse`, `distillation_loss`): soft cross-entropy with temperature on
  the final exit and exit to exit (student exit i learns from the teacher assistant's exit i, or from the teacher's
  final logits without an assistant), MSE between hidden states on real tokens per layer, optional hard labels, each
  term weighted (`DistillationWeights`).
- Importance (`importance_scores`): first-order Taylor scores |Σ grad ⊙ weight| of every head (its q/k/v rows, and its
  columns of the attention output) and every FFN neuron (its row of the first FFN Linear and column of the second),
  gradients accumulated over a configurable number of batches with dropout off; the loss sums every exit's distillation
  loss (`"taylor"`, COST-EFF's point), or the final exit's only (`"taylor_final"`), or plain weight magnitude
  (`"magnitude"`). Layers that share weights (albert) share scores: their gradients already sum over the layers.
- Steps (`width_schedule`, `slenderize`): prune toward the target widths in K steps, distil after each step with a fresh
  optimizer and learning-rate schedule (`SlenderizeTrainer`, a `MagicPyramidTrainer`: the teacher and the assistant are
  plain attributes, outside DDP and checkpoints). Each step's folder holds its model and a `step.json` marker; a rerun
  resumes after the last complete step (and inside a step from its last Trainer checkpoint).

The student runs at the exact speed while it learns (no early exit, no token pruning), so every layer's hidden states
cover every real token. The result is a Magic Pyramid model: exits, token pruning knobs, `sweep` and `push` all work.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

from .configuration_magic_pyramid import MagicPyramidConfig, exact_speed
from .modeling_magic_pyramid import MagicPyramidForSequenceClassification, _run_encoder
from .training import (
    MagicPyramidTrainer,
    _resume_checkpoint,
    _unwrap,
    _write_json_atomically,
    accuracy_metrics,
    barrier,
    distributed_kwargs,
    is_main_process,
    is_sentence_embedding_model,
    resolve_backbone,
    soft_cross_entropy,
)

IMPORTANCE_METHODS = ("taylor", "taylor_final", "magnitude")
STEP_MARKER = "step.json"
SUMMARY_FILE = "slenderize_summary.json"
SETTINGS_FILE = "slenderize_settings.json"  # what the steps in a folder were made from (checked on a rerun)


# ---------------------------------------------------------------------------------------------------------------------
# Distillation losses
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DistillationWeights:
    """Weights of the distillation terms (0 turns a term off) and the softmax temperature of the soft terms."""

    final: float = 1.0  # soft CE of the student's final exit against the teacher's logits
    exits: float = 1.0  # soft CE of each intermediate exit against the assistant's matching exit (or the teacher)
    hidden: float = 1.0  # MSE between hidden states on real tokens, averaged over layers
    hard: float = 0.0  # cross-entropy with the labels, on every exit
    temperature: float = 1.0

    def __post_init__(self):
        for name in ("final", "exits", "hidden", "hard"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"distillation weight {name}={value!r} is out of range: it must be a number >= 0.")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} is out of range: it must be a number > 0.")


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between (batch, seq_len, hidden) hidden states over the real tokens only: the mean over
    real tokens of the per-token mean over the hidden dimension. Padding positions count for nothing."""
    real = attention_mask.to(student.dtype).unsqueeze(-1)
    squared = (student.float() - teacher.detach().float()) ** 2 * real
    return squared.sum() / (real.sum() * student.shape[-1]).clamp(min=1.0)


def distillation_loss(
    student_logits: list[torch.Tensor],
    teacher_logits: torch.Tensor,
    weights: DistillationWeights,
    assistant_logits: list[torch.Tensor] | None = None,
    student_hidden: list[torch.Tensor] | None = None,
    teacher_hidden: list[torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the distillation terms, and each term (unweighted) by name.

    student_logits: every exit's (batch, num_labels) logits, the final exit last. teacher_logits: the teacher's
    (batch, num_labels). assistant_logits: the assistant's exits, matched one to one with the student's (the final one
    unused: the final exit learns from the teacher); without them every intermediate exit learns from the teacher.
    student_hidden / teacher_hidden: per layer (batch, seq_len, hidden), compared on `attention_mask`'s real tokens.
    Terms: `final` = soft CE (T², Hinton) of the final exit; `exits` = mean over intermediate exits of their soft CE;
    `hidden` = mean over layers of `hidden_mse`; `hard` = mean over exits of the cross-entropy with `labels`.
    """
    temperature = weights.temperature
    terms: dict[str, torch.Tensor] = {}
    if weights.final > 0:
        terms["final"] = soft_cross_entropy(student_logits[-1], teacher_logits, temperature)
    intermediate = student_logits[:-1]
    if weights.exits > 0 and intermediate:
        if assistant_logits is not None and len(assistant_logits) != len(student_logits):
            raise ValueError(f"the assistant has {len(assistant_logits)} exits, the student {len(student_logits)}: they must match.")
        targets = assistant_logits[:-1] if assistant_logits is not None else [teacher_logits] * len(intermediate)
        terms["exits"] = torch.stack([soft_cross_entropy(s, t, temperature) for s, t in zip(intermediate, targets)]).mean()
    if weights.hidden > 0 and student_hidden is not None and teacher_hidden is not None:
        if len(student_hidden) != len(teacher_hidden):
            raise ValueError(f"{len(student_hidden)} student layers vs {len(teacher_hidden)} teacher layers: they must match.")
        terms["hidden"] = torch.stack([hidden_mse(s, t, attention_mask) for s, t in zip(student_hidden, teacher_hidden)]).mean()
    if weights.hard > 0 and labels is not None:
        terms["hard"] = torch.stack([F.cross_entropy(logits.float(), labels) for logits in student_logits]).mean()
    if not terms:
        raise ValueError("every distillation term is off (all weights 0, or no hidden states / labels given).")
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, terms


def forward_all(model: MagicPyramidForSequenceClassification, input_ids, attention_mask=None, token_type_ids=None):
    """Run a Magic Pyramid classifier at the exact speed (no early exit, no token pruning) and return every exit's
    logits (list, `exit_layers` order, final last), every layer's output hidden states (list of (batch, seq_len,
    hidden)) and the (batch, seq_len) mask they cover."""
    exit_layers = model.exit_layers
    num_layers = model.config.num_hidden_layers
    hidden_states: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []

    def on_layer(index, stream):
        layer = index + 1
        hidden_states.append(stream.hidden)
        if layer == num_layers:
            logits.append(model.final_logits(stream.hidden, stream.attention_mask))
        elif layer in exit_layers:
            logits.append(model.exits[str(layer)](stream.hidden, stream.attention_mask))
        return False

    mask = model._check_inputs(input_ids, None, attention_mask)
    stream, _ = _run_encoder(model, input_ids, mask, token_type_ids, None, None, 0.0, -1.0, on_layer=on_layer)
    return logits, hidden_states, stream.attention_mask


def _as_pyramid(model, exit_pooling: str | None = None) -> MagicPyramidForSequenceClassification:
    if isinstance(model, MagicPyramidForSequenceClassification):
        return model
    options = {"exit_pooling": exit_pooling} if exit_pooling else {}
    return MagicPyramidForSequenceClassification.from_backbone(model, **options)


# ---------------------------------------------------------------------------------------------------------------------
# Importance
# ---------------------------------------------------------------------------------------------------------------------


def _unit_sums(values: torch.Tensor, dim: int, parts: int, units: int) -> torch.Tensor:
    """Sum a per-entry tensor into (units,) along axis `dim`, which holds `parts` blocks of `units` contiguous slices."""
    return values.movedim(dim, 0).reshape(parts, units, -1).sum(dim=(0, 2))


def _width_parameters(model, layer_module):
    """(head parameters, FFN parameters) of a layer module: lists of (parameter, dim, parts) over every stock layer it
    runs, where slices along `dim` belong to one head (or neuron) and the axis holds `parts` blocks (fused q/k/v: 3;
    gated FFN: 2)."""
    driver = model.driver
    adapter = driver.adapter
    from .adapters import get_path

    heads, ffn = [], []
    for sublayer in driver.sublayers(layer_module):
        attention = get_path(sublayer, adapter.attention)
        for path in driver._head_projections(attention):
            linear = get_path(attention, path)
            parts = 3 if driver.fused_qkv else 1
            heads.append((linear.weight, 0, parts))
            if linear.bias is not None:
                heads.append((linear.bias, 0, parts))
        heads.append((get_path(sublayer, adapter.attention_out).weight, 1, 1))
        ffn_in = get_path(sublayer, adapter.ffn_in)
        parts = 2 if driver.gated_ffn else 1
        ffn.append((ffn_in.weight, 0, parts))
        if ffn_in.bias is not None:
            ffn.append((ffn_in.bias, 0, parts))
        ffn.append((get_path(sublayer, adapter.ffn_out).weight, 1, 1))
    return heads, ffn


def importance_scores(
    model: MagicPyramidForSequenceClassification,
    batches,
    teacher: MagicPyramidForSequenceClassification | None = None,
    method: str = "taylor",
    num_batches: int | None = None,
    weights: DistillationWeights | None = None,
    assistant: MagicPyramidForSequenceClassification | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, a score for every attention head (heads,) and every FFN neuron (ffn,) of `model` as built.

    `method`: `"taylor"`: |Σ_batches Σ_unit grad ⊙ weight| where the loss sums every exit's soft cross-entropy (at
    `weights.temperature`) against the teacher (final exit) and the assistant's or teacher's logits (intermediate
    exits); `"taylor_final"`: the same with the final
    exit's term only; `"magnitude"`: Σ_unit |weight| (no data). A head's unit is its q/k/v rows (weights and biases;
    deberta-v2's position projections too) and its columns of the attention output; a neuron's its row (and bias) of
    the first FFN Linear (both halves of a gated one) and its column of the second. `batches`: an iterable of model
    inputs (dicts with input_ids, attention_mask, ...); the first `num_batches` are used (None: all). Dropout is off
    while scoring; the model's weights and gradients are left as they were. Layers sharing weights (albert) get the
    same scores (the shared weights' gradients sum over the layers that use them).
    """
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"importance method {method!r} is not supported; choose one of {', '.join(map(repr, IMPORTANCE_METHODS))}.")
    layers = model.layers
    groups = model.driver.layer_groups(model.config.backbone_config)
    units = [model.driver.layer_widths(layer) for layer in layers]
    if method != "magnitude":
        if teacher is None:
            raise ValueError(f"importance method {method!r} needs a teacher (its logits are the distillation targets).")
        weights = weights or DistillationWeights()
        # The soft-CE terms only, every exit weighted 1 (the final one alone for taylor_final), at the run's temperature.
        loss_weights = DistillationWeights(
            final=1.0, exits=0.0 if method == "taylor_final" else 1.0, hidden=0.0, hard=0.0, temperature=weights.temperature
        )
        was_training = model.training
        saved_grads = {name: p.grad for name, p in model.named_parameters()}
        requires = {name: p.requires_grad for name, p in model.named_parameters()}
        model.eval()
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(True)
        device = next(model.parameters()).device
        try:
            for index, batch in enumerate(tqdm(batches, desc=f"importance ({method})", total=num_batches, leave=False)):
                if num_batches is not None and index >= num_batches:
                    break
                inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                with torch.no_grad():
                    teacher_logits = forward_all(teacher, **inputs)[0][-1]
                    assistant_logits = forward_all(assistant, **inputs)[0] if assistant is not None else None
                student_logits, _, _ = forward_all(model, **inputs)
                loss, _ = distillation_loss(student_logits, teacher_logits, loss_weights, assistant_logits)
                loss.backward()
            scores = _scores(model, layers, groups, units, lambda p: p.grad * p if p.grad is not None else torch.zeros_like(p), absolute_after=True)
        finally:
            for name, p in model.named_parameters():
                p.grad = saved_grads[name]
                p.requires_grad_(requires[name])
            model.train(was_training)
    else:
        scores = _scores(model, layers, groups, units, lambda p: p.abs(), absolute_after=False)
    return scores


@torch.no_grad()
def _scores(model, layers, groups, units, per_entry, absolute_after: bool):
    by_group: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for group, layer, (heads, ffn) in zip(groups, layers, units):
        if group in by_group:
            continue
        head_params, ffn_params = _width_parameters(model, layer)
        head_scores = sum(_unit_sums(per_entry(p).float(), dim, parts, heads) for p, dim, parts in head_params)
        ffn_scores = sum(_unit_sums(per_entry(p).float(), dim, parts, ffn) for p, dim, parts in ffn_params)
        if absolute_after:
            # |Σ g ⊙ W| per unit (the sums above run over a unit's entries within each parameter, then over parameters).
            head_scores, ffn_scores = head_scores.abs(), ffn_scores.abs()
        by_group[group] = (head_scores.cpu(), ffn_scores.cpu())
    return [by_group[group][0] for group in groups], [by_group[group][1] for group in groups]


def select_kept(scores: list[torch.Tensor], widths: list[int], groups: list[int] | None = None) -> list[list[int] | None]:
    """Per layer, the sorted indices of the `widths[i]` highest-scoring units (None where the layer keeps them all).
    Ties break toward the lower index. Layers of one shared group (same entry in `groups`) get the same list."""
    kept: list[list[int] | None] = []
    for layer, (score, width) in enumerate(zip(scores, widths)):
        if groups is not None and groups.index(groups[layer]) != layer:
            kept.append(kept[groups.index(groups[layer])])
            continue
        if width >= score.numel():
            kept.append(None)
            continue
        order = sorted(range(score.numel()), key=lambda i: (-float(score[i]), i))
        kept.append(sorted(order[: max(1, width)]))
    return kept


def width_schedule(full: list[int], target: list[int], steps: int) -> list[list[int]]:
    """Per step (1..steps), the width of every layer: linear from `full` to `target`, rounded, at least 1, never
    above the previous step. E.g. full 12, target 4, 2 steps: [8], [4]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is out of range: it must be an integer >= 1.")
    schedule = []
    for step in range(1, steps + 1):
        schedule.append([max(1, min(f, round(f - (f - t) * step / steps))) for f, t in zip(full, target)])
    return schedule


def resolve_targets(name: str, value, full: int, num_layers: int) -> list[int]:
    """A target width as one number or one per layer, checked: integers in [1, full]."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * num_layers
    if len(values) != num_layers:
        raise ValueError(f"--{name} has {len(values)} entries: give one number for every layer, or one per layer ({num_layers}).")
    for layer, width in enumerate(values, start=1):
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= full:
            raise ValueError(f"--{name} {width!r} (layer {layer}) is out of range: widths are integers in [1, {full}] (the model's full width).")
    return values


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------


class SlenderizeTrainer(MagicPyramidTrainer):
    """A `MagicPyramidTrainer` whose training loss is `distillation_loss`: the student's every exit and hidden states
    against the teacher (a Magic Pyramid model, run at the exact speed) and, when given, the teacher assistant (its
    exits teach the student's exits one to one; its hidden states, else the teacher's, the student's). Both are plain
    attributes in eval mode without gradients: outside DDP, the optimizer and checkpoints. Evaluation is the stock
    `MagicPyramidTrainer`'s (the model's logits at its speed)."""

    def __init__(self, *args, teacher=None, assistant=None, weights: DistillationWeights | None = None, **kwargs):
        super().__init__(*args, teacher=teacher, **kwargs)
        self.weights = weights or DistillationWeights()
        self.assistant = None
        if assistant is not None:
            self.assistant = assistant.to(self.args.device).eval()
            for parameter in self.assistant.parameters():
                parameter.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = _unwrap(model)
        features = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            teacher_logits, teacher_hidden, _ = forward_all(self.teacher, **features)
            assistant_logits = None
            if self.assistant is not None:
                assistant_logits, assistant_hidden, _ = forward_all(self.assistant, **features)
                teacher_hidden = assistant_hidden
        # The student through its module (DDP's forward hooks) would need a forward; run the loop on the unwrapped model.
        student_logits, student_hidden, mask = forward_all(unwrapped, **features)
        loss, terms = distillation_loss(
            student_logits, teacher_logits[-1], self.weights, assistant_logits, student_hidden, teacher_hidden, mask,
            inputs.get("labels"),
        )
        for name, value in terms.items():
            self._accumulate(f"distill_{name}", value)
        if self.weights.exits > 0 or self.weights.hard > 0:
            unwrapped.config.exits_trained = True  # the loss reaches the intermediate exit heads
        if return_outputs:
            return loss, {"loss": loss, "logits": student_logits[-1]}
        return loss


# ---------------------------------------------------------------------------------------------------------------------
# The whole procedure
# ---------------------------------------------------------------------------------------------------------------------


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def slenderize(
    teacher,
    train_dataset,
    eval_dataset,
    output_dir,
    *,
    heads,
    ffn,
    steps: int = 2,
    embedding_rank: int | None = None,
    assistant=None,
    tokenizer=None,
    importance: str = "taylor",
    importance_batches: int = 8,
    epochs_per_step: float = 1.0,
    final_epochs: float = 0.0,
    learning_rate: float = 5e-5,
    batch_size: int = 32,
    eval_batch_size: int = 64,
    max_length: int = 128,
    weights: DistillationWeights | None = None,
    exit_pooling: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
    logging_steps: int = 50,
    save_steps: int = 500,
    disable_tqdm: bool | None = None,
    log=print,
) -> dict:
    """Slenderize a fine-tuned classifier (COST-EFF): prune heads and neurons by importance in `steps` steps toward
    `heads` / `ffn` (one number, or one per layer) and, with `embedding_rank`, factorising the word embeddings by
    truncated SVD toward that rank (linearly over the steps, as the widths), distilling after each step from the teacher (and the assistant's
    exits). Saves each step in `output_dir/stepK/` (resumable) and the final Magic Pyramid model, its tokenizer and
    `slenderize_summary.json` at the root of `output_dir`. Returns the summary.

    teacher: a fine-tuned classifier (folder, Hub id or model), stock or Magic Pyramid. assistant: optional full-width
    multi-exit Magic Pyramid model (e.g. `train`'s output) whose exits teach the student's and from which the student
    starts; without it the student starts from the teacher with new exit heads (mean pooling for sentence-transformers
    checkpoints). `train_dataset` / `eval_dataset`: `datasets.Dataset`s with text and label columns.
    """
    from .data import prepare_dataset

    weights = weights or DistillationWeights()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "slenderize runs in one process (its student forward returns hidden states outside DDP's wrapper); launch it "
            "without torchrun / WORLD_SIZE > 1."
        )
    if importance not in IMPORTANCE_METHODS:
        raise ValueError(f"importance={importance!r} is not supported; choose one of {', '.join(map(repr, IMPORTANCE_METHODS))}.")
    output_dir = Path(output_dir)
    teacher_id = teacher if isinstance(teacher, (str, os.PathLike)) else getattr(teacher, "name_or_path", "<model>")
    if isinstance(teacher, (str, os.PathLike)):
        teacher = resolve_backbone(str(teacher))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(teacher)
        pooling = exit_pooling or ("mean" if is_sentence_embedding_model(teacher) else None)
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher)
    else:
        pooling = exit_pooling
    if tokenizer is None:
        raise ValueError("A teacher given as a model instance needs its tokenizer: pass tokenizer=...")
    if isinstance(assistant, (str, os.PathLike)):
        assistant = MagicPyramidForSequenceClassification.from_pretrained(str(assistant))
    teacher = _as_pyramid(teacher, pooling).eval()
    teacher.set_speed(**exact_speed(teacher.config))
    if assistant is not None:
        assistant = assistant.eval()
        assistant.set_speed(**exact_speed(assistant.config))
    config = teacher.config
    label2id = dict(config.label2id)
    num_layers = config.num_hidden_layers
    head_targets = resolve_targets("heads", heads, config.full_heads, num_layers)
    ffn_targets = resolve_targets("ffn", ffn, config.full_ffn, num_layers)
    # The widths must be possible on this family (albert: one width per shared group) before any work.
    MagicPyramidConfig(backbone_config=copy.deepcopy(config.backbone_config), heads_per_layer=head_targets, ffn_per_layer=ffn_targets)
    schedule = list(zip(width_schedule(config.resolved_heads(), head_targets, steps), width_schedule(config.resolved_ffn(), ffn_targets, steps)))
    ranks = [None] * steps
    if embedding_rank is not None:
        if isinstance(embedding_rank, bool) or not isinstance(embedding_rank, int) or not 1 <= embedding_rank <= config.embedding_size:
            raise ValueError(f"--embedding_rank {embedding_rank!r} is out of range: it must be an integer in [1, {config.embedding_size}] (the embedding size).")
        ranks = [step_ranks[0] for step_ranks in width_schedule([config.embedding_size], [embedding_rank], steps)]

    common = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column, max_length=max_length, seed=seed)
    train_data = prepare_dataset(train_dataset, tokenizer, label2id, split="train", max_samples=max_train_samples, **common)
    eval_data = None
    if eval_dataset is not None:
        eval_data = prepare_dataset(eval_dataset, tokenizer, label2id, split="validation", max_samples=max_eval_samples, **common)
    collator = DataCollatorWithPadding(tokenizer)
    # What the steps depend on: a rerun into the same folder resumes only a run of the same inputs and settings.
    from .training import dataset_digest

    settings = json.loads(json.dumps(dict(
        teacher=str(teacher_id), assistant=getattr(assistant, "name_or_path", None) if assistant is not None else None,
        heads=head_targets, ffn=ffn_targets, steps=steps, embedding_rank=embedding_rank, importance=importance,
        importance_batches=importance_batches, epochs_per_step=epochs_per_step, learning_rate=learning_rate,
        batch_size=batch_size, max_length=max_length, weights=asdict(weights), seed=seed,
        train_data_sha256=dataset_digest(train_data),
    ), default=str))
    settings_file = output_dir / SETTINGS_FILE
    if settings_file.is_file():
        recorded = json.loads(settings_file.read_text())
        changed = [f"{key} was {recorded.get(key)!r}, is {value!r}" for key, value in settings.items() if recorded.get(key) != value]
        if changed:
            raise ValueError(f"{output_dir} holds another slenderize run ({'; '.join(changed)}): choose another --output_dir, or remove it.")
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(settings_file, settings)
    barrier()

    def evaluate(model) -> float | None:
        if eval_data is None:
            return None
        return _accuracy(model, eval_data, collator, eval_batch_size)

    summary = {
        "teacher": str(teacher_id),
        "assistant": getattr(assistant, "name_or_path", None) if assistant is not None else None,
        "importance": importance,
        "importance_batches": importance_batches,
        "weights": asdict(weights),
        "targets": {"heads": head_targets, "ffn": ffn_targets, "embedding_rank": embedding_rank},
        "train_samples": len(train_data),
        "eval_samples": len(eval_data) if eval_data is not None else 0,
        "teacher_parameters": parameter_count(teacher),
        "steps": [],
    }
    set_seed(seed)
    student = None
    for step, ((step_heads, step_ffn), step_rank) in enumerate(zip(schedule, ranks), start=1):
        step_dir = output_dir / f"step{step}"
        marker = step_dir / STEP_MARKER
        if marker.is_file():
            info = json.loads(marker.read_text())
            log(f"slenderize step {step}/{steps}: already complete (heads {info['heads_per_layer']}, ffn {info['ffn_per_layer']}), skipped")
            summary["steps"].append(info)
            student = None  # loaded from the last complete step when the next one needs it
            continue
        if student is None:
            if step > 1:
                student = MagicPyramidForSequenceClassification.from_pretrained(str(output_dir / f"step{step - 1}" / "model"))
            else:
                student = copy.deepcopy(assistant if assistant is not None else teacher)
        set_seed(seed + step)
        loader = torch.utils.data.DataLoader(train_data.with_format("torch"), batch_size=batch_size, shuffle=False, collate_fn=collator)
        start = time.perf_counter()
        method = importance
        if importance == "taylor" and assistant is None and not student.config.exits_trained:
            # Fresh exit heads (the first step without an assistant) give noise gradients: rank by the final exit until
            # the exits have been distilled once.
            method = "taylor_final"
            log(f"slenderize step {step}/{steps}: the exit heads are untrained, so this step ranks by the final exit's loss "
                "(pass an assistant with trained exits to rank by every exit from the start)")
        head_scores, ffn_scores = importance_scores(
            student, loader, teacher, method, importance_batches, weights, assistant if method == "taylor" else None
        )
        groups = student.driver.layer_groups(student.config.backbone_config)
        student.slim(select_kept(head_scores, step_heads, groups), select_kept(ffn_scores, step_ffn, groups))
        if step_rank is not None and step_rank != student.config.embedding_rank:
            student.factorize_embeddings(step_rank)
        log(f"slenderize step {step}/{steps}: heads {student.config.heads_per_layer}, ffn {student.config.ffn_per_layer}, "
            f"embedding rank {student.config.embedding_rank}, {parameter_count(student):,} parameters; distilling")
        student.train_stage = 1
        for parameter in student.parameters():
            parameter.requires_grad_(True)
        info = _distil(
            student, teacher, assistant, weights, tokenizer, collator, train_data, eval_data, step_dir, epochs_per_step,
            learning_rate, batch_size, eval_batch_size, seed + step, logging_steps, save_steps, disable_tqdm,
            f"slenderize step {step}/{steps}",
        )
        info.update(
            step=step, importance=method, heads_per_layer=student.config.heads_per_layer, ffn_per_layer=student.config.ffn_per_layer,
            embedding_rank=student.config.embedding_rank,
            parameters=parameter_count(student), eval_accuracy=evaluate(student), seconds=round(time.perf_counter() - start, 1),
        )
        if is_main_process():
            student.save_pretrained(str(step_dir / "model"))
            _write_json_atomically(marker, info)
            shutil.rmtree(step_dir / "checkpoints", ignore_errors=True)
        barrier()
        log(f"slenderize step {step}/{steps}: done, validation accuracy {info['eval_accuracy']}")
        summary["steps"].append(info)

    if student is None:
        student = MagicPyramidForSequenceClassification.from_pretrained(str(output_dir / f"step{steps}" / "model"))
    student.set_speed(**exact_speed(student.config))
    summary.update(
        heads_per_layer=student.config.heads_per_layer,
        ffn_per_layer=student.config.ffn_per_layer,
        embedding_rank=student.config.embedding_rank,
        parameters=parameter_count(student),
        teacher_eval_accuracy=evaluate(teacher),
        eval_accuracy=summary["steps"][-1]["eval_accuracy"],
        final_model=str(output_dir),
    )
    if is_main_process():
        student.save_pretrained(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
        _write_json_atomically(output_dir / SUMMARY_FILE, summary)
    barrier()
    log(f"slenderized model saved to {output_dir}: {summary['parameters']:,} parameters (teacher {summary['teacher_parameters']:,}), "
        f"validation accuracy {summary['eval_accuracy']} (teacher {summary['teacher_eval_accuracy']})")
    return summary


def _distil(student, teacher, assistant, weights, tokenizer, collator, train_data, eval_data, step_dir, epochs,
            learning_rate, batch_size, eval_batch_size, seed, logging_steps, save_steps, disable_tqdm, description) -> dict:
    """One step's distillation: a fresh optimizer and schedule, resumable from the step's last Trainer checkpoint."""
    from transformers import TrainingArguments

    checkpoints = step_dir / "checkpoints"
    resume = _resume_checkpoint(checkpoints, step_dir.name, lambda *_: None) if checkpoints.is_dir() else None
    args = TrainingArguments(
        output_dir=str(checkpoints), num_train_epochs=epochs, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=eval_batch_size, warmup_steps=0.06,
        weight_decay=0.01, eval_strategy="no", save_strategy="steps", save_steps=save_steps, save_total_limit=1,
        logging_steps=logging_steps, report_to="none", seed=seed, dataloader_num_workers=0, disable_tqdm=disable_tqdm,
        **distributed_kwargs(),
    )
    trainer = SlenderizeTrainer(
        model=student, args=args, train_dataset=train_data, eval_dataset=eval_data, processing_class=tokenizer,
        data_collator=collator, compute_metrics=accuracy_metrics, teacher=teacher, assistant=assistant, weights=weights,
        progress_description=description,
    )
    output = trainer.train(resume_from_checkpoint=resume)
    student.eval()
    return {"train_loss": output.training_loss, "global_steps": output.global_step}


@torch.no_grad()
def _accuracy(model, data, collator, batch_size: int) -> float:
    """Accuracy of `model` (its logits at its speed) on a tokenized dataset with `labels`."""
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(data.with_format("torch"), batch_size=batch_size, collate_fn=collator)
    correct = total = 0
    for batch in loader:
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    return round(correct / max(total, 1), 6)


__all__ = [
    "DistillationWeights",
    "IMPORTANCE_METHODS",
    "SlenderizeTrainer",
    "distillation_loss",
    "forward_all",
    "hidden_mse",
    "importance_scores",
    "select_kept",
    "slenderize",
    "width_schedule",
]
