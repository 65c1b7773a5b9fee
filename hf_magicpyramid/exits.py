"""Exit classifiers, the exit criteria and the exit training losses.

This file travels to the Hub as custom code: it imports only installed packages.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Pool (batch, seq_len, hidden) to (batch, hidden): the first token, or the mean over real (mask 1) tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class ExitHead(nn.Module):
    """An intermediate exit: pool → LayerNorm → dense → tanh → dropout → linear.

    The LayerNorm lets one head design serve post-norm (BERT) and pre-norm (ModernBERT) encoders, whose intermediate
    states are not normalised.
    """

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, dropout: float, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.pooling = pooling
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, seq_len, hidden), (batch, seq_len) → logits (batch, num_labels)."""
        pooled = self.norm(pool(hidden, attention_mask, self.pooling))
        return self.classifier(self.dropout(torch.tanh(self.dense(pooled))))


class LightExitHead(nn.Module):
    """A light intermediate exit: pool → LayerNorm → dropout → linear (no hidden × hidden dense layer)."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, dropout: float, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.pooling = pooling
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, seq_len, hidden), (batch, seq_len) → logits (batch, num_labels)."""
        return self.classifier(self.dropout(self.norm(pool(hidden, attention_mask, self.pooling))))


EXIT_HEAD_CLASSES = {"full": ExitHead, "light": LightExitHead}


def make_exit_head(kind: str, hidden_size: int, num_labels: int, pooling: str, dropout: float, layer_norm_eps: float = 1e-12) -> nn.Module:
    """The exit head of `kind` ("full": `ExitHead`, "light": `LightExitHead`, the config's `exit_head`)."""
    if kind not in EXIT_HEAD_CLASSES:
        raise ValueError(f"exit_head={kind!r} is not supported; choose one of {', '.join(repr(k) for k in EXIT_HEAD_CLASSES)}.")
    return EXIT_HEAD_CLASSES[kind](hidden_size, num_labels, pooling, dropout, layer_norm_eps)


# ---------------------------------------------------------------------------------------------------------------------
# Criteria: which samples leave at this exit
# ---------------------------------------------------------------------------------------------------------------------


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) divided by log(num_labels): in [0, 1] whatever the label count. (batch,)"""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return entropy / math.log(logits.shape[-1])


class PatienceState:
    """Per-sample memory of the patience criterion: the last prediction and how many exits in a row agreed with it."""

    def __init__(self, batch_size: int, device):
        self.previous: torch.Tensor | None = None
        self.streak = torch.zeros(batch_size, dtype=torch.long, device=device)

    def keep_rows(self, rows: torch.Tensor) -> None:
        if self.previous is not None:
            self.previous = self.previous[rows]
        self.streak = self.streak[rows]


def exit_rule_can_fire(criterion: str, threshold: float | None, patience: int | None, problem_type: str | None) -> bool:
    """False when no sample can ever leave early under these settings (so intermediate heads need not run)."""
    if criterion == "patience":
        return patience is not None
    if threshold is None or problem_type == "regression":
        return False
    return threshold > 0 if criterion == "entropy" else threshold < 1


def exit_decision(
    logits: torch.Tensor,
    criterion: str,
    threshold: float | None,
    patience: int | None,
    problem_type: str | None,
    state: PatienceState,
    regression_tolerance: float = 0.0,
) -> torch.Tensor:
    """Bool (batch,): which samples satisfy the exit condition at this exit.

    `threshold=None` (entropy, confidence) or `patience=None` means never. Entropy: normalised entropy < threshold.
    Confidence: max probability > threshold (sigmoid per label for multi-label: every label's margin). Patience: the
    prediction equals the previous exit's for `patience` consecutive exits (regression: |change| <= tolerance).
    """
    batch = logits.shape[0]
    never = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    if criterion == "patience":
        if problem_type == "regression":
            prediction = logits.detach().float()
        elif problem_type == "multi_label_classification":
            prediction = logits.detach() > 0
        else:
            prediction = logits.detach().argmax(dim=-1)
        if state.previous is None:
            agree = never
        elif problem_type == "regression":
            agree = ((prediction - state.previous).abs() <= regression_tolerance).all(dim=-1)
        elif problem_type == "multi_label_classification":
            agree = (prediction == state.previous).all(dim=-1)
        else:
            agree = prediction == state.previous
        state.streak = torch.where(agree, state.streak + 1, torch.zeros_like(state.streak))
        state.previous = prediction
        return never if patience is None else state.streak >= patience
    if threshold is None or problem_type == "regression":
        return never
    if problem_type == "multi_label_classification":
        probs = torch.sigmoid(logits.detach().float())
        confidence = torch.maximum(probs, 1 - probs).min(dim=-1).values
        if criterion == "confidence":
            return confidence > threshold
        binary_entropy = -(probs * probs.clamp_min(1e-12).log() + (1 - probs) * (1 - probs).clamp_min(1e-12).log())
        return (binary_entropy / math.log(2)).max(dim=-1).values < threshold
    if criterion == "entropy":
        return normalized_entropy(logits.detach()) < threshold
    return F.softmax(logits.detach().float(), dim=-1).max(dim=-1).values > threshold


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def task_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """The stock heads' loss: MSE for regression, cross-entropy single-label, BCE-with-logits multi-label."""
    if problem_type == "regression":
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def resolve_problem_type(config, labels: torch.Tensor | None) -> str:
    """The stock heads' rule for `problem_type` when the config does not set it."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels is not None and labels.dtype not in (torch.long, torch.int):
        return "multi_label_classification"
    return "single_label_classification"


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, problem_type: str) -> torch.Tensor:
    """KL(teacher || student) at a temperature, scaled by T² (Hinton); MSE for regression."""
    teacher_logits = teacher_logits.detach()
    if problem_type == "regression":
        return F.mse_loss(student_logits, teacher_logits)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(student_logits / temperature, torch.sigmoid(teacher_logits / temperature))
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


def exit_objective_loss(
    exit_logits: list[torch.Tensor],
    exit_layers: list[int],
    labels: torch.Tensor,
    problem_type: str,
    objective: str,
    stage: int,
    temperature: float,
) -> torch.Tensor:
    """The training loss over every exit; the last entry of `exit_logits` is the final head.

    joint: Σ_k layer_k · loss_k / Σ_k layer_k (deeper exits weigh more: PABEE/ElasticBERT).
    two_stage: stage 1 the final head's loss; stage 2 the mean of the intermediate exits' losses (DeeBERT).
    self_distillation: stage 1 the final head's loss; stage 2 the mean KL of each exit to the final head (FastBERT).
    """
    final = exit_logits[-1]
    intermediate = exit_logits[:-1]
    if objective == "joint":
        weights = torch.tensor(exit_layers, dtype=final.dtype, device=final.device)
        losses = torch.stack([task_loss(logits, labels, problem_type) for logits in exit_logits])
        return (weights * losses).sum() / weights.sum()
    if stage == 1 or not intermediate:
        return task_loss(final, labels, problem_type)
    if objective == "two_stage":
        return torch.stack([task_loss(logits, labels, problem_type) for logits in intermediate]).mean()
    return torch.stack([distillation_loss(logits, final, temperature, problem_type) for logits in intermediate]).mean()


__all__ = ["ExitHead", "LightExitHead", "make_exit_head", "exit_decision", "normalized_entropy", "exit_objective_loss", "task_loss"]
