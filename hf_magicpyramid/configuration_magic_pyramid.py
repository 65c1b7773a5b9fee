"""Configuration of a Magic Pyramid model: a stock encoder plus exits, token pruning and per-layer widths.

This file travels to the Hub as custom code: it imports only installed packages and same-folder modules.
"""

from __future__ import annotations

import copy
import dataclasses
import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .adapters import check_supported, driver_for

EXIT_CRITERIA = ("entropy", "confidence", "patience")
EXIT_POOLINGS = ("cls", "mean")
EXIT_HEADS = ("full", "light")
EXIT_OBJECTIVES = ("joint", "two_stage", "self_distillation")
TOKEN_PRUNING_MODES = ("none", "topk", "threshold")
TOKEN_IMPORTANCE_MODES = ("cls_attention", "mean_attention")


def default_keep_ratios(num_layers: int, final_ratio: float = 0.5) -> list[float]:
    """A pyramid schedule: layer 1 sees every token, then the kept share falls linearly to `final_ratio` at the last layer."""
    if num_layers == 1:
        return [1.0]
    return [round(1.0 - (1.0 - final_ratio) * i / (num_layers - 1), 4) for i in range(num_layers)]


def _refuse_misspelt_fields(kwargs: dict) -> None:
    """PreTrainedConfig keeps unknown keyword arguments as attributes, so `exit_treshold=0.5` would be ignored in
    silence. A name that is not a field but close to one of ours is refused, naming the field it resembles."""
    import difflib

    ours = [field.name for field in dataclasses.fields(MagicPyramidConfig) if field.name in MagicPyramidConfig.__annotations__]
    for name in kwargs:
        if name in ours or hasattr(PreTrainedConfig, name):
            continue
        close = difflib.get_close_matches(name, ours, n=1, cutoff=0.85)
        if close:
            raise TypeError(f"MagicPyramidConfig() got an unexpected keyword argument {name!r}; did you mean {close[0]!r}?")


class MagicPyramidConfig(PreTrainedConfig):
    r"""
    Configuration of [`MagicPyramidModel`] and [`MagicPyramidForSequenceClassification`].

    Layers are numbered from 1 (the first encoder layer) to `num_hidden_layers`, like the exits that follow them.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`):
            The stock config of the encoder (any supported family: bert, roberta, xlm-roberta, electra, distilbert,
            albert, deberta-v2, mpnet, modernbert). Its layers, embeddings and classification head are the stock modules.
        exit_layers (`list[int]`, *optional*):
            The layers (1-based) followed by an exit classifier. Defaults to every layer. The last layer always has an
            exit: it is the backbone's own classification head.
        exit_pooling (`str`, defaults to `"cls"`):
            How an intermediate exit pools the sequence: `"cls"` (first token) or `"mean"` (over the real, kept tokens).
            The final exit pools as the stock head does.
        exit_head (`str`, defaults to `"full"`):
            The intermediate exits' classifier. `"full"`: pool → LayerNorm → dense → tanh → dropout → linear (a
            hidden × hidden dense layer per exit). `"light"`: pool → LayerNorm → dropout → linear, about
            num_labels / hidden of the full head's cost.
        exit_criterion (`str`, defaults to `"entropy"`):
            When a sample leaves early. `"entropy"`: the entropy of the exit's distribution, divided by log(num_labels),
            is below `exit_threshold`. `"confidence"`: the largest probability is above `exit_threshold`. `"patience"`:
            the prediction is unchanged for `patience` consecutive exits (for regression: changed by at most
            `regression_tolerance`).
        exit_threshold (`float`, *optional*):
            Threshold of the entropy or confidence criterion, in [0, 1]. `None` means never exit early (as do 0 for
            entropy and 1 for confidence). A converted model never exits early until its speed is set or calibrated.
        patience (`int`, *optional*):
            Consecutive agreeing exits needed by the patience criterion. `None`, or a value at least the number of
            exits, means never exit early.
        regression_tolerance (`float`, defaults to 0.0):
            For regression under the patience criterion: the largest change between exits still counted as agreement.
        exit_objective (`str`, defaults to `"joint"`):
            How the exits are trained. `"joint"`: every exit's loss, weighted by its depth. `"two_stage"`: the final head
            and backbone first, then only the exit heads with the backbone frozen. `"self_distillation"`: the exits learn
            the final head's distribution by KL divergence with the backbone frozen.
        distillation_temperature (`float`, defaults to 1.0):
            Softmax temperature of the self-distillation objective.
        token_pruning (`str`, defaults to `"none"`):
            `"none"`, `"topk"` (keep a share of each sample's tokens, `keep_ratios`) or `"threshold"` (drop tokens whose
            importance is below a learned per-layer threshold, `prune_thresholds`).
        token_importance (`str`, defaults to `"cls_attention"`):
            `"cls_attention"`: the attention the first token pays to each token, averaged over heads (works under sdpa).
            `"mean_attention"`: the attention each token receives, averaged over queries and heads (needs eager).
        keep_ratios (`list[float]`, *optional*):
            For `"topk"`: entry i is the share of each sample's real tokens that layer i+1 runs on; the first entry is
            1.0 and the list does not increase. Defaults to a linear pyramid from 1.0 to 0.5.
        prune_thresholds (`list[float]`, *optional*):
            For `"threshold"`: entry i is the importance below which a token is dropped before layer i+1, in [0, 1];
            the first entry is 0 (layer 1 sees every token). Defaults to all zeros (nothing dropped).
        keep_ratio_scale (`float`, defaults to 1.0):
            Run-time knob for `"topk"`: the kept share after pruning is `keep_ratios[i] ** keep_ratio_scale`, in [0, 10]:
            above 1 prunes harder, below 1 gentler, 0 turns pruning off (every share becomes 1).
        prune_threshold_offset (`float`, defaults to 0.0):
            Run-time knob for `"threshold"`: added to every threshold except the first, in [-1, 1].
        min_kept_tokens (`int`, defaults to 1):
            Pruning never leaves a sample with fewer tokens than this (the first token always stays).
        pruning_temperature (`float`, defaults to 0.01):
            LTP's soft phase: a token's soft mask is sigmoid((importance - threshold) / pruning_temperature).
        pruning_penalty (`float`, defaults to 0.1):
            LTP's soft phase: weight λ of the kept-token penalty (the mean soft-kept share of tokens over layers).
        heads_per_layer (`list[int]`, *optional*):
            Attention heads kept in each layer (a slenderized model). Defaults to the backbone's head count everywhere.
        ffn_per_layer (`list[int]`, *optional*):
            FFN (intermediate) neurons kept in each layer. Defaults to the backbone's intermediate size everywhere.
        embedding_rank (`int`, *optional*):
            Rank of a factorised word-embedding table (a vocab × rank lookup, then a rank × embedding-size projection,
            from a truncated SVD). `None` keeps the stock table. At most the embedding size.
        exits_trained (`bool`, *optional*):
            Whether the intermediate exit heads have been trained: `False` after `from_backbone` (fresh heads), set to
            `True` by the first training forward whose loss reaches them. `None` (configs that predate it) means unknown.
            Only used to warn when untrained heads would let samples leave early.
    """

    model_type = "magic_pyramid"
    # Outputs that are not predictions: the Trainer leaves them out of `EvalPrediction.predictions` (logits only, as stock).
    keys_to_ignore_at_inference = ["exit_layer", "exit_logits", "kept_tokens", "flops", "pruning_loss"]
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    backbone_config: PreTrainedConfig | dict | None = None
    exit_layers: list[int] | None = None
    exit_pooling: str = "cls"
    exit_head: str = "full"
    exit_criterion: str = "entropy"
    exit_threshold: float | None = None
    patience: int | None = None
    regression_tolerance: float = 0.0
    exit_objective: str = "joint"
    distillation_temperature: float = 1.0
    token_pruning: str = "none"
    token_importance: str = "cls_attention"
    keep_ratios: list[float] | None = None
    prune_thresholds: list[float] | None = None
    keep_ratio_scale: float = 1.0
    prune_threshold_offset: float = 0.0
    min_kept_tokens: int = 1
    pruning_temperature: float = 0.01
    pruning_penalty: float = 0.1
    heads_per_layer: list[int] | None = None
    ffn_per_layer: list[int] | None = None
    exits_trained: bool | None = None
    embedding_rank: int | None = None

    def __post_init__(self, **kwargs):
        _refuse_misspelt_fields(kwargs)
        # Keep our own copy: transformers resets sub-configs' attention settings, which must not reach the caller's model.
        if isinstance(self.backbone_config, PreTrainedConfig):
            self.backbone_config = copy.deepcopy(self.backbone_config)
        backbone_labels = _labels_of(self.backbone_config)
        if self.id2label is None and "num_labels" not in kwargs and backbone_labels is not None:
            # Labels not given: take the backbone's (a fine-tuned classifier's config carries them).
            self.id2label, self.label2id = backbone_labels
        super().__post_init__(**kwargs)
        # The top-level labels are the truth; the nested config (whose head is the final exit) must agree with them.
        if self.label2id is None:
            self.label2id = {label: index for index, label in self.id2label.items()}
        self.backbone_config.id2label = dict(self.id2label)
        self.backbone_config.label2id = dict(self.label2id)
        self.backbone_config.problem_type = self.problem_type
        self.validate_pyramid()

    # ----------------------------------------------------------------------------------------------------------------
    # Derived facts about the backbone
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def backbone_type(self) -> str:
        return self.backbone_config.model_type

    # DistilBertConfig.attribute_map maps num_hidden_layers, hidden_size and num_attention_heads onto its own names;
    # the FFN width's name comes from the backbone table.
    @property
    def num_hidden_layers(self) -> int:
        return self.backbone_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    @property
    def full_heads(self) -> int:
        return driver_for(self.backbone_type).full_widths(self.backbone_config)[0]

    @property
    def full_ffn(self) -> int:
        return driver_for(self.backbone_type).full_widths(self.backbone_config)[1]

    @property
    def embedding_size(self) -> int:
        """Width of the word-embedding table (albert and electra: their embedding_size; others: the hidden size)."""
        return getattr(self.backbone_config, "embedding_size", None) or self.hidden_size

    def resolved_exit_layers(self) -> list[int]:
        """Sorted 1-based exit layers, always ending with the last layer."""
        layers = self.exit_layers if self.exit_layers is not None else range(1, self.num_hidden_layers + 1)
        return sorted(set(layers) | {self.num_hidden_layers})

    def resolved_heads(self) -> list[int]:
        return list(self.heads_per_layer) if self.heads_per_layer is not None else [self.full_heads] * self.num_hidden_layers

    def resolved_ffn(self) -> list[int]:
        return list(self.ffn_per_layer) if self.ffn_per_layer is not None else [self.full_ffn] * self.num_hidden_layers

    def resolved_keep_ratios(self) -> list[float]:
        return list(self.keep_ratios) if self.keep_ratios is not None else default_keep_ratios(self.num_hidden_layers)

    def resolved_prune_thresholds(self) -> list[float]:
        if self.prune_thresholds is not None:
            return list(self.prune_thresholds)
        return [0.0] * self.num_hidden_layers

    # ----------------------------------------------------------------------------------------------------------------
    # Validation: every bad value fails here, naming the value and what is allowed
    # ----------------------------------------------------------------------------------------------------------------
    def validate_pyramid(self) -> None:
        """Check every Magic Pyramid field; raise `ValueError` naming the bad value and what is allowed."""
        check_supported(self.backbone_config.model_type)
        num_layers = self.num_hidden_layers
        _check_choice("exit_pooling", self.exit_pooling, EXIT_POOLINGS)
        _check_choice("exit_head", self.exit_head, EXIT_HEADS)
        _check_choice("exit_criterion", self.exit_criterion, EXIT_CRITERIA)
        _check_choice("exit_objective", self.exit_objective, EXIT_OBJECTIVES)
        _check_choice("token_pruning", self.token_pruning, TOKEN_PRUNING_MODES)
        _check_choice("token_importance", self.token_importance, TOKEN_IMPORTANCE_MODES)

        if self.exit_layers is not None:
            if len(self.exit_layers) == 0:
                raise ValueError("exit_layers=[] is empty: give at least one layer in [1, %d], or None for every layer." % num_layers)
            for layer in self.exit_layers:
                if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
                    raise ValueError(
                        f"exit_layers contains {layer!r}: exit layers are 1-based integers in [1, {num_layers}] "
                        f"for this {num_layers}-layer {self.backbone_type} backbone."
                    )
        check_speed(self.exit_criterion, self.exit_threshold, self.patience)
        _check_range("regression_tolerance", self.regression_tolerance, 0.0, math.inf)
        _check_range("distillation_temperature", self.distillation_temperature, 1e-6, math.inf)
        _check_range("pruning_temperature", self.pruning_temperature, 1e-6, math.inf)
        _check_range("pruning_penalty", self.pruning_penalty, 0.0, math.inf)
        check_pruning_knobs(self.keep_ratio_scale, self.prune_threshold_offset)
        if isinstance(self.min_kept_tokens, bool) or not isinstance(self.min_kept_tokens, int) or self.min_kept_tokens < 1:
            raise ValueError(f"min_kept_tokens={self.min_kept_tokens!r} is invalid: it must be an integer >= 1.")

        if self.keep_ratios is not None:
            check_keep_ratios(self.keep_ratios, num_layers)
        if self.prune_thresholds is not None:
            check_prune_thresholds(self.prune_thresholds, num_layers)
        if self.embedding_rank is not None:
            rank = self.embedding_rank
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.embedding_size:
                raise ValueError(
                    f"embedding_rank={rank!r} is invalid: it must be an integer in [1, {self.embedding_size}] (the "
                    f"embedding size), or None for the stock table."
                )
        for name, values, full in (
            ("heads_per_layer", self.heads_per_layer, self.full_heads),
            ("ffn_per_layer", self.ffn_per_layer, self.full_ffn),
        ):
            if values is None:
                continue
            driver = driver_for(self.backbone_type)
            if not driver.slimmable and any(width != full for width in values):
                raise ValueError(f"{name}={values} is not supported for {self.backbone_type}: {driver.slim_note}.")
            if len(values) != num_layers:
                raise ValueError(f"{name} has {len(values)} entries; it needs one per layer ({num_layers}).")
            for layer, width in enumerate(values, start=1):
                if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= full:
                    raise ValueError(
                        f"{name}[{layer - 1}]={width!r} (layer {layer}) is invalid: widths are integers in [1, {full}] "
                        f"(the backbone's full width)."
                    )
            groups = driver.layer_groups(self.backbone_config)
            for layer, group in enumerate(groups):
                first = groups.index(group)
                if values[layer] != values[first]:
                    raise ValueError(
                        f"{name}={values} is not supported for {self.backbone_type}: layers {first + 1} and {layer + 1} "
                        f"share one set of weights, so their widths must be equal (give one width to every layer of a "
                        f"shared group)."
                    )


def _labels_of(backbone_config):
    """(id2label, label2id) of a backbone config (object or dict) that names its labels, else None."""
    if isinstance(backbone_config, dict):
        id2label, label2id = backbone_config.get("id2label"), backbone_config.get("label2id")
    else:
        id2label, label2id = getattr(backbone_config, "id2label", None), getattr(backbone_config, "label2id", None)
    if not id2label:
        return None
    id2label = {int(k): v for k, v in id2label.items()}
    return id2label, dict(label2id) if label2id else {v: k for k, v in id2label.items()}


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(repr(a) for a in allowed)}.")


def _check_range(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or math.isnan(value):
        raise ValueError(f"{name}={value!r} is out of range: it must be a number in [{low}, {high}].")


def check_speed(exit_criterion: str, exit_threshold, patience) -> None:
    """Validate the early-exit knob; shared by the config and `set_speed`."""
    if exit_threshold is not None:
        if exit_criterion == "patience":
            raise ValueError(
                f"exit_threshold={exit_threshold!r} has no meaning for exit_criterion='patience'; set `patience` instead "
                "(or choose exit_criterion 'entropy' or 'confidence')."
            )
        _check_range("exit_threshold", exit_threshold, 0.0, 1.0)
    if patience is not None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience={patience!r} is invalid: it must be an integer >= 1 (or None for never exiting early).")
        if exit_criterion != "patience":
            raise ValueError(
                f"patience={patience!r} is only used by exit_criterion='patience', but exit_criterion={exit_criterion!r}."
            )


def exact_speed(config: MagicPyramidConfig) -> dict:
    """The `set_speed` arguments that run the exact model: no early exit and no token pruning."""
    speed = {"patience": None} if config.exit_criterion == "patience" else {"exit_threshold": None}
    if config.token_pruning == "topk":
        speed["keep_ratio_scale"] = 0.0
    elif config.token_pruning == "threshold":
        speed["prune_threshold_offset"] = -1.0
    return speed


def check_pruning_knobs(keep_ratio_scale, prune_threshold_offset) -> None:
    """Validate the run-time pruning knobs; shared by the config and `set_speed`."""
    if isinstance(keep_ratio_scale, bool) or not isinstance(keep_ratio_scale, (int, float)) or not 0 <= keep_ratio_scale <= 10:
        raise ValueError(
            f"keep_ratio_scale={keep_ratio_scale!r} is out of range: it must be a number in [0, 10] (0 turns pruning off)."
        )
    _check_range("prune_threshold_offset", prune_threshold_offset, -1.0, 1.0)


def check_keep_ratios(keep_ratios, num_layers: int) -> None:
    if len(keep_ratios) != num_layers:
        raise ValueError(f"keep_ratios has {len(keep_ratios)} entries; it needs one per layer ({num_layers}).")
    for i, ratio in enumerate(keep_ratios):
        _check_range(f"keep_ratios[{i}]", ratio, 1e-6, 1.0)
    if keep_ratios[0] != 1.0:
        raise ValueError(f"keep_ratios[0]={keep_ratios[0]!r}: layer 1 always runs on every token, so the first entry must be 1.0.")
    for i in range(1, num_layers):
        if keep_ratios[i] > keep_ratios[i - 1]:
            raise ValueError(
                f"keep_ratios must not increase (a removed token cannot come back), but keep_ratios[{i}]={keep_ratios[i]} "
                f"> keep_ratios[{i - 1}]={keep_ratios[i - 1]}."
            )


def check_prune_thresholds(prune_thresholds, num_layers: int) -> None:
    if len(prune_thresholds) != num_layers:
        raise ValueError(f"prune_thresholds has {len(prune_thresholds)} entries; it needs one per layer ({num_layers}).")
    for i, threshold in enumerate(prune_thresholds):
        _check_range(f"prune_thresholds[{i}]", threshold, 0.0, 1.0)
    if prune_thresholds[0] != 0.0:
        raise ValueError(
            f"prune_thresholds[0]={prune_thresholds[0]!r}: layer 1 always runs on every token, so the first entry must be 0."
        )


__all__ = ["MagicPyramidConfig", "default_keep_ratios", "exact_speed"]
