"""Magic Pyramid models: a stock encoder driven layer by layer, with early exits (depth) and token pruning (width).

The backbone is the stock `XxxForSequenceClassification` of the installed transformers, held whole as `self.backbone`:
its embeddings, layers and classification head run unchanged (the head is the final exit). The loop below only decides
which samples and which tokens go on to the next layer, and really removes the others from the batch and the sequence.

This file travels to the Hub as custom code: it imports only installed packages and same-folder modules.
"""

from __future__ import annotations

import collections
import copy
import difflib
import inspect
import os
import re
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .adapters import ADAPTERS, check_supported, driver_for
from .configuration_magic_pyramid import MagicPyramidConfig, check_pruning_knobs, check_speed
from .flops import sample_flops
from .exits import (
    make_exit_head,
    PatienceState,
    exit_decision,
    exit_objective_loss,
    exit_rule_can_fire,
    resolve_problem_type,
    task_loss,
)
from .pruning import AttentionCapture, select_tokens, threshold_counts, topk_counts


logger = logging.get_logger(__name__)

AUTO_MAP = {
    "AutoConfig": "configuration_magic_pyramid.MagicPyramidConfig",
    "AutoModel": "modeling_magic_pyramid.MagicPyramidModel",
    "AutoModelForSequenceClassification": "modeling_magic_pyramid.MagicPyramidForSequenceClassification",
}
# The custom code that travels with a saved model (save_pretrained copies this file and its relative imports, transitively,
# even indented ones): only files the model needs at load time, never presets or CLI code. tests/test_hub.py checks it.
REMOTE_CODE_FILES = ("configuration_magic_pyramid.py", "modeling_magic_pyramid.py", "adapters.py", "exits.py", "flops.py", "pruning.py")


@dataclass
class MagicPyramidClassifierOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`, *optional*): the configured training objective, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): each sample's logits at the exit it took.
        exit_layer (`torch.LongTensor` of shape `(batch_size,)`): the 1-based layer each sample exited after.
        exit_logits (`tuple(torch.FloatTensor)`, *optional*): logits of every exit, in `exit_layers` order, for the whole
            batch (training, or `output_all_exits=True`).
        kept_tokens (`torch.LongTensor` of shape `(batch_size, num_layers)`): real tokens each sample ran through in each
            layer (0 after it exited).
        flops (`torch.LongTensor` of shape `(batch_size,)`, *optional*): with `output_flops=True`, analytic FLOPs of the
            work each sample really cost (embeddings, layers on its kept tokens, importance scoring, the exit heads it ran).
            Compare with `flops.full_model_flops(model, attention_mask)` for the FLOP speedup.
        pruning_loss (`torch.FloatTensor`, *optional*): LTP's kept-token penalty (soft phase), before its weight
            `pruning_penalty`; already included in `loss`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exit_layer: torch.LongTensor | None = None
    exit_logits: tuple[torch.FloatTensor, ...] | None = None
    kept_tokens: torch.LongTensor | None = None
    flops: torch.LongTensor | None = None
    pruning_loss: torch.FloatTensor | None = None


@dataclass
class MagicPyramidModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, kept_len, hidden_size)`): the last layer's output
            on the tokens still kept (all tokens when pruning is off).
        attention_mask (`torch.LongTensor` of shape `(batch_size, kept_len)`): 1 on the kept real tokens.
        token_positions (`torch.LongTensor` of shape `(batch_size, kept_len)`): original positions of the kept tokens.
        kept_tokens (`torch.LongTensor` of shape `(batch_size, num_layers)`): real tokens per sample in each layer.
    """

    last_hidden_state: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    token_positions: torch.LongTensor | None = None
    kept_tokens: torch.LongTensor | None = None


class FactorizedEmbedding(nn.Module):
    """A word-embedding table of rank r, used where the stock `nn.Embedding` was: a (vocab, r) lookup `table`, then an
    r → embedding-size `projection` (no bias). `weight` gives the (vocab, embedding size) table it stands for."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = num_embeddings, embedding_dim, rank, padding_idx
        self.table = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.projection = nn.Linear(rank, embedding_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.table(input_ids))

    @property
    def weight(self) -> torch.Tensor:
        return self.projection(self.table.weight)


class MagicPyramidPreTrainedModel(PreTrainedModel):
    config_class = MagicPyramidConfig
    config: MagicPyramidConfig
    base_model_prefix = "magic_pyramid"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # forward computes its own loss from its own outputs and does not read `num_items_in_batch`: the Trainer must scale it.
    accepts_loss_kwargs = False
    _auto_model_class = None  # set by subclasses: the Auto class that builds the stock backbone

    def __init__(self, config: MagicPyramidConfig):
        super().__init__(config)
        self.adapter = check_supported(config.backbone_type)  # the family's table entry: module paths
        self.driver = driver_for(config.backbone_type)  # how its layers are called (shared, stateless)
        backbone_config = copy.deepcopy(config.backbone_config)
        for name in ("id2label", "label2id", "problem_type"):
            setattr(backbone_config, name, copy.deepcopy(getattr(config, name)))
        attn = config._attn_implementation
        if attn == "sdpa" and not self.driver.sdpa:
            logger.warning_once(f"{self.adapter.model_type} has no sdpa attention; running it with eager attention.")
            attn = "eager"
            config._attn_implementation = "eager"
        self.backbone = self._auto_model_class.from_config(backbone_config, attn_implementation=attn)
        self._slim_to_config()
        if config.embedding_rank is not None:
            stock = self.get_input_embeddings()
            self.set_input_embeddings(
                FactorizedEmbedding(stock.num_embeddings, stock.embedding_dim, config.embedding_rank, stock.padding_idx)
            )
        if config.token_pruning == "threshold":
            # LTP's learned per-layer thresholds: parameters (so the soft phase can learn them), mirrored in the config.
            self.prune_thresholds = nn.Parameter(torch.tensor(config.resolved_prune_thresholds(), dtype=torch.float32))
        # "soft": LTP's first phase in training mode (sigmoid masks, thresholds learned); "hard": tokens really removed.
        self.pruning_phase = "hard"
        # save_pretrained adds only the saved class to `auto_map`; every Auto class must load a saved folder remotely.
        config.auto_map = dict(AUTO_MAP, **(getattr(config, "auto_map", None) or {}))

    # The stock model inside has its own `_init_weights`; `initialize_weights` dispatches to it for its modules.
    # `transformers.initialization` functions skip tensors already loaded from a checkpoint.
    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config.backbone_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MagicPyramidPreTrainedModel) and getattr(module, "prune_thresholds", None) is not None:
            init.copy_(module.prune_thresholds, torch.tensor(module.config.resolved_prune_thresholds()))

    def sync_config(self) -> None:
        """Copy learned state that the config mirrors (LTP thresholds) into the config."""
        if getattr(self, "prune_thresholds", None) is not None:
            values = [round(float(v), 6) for v in self.prune_thresholds.detach().clamp(0.0, 1.0).cpu()]
            values[0] = 0.0
            self.config.prune_thresholds = values

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict: every weight the model needs must be in the checkpoint, and every
        checkpoint weight must be used. An edited `config.json` (another backbone type, layer count, hidden size, label
        count or widths), a missing `config.json` or a damaged weights file is a `ValueError` that names the tensors and
        what likely changed, instead of a model with freshly initialised weights and a load report.
        `ignore_mismatched_sizes=True` keeps its stock meaning (re-initialise what does not fit, e.g. a new label count)."""
        source = str(pretrained_model_name_or_path)
        if not isinstance(kwargs.get("config"), PreTrainedConfig) and os.path.isdir(source):
            config_file = os.path.join(source, kwargs.get("subfolder") or "", "config.json")
            if not os.path.isfile(config_file):
                raise ValueError(
                    f"{source} has no config.json: a Magic Pyramid checkpoint needs the config.json it was saved with "
                    "(save_pretrained writes it); copy it back, or pass config=... ."
                )
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.get("ignore_mismatched_sizes", False)
        kwargs["ignore_mismatched_sizes"] = True  # so the mismatched tensors can be named below; refused unless asked for
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except Exception as error:
            if type(error).__name__ == "SafetensorError" or "deserializing header" in str(error):
                raise ValueError(
                    f"The weights file in {source} is truncated or damaged ({error}); copy or download it again."
                ) from error
            raise
        problem = _load_problem(model, source, info, ignore_mismatched)
        if problem is not None:
            raise ValueError(problem)
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.sync_config()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    @property
    def base_encoder(self) -> nn.Module:
        """The stock base model (e.g. `BertModel`) whose modules the loop runs."""
        return self.driver.base_model(self.backbone)

    @property
    def layers(self) -> list[nn.Module]:
        return self.driver.layer_modules(self.base_encoder)

    def _slim_to_config(self) -> None:
        """Shrink each layer to `heads_per_layer` / `ffn_per_layer` so a slender checkpoint loads into the right shapes
        (layers that share weights, albert's, are cut once)."""
        config = self.config
        if config.heads_per_layer is None and config.ffn_per_layer is None:
            return
        groups = self.driver.layer_groups(config.backbone_config)
        done = set()
        for group, layer, heads, ffn in zip(groups, self.layers, config.resolved_heads(), config.resolved_ffn()):
            if group in done:
                continue
            done.add(group)
            full_heads, full_ffn = self.driver.layer_widths(layer)
            self.driver.slim_layer(
                layer,
                list(range(heads)) if heads != full_heads else None,
                list(range(ffn)) if ffn != full_ffn else None,
                base=self.base_encoder,
            )

    def slim(self, head_index=None, ffn_index=None) -> "MagicPyramidPreTrainedModel":
        """Structural pruning, in place: keep in layer i only the attention heads `head_index[i]` and the FFN neurons
        `ffn_index[i]` (0-based indices in the layer's current numbering; None, or a None entry, keeps them all).
        The removed heads' q/k/v rows and attention-output columns, and the removed neurons' rows and columns, are
        gone from the weights; `heads_per_layer` / `ffn_per_layer` are updated, so `save_pretrained` and
        `from_pretrained` (also with `trust_remote_code`) rebuild the same shapes. Layers that share weights (albert)
        must be given the same indices. Returns self.
        """
        config = self.config
        num_layers = config.num_hidden_layers
        groups = self.driver.layer_groups(config.backbone_config)
        plans = []
        for name, indices, position in (("head_index", head_index, 0), ("ffn_index", ffn_index, 1)):
            if indices is None:
                plans.append([None] * num_layers)
                continue
            if len(indices) != num_layers:
                raise ValueError(f"{name} has {len(indices)} entries; it needs one per layer ({num_layers}), None to keep a layer whole.")
            plan = []
            for layer, (group, keep) in enumerate(zip(groups, indices)):
                if keep is not None:
                    width = self.driver.layer_widths(self.layers[layer])[position]
                    keep = sorted(set(int(i) for i in torch.as_tensor(keep).reshape(-1).tolist()))
                    if not keep:
                        raise ValueError(f"{name}[{layer}] is empty: layer {layer + 1} must keep at least one {'head' if position == 0 else 'FFN neuron'}.")
                    if keep[0] < 0 or keep[-1] >= width:
                        raise ValueError(f"{name}[{layer}]={keep} is out of range: layer {layer + 1} has indices 0..{width - 1}.")
                    if len(keep) == width:
                        keep = None
                first = groups.index(group)
                if first != layer and keep != plan[first]:
                    raise ValueError(
                        f"{name}[{layer}]={keep} differs from {name}[{first}]={plan[first]}: layers {first + 1} and {layer + 1} "
                        f"of this {config.backbone_type} model share one set of weights, so they keep the same indices."
                    )
                plan.append(keep)
            plans.append(plan)
        done = set()
        for group, layer, heads, ffn in zip(groups, self.layers, *plans):
            if group in done:
                continue
            done.add(group)
            self.driver.slim_layer(
                layer,
                None if heads is None else torch.tensor(heads),
                None if ffn is None else torch.tensor(ffn),
                base=self.base_encoder,
            )
        widths = self.layer_widths()
        config.heads_per_layer = [heads for heads, _ in widths]
        config.ffn_per_layer = [ffn for _, ffn in widths]
        config.validate_pyramid()
        return self

    @torch.no_grad()
    def factorize_embeddings(self, rank: int) -> "MagicPyramidPreTrainedModel":
        """Replace the word-embedding table W (vocab × embedding size) by its truncated SVD of rank `rank`:
        a lookup U_r·S_r (vocab × rank) and a projection V_rᵀ (rank → embedding size), the best rank-`rank` table in
        the least-squares sense; `rank` equal to the embedding size reproduces W (up to float rounding). An already
        factorised table is factorised again from the table it stands for. Sets `embedding_rank`, so the model saves
        and reloads (also with `trust_remote_code`) in this shape. Returns self."""
        limit = self.config.embedding_size
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(f"embedding rank {rank!r} is invalid: it must be an integer in [1, {limit}] (the embedding size).")
        embeddings = self.get_input_embeddings()
        weight = embeddings.weight.detach()
        left, singular, right = torch.linalg.svd(weight.float(), full_matrices=False)
        factorized = FactorizedEmbedding(embeddings.num_embeddings, embeddings.embedding_dim, rank, embeddings.padding_idx)
        factorized.to(device=weight.device, dtype=weight.dtype)
        factorized.table.weight.copy_(left[:, :rank] * singular[:rank])
        factorized.projection.weight.copy_(right[:rank].T)
        self.set_input_embeddings(factorized)
        self.config.embedding_rank = rank
        return self

    def layer_widths(self) -> list[tuple[int, int]]:
        """(attention heads, FFN neurons) of every layer as built."""
        return [self.driver.layer_widths(layer) for layer in self.layers]

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        """Validate the inputs once per call; returns the (batch, seq_len) long 0/1 attention mask the loop runs on.

        Like the stock models, a bool or float mask is accepted when it holds only 0 and 1 (same logits as the long
        mask); any other value is refused, since the stock models would read it as a soft mask that this loop cannot run.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        limit = self.driver.max_positions(self.config.backbone_config)
        if limit is not None and shape[1] > limit:
            raise ValueError(
                f"Input length {shape[1]} exceeds the {limit} positions this {self.adapter.model_type} backbone supports; "
                f"truncate the input (e.g. tokenizer(..., truncation=True, max_length={limit}))."
            )
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        if attention_mask is None:
            return torch.ones(shape, dtype=torch.long, device=device)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must be a 2D (batch, seq_len) 0/1 tensor of shape {tuple(shape)}, got {got}.")
        if attention_mask.dtype != torch.long:
            if attention_mask.dtype != torch.bool:
                bad = (attention_mask != 0) & (attention_mask != 1)
                if bool(bad.any()):
                    raise ValueError(
                        f"attention_mask holds {attention_mask[bad][0].item()!r}: it must hold only 0 (padding) and 1 (real "
                        f"token), as long, int, bool or float; soft masks are not supported."
                    )
            attention_mask = attention_mask.to(torch.long)
        return attention_mask

    def _pruning_plan(self, keep_ratio_scale, prune_threshold_offset):
        """Per layer (0-based, before layer i runs): ("topk", ratio) / ("threshold", value) / None."""
        config = self.config
        mode = config.token_pruning
        if mode == "none":
            return [None] * config.num_hidden_layers
        scale = config.keep_ratio_scale if keep_ratio_scale is None else keep_ratio_scale
        offset = config.prune_threshold_offset if prune_threshold_offset is None else prune_threshold_offset
        check_pruning_knobs(scale, offset)
        plan = [None]
        if mode == "topk":
            ratios = [min(1.0, ratio**scale) for ratio in config.resolved_keep_ratios()]
            for i in range(1, config.num_hidden_layers):
                # Score and select only where the kept share falls; elsewhere the same tokens go on.
                plan.append(("topk", ratios[i]) if ratios[i] < ratios[i - 1] else None)
        else:
            soft = self.training and self.pruning_phase == "soft"
            for i in range(1, config.num_hidden_layers):
                if soft:
                    plan.append(("soft", i))
                    continue
                value = float(self.prune_thresholds[i]) + offset
                plan.append(("threshold", value) if value > 0 else None)
        return plan


def _hub_kwargs(kwargs: dict) -> dict:
    """The from_pretrained arguments that say where a config comes from."""
    return {name: kwargs[name] for name in _HUB_OPTIONS if name in kwargs}


class _Stream:
    """The rows (samples) and columns (tokens) still running, with what each layer needs about them."""

    def __init__(self, model, hidden, attention_mask):
        self.model = model
        batch, seq_len = attention_mask.shape
        self.hidden = hidden
        self.attention_mask = attention_mask
        self.positions = torch.arange(seq_len, device=hidden.device).unsqueeze(0).expand(batch, seq_len)
        self.rows = torch.arange(batch, device=hidden.device)  # original sample index of each running row
        self.original_lengths = attention_mask.sum(dim=1)
        self.pruned = False
        self.ctx = None
        self.scores = None  # (batch, seq_len) importance from the last layer, when the next one prunes
        self.soft_keep = None  # (batch, seq_len) LTP's soft mask, a product over layers (soft phase only)
        self.penalties: list[torch.Tensor] = []
        self.scored_layers: list[int] = []  # 1-based layers whose output this call scored (the plan it ran, for FLOPs)
        self.drop_padding_columns()

    def refresh(self):
        key_bias = None if self.soft_keep is None else self.soft_keep.clamp(min=1e-6).log()
        self.ctx = self.model.driver.build_context(
            self.model.base_encoder, self.hidden, self.attention_mask, self.positions, self.pruned, key_bias
        )

    def soften(self, threshold: torch.Tensor, temperature: float):
        """LTP's soft phase: multiply each token's running mask by sigmoid((importance - threshold) / T)."""
        real = self.attention_mask.to(self.scores.dtype)
        soft = torch.sigmoid((self.scores - threshold) / temperature) * real
        soft = torch.cat([real[:, :1], soft[:, 1:]], dim=1)  # the first token always stays
        self.soft_keep = soft if self.soft_keep is None else self.soft_keep * soft
        # The kept-token penalty: the soft share of each sample's real tokens still in play.
        self.penalties.append((self.soft_keep.sum(dim=1) / real.sum(dim=1).clamp(min=1.0)).mean())
        self.ctx = None

    def keep_rows(self, keep: torch.Tensor):
        self.hidden = self.hidden[keep]
        self.attention_mask = self.attention_mask[keep]
        self.positions = self.positions[keep]
        self.rows = self.rows[keep]
        self.original_lengths = self.original_lengths[keep]
        if self.scores is not None:
            self.scores = self.scores[keep]
        if self.soft_keep is not None:
            self.soft_keep = self.soft_keep[keep]
        self.drop_padding_columns()

    def keep_tokens(self, index: torch.Tensor, new_mask: torch.Tensor):
        rows = torch.arange(index.shape[0], device=index.device)[:, None]
        self.hidden = self.hidden[rows, index]  # advanced indexing: same values as gather, about 2x faster on CPU
        self.positions = self.positions.gather(1, index)
        self.attention_mask = new_mask
        self.pruned = True
        self.ctx = None

    def drop_padding_columns(self):
        """Remove columns that are padding in every running row (e.g. after the longest sample exited)."""
        used = self.attention_mask.bool().any(dim=0)
        # No real token in any row (an all-padding batch): keep every column and run it as the stock model does.
        if bool(used.all()) or self.rows.numel() == 0 or not bool(used.any()):
            self.ctx = None
            return
        columns = used.nonzero().squeeze(1)
        is_prefix = int(columns[-1]) == columns.numel() - 1
        self.hidden = self.hidden[:, columns]
        self.attention_mask = self.attention_mask[:, columns]
        self.positions = self.positions[:, columns]
        if self.scores is not None:
            self.scores = self.scores[:, columns]
        if self.soft_keep is not None:
            self.soft_keep = self.soft_keep[:, columns]
        # Trailing padding removed: positions are still 0..n-1. Anything else: positions must be passed explicitly.
        self.pruned = self.pruned or not is_prefix
        self.ctx = None


def _run_encoder(
    model: MagicPyramidPreTrainedModel,
    input_ids,
    attention_mask,
    token_type_ids,
    position_ids,
    inputs_embeds,
    keep_ratio_scale=None,
    prune_threshold_offset=None,
    on_layer=None,
):
    """The shared layer loop. `attention_mask` is the (batch, seq_len) long mask from `model._check_inputs` (the callers
    check their inputs once). `on_layer(i, stream)` runs after layer i (0-based) and may remove rows; returns the stream
    and kept_tokens (batch, num_layers)."""
    config = model.config
    driver = model.driver
    base = model.base_encoder
    hidden = driver.embed(base, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask)
    stream = _Stream(model, hidden, attention_mask)
    batch = attention_mask.shape[0]
    num_layers = config.num_hidden_layers
    kept_tokens = torch.zeros(batch, num_layers, dtype=torch.long, device=hidden.device)
    plan = model._pruning_plan(keep_ratio_scale, prune_threshold_offset)  # read once per call; the FLOPs count should use it
    stream.scored_layers = [i for i in range(1, num_layers) if plan[i] is not None]
    attn_impl = model.backbone.config._attn_implementation or "eager"
    layers = model.layers
    for i, layer in enumerate(layers):
        if stream.ctx is None:
            stream.refresh()
        kept_tokens[stream.rows, i] = stream.attention_mask.sum(dim=1)
        next_step = plan[i + 1] if i + 1 < num_layers else None
        if next_step is None:
            stream.hidden, _ = driver.run_layer(base, i, layer, stream.hidden, stream.ctx)
        else:
            # Per-call capture: concurrent calls on this model each catch their own q/K or probabilities.
            capture = AttentionCapture(driver, layer, config.token_importance, attn_impl)
            stream.hidden = capture.run_layer(base, i, stream.hidden, stream.ctx)
            stream.scores = capture.scores(stream.ctx)
        if on_layer is not None and on_layer(i, stream):
            break
        if stream.rows.numel() == 0:
            break
        if next_step is not None:
            kind, value = next_step
            if kind == "soft":
                stream.soften(model.prune_thresholds[value], config.pruning_temperature)
                stream.scores = None
                continue
            prune_tokens(stream, kind, value, config.min_kept_tokens)
    return stream, kept_tokens


def retire_exited(stream: _Stream, patience_state, done: torch.Tensor, logits: torch.Tensor, logits_out: torch.Tensor,
                  exit_layer: torch.Tensor, layer_number: int) -> torch.Tensor:
    """Write out the samples of `stream` that exit after `layer_number` (`done`, (rows,) bool): their `logits` go to
    `logits_out` (batch, num_labels) and their layer to `exit_layer` (batch,); they leave the stream and the patience
    state. Returns the updated `logits_out`."""
    if bool(done.any()):
        leaving = stream.rows[done]
        logits_out = logits_out.index_put((leaving,), logits[done])
        exit_layer[leaving] = layer_number
        keep = ~done
        stream.keep_rows(keep)
        patience_state.keep_rows(keep)
    return logits_out


def prune_tokens(stream: _Stream, kind: str, value, min_kept_tokens: int) -> None:
    """Remove tokens from `stream` after a layer: `kind` "topk" keeps `value` (a keep ratio) of each sample's original
    tokens, "threshold" keeps those whose importance reaches `value`; at least `min_kept_tokens` stay. The layer's
    importance scores are consumed."""
    if kind == "topk":
        counts = topk_counts(stream.original_lengths, value, min_kept_tokens)
    else:
        counts = threshold_counts(stream.scores, stream.attention_mask, value, min_kept_tokens)
    if bool((counts < stream.attention_mask.sum(dim=1)).any()):
        index, new_mask = select_tokens(stream.scores, stream.attention_mask, counts)
        stream.keep_tokens(index, new_mask)
    stream.scores = None


class MagicPyramidModel(MagicPyramidPreTrainedModel):
    """The bare encoder: the stock base model run layer by layer, with token pruning when configured."""

    _auto_model_class = AutoModel

    def __init__(self, config: MagicPyramidConfig):
        super().__init__(config)
        self.post_init()
        # Loading the encoder out of a saved classifier: its heads (exits, the stock head) are not used, and the stock
        # base model may add a pooler the classifier never had. Expected, so kept out of the load report and of the
        # strict check; only the encoder's own weights must all be there.
        encoder_children = "|".join(re.escape(name) for name, _ in self.backbone.named_children())
        self._keys_to_ignore_on_load_unexpected = {*self._keys_to_ignore_on_load_unexpected, rf"^(?!backbone\.(?:{encoder_children})\.)"}
        self._keys_to_ignore_on_load_missing = {*self._keys_to_ignore_on_load_missing, r"\.pooler\."}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also loads the encoder out of a saved `MagicPyramidForSequenceClassification`, whose stock classifier keeps
        its base model under `backbone.<base>.` (e.g. `backbone.bert.`): those keys map onto this model's `backbone.`."""
        if "key_mapping" not in kwargs:
            config = kwargs.get("config")
            if not isinstance(config, MagicPyramidConfig):
                config = MagicPyramidConfig.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
            base_attr = check_supported(config.backbone_type).base_attr
            kwargs["key_mapping"] = {rf"^backbone\.{base_attr}\.": "backbone."}
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        keep_ratio_scale: float | None = None,
        prune_threshold_offset: float | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MagicPyramidModelOutput:
        r"""
        keep_ratio_scale, prune_threshold_offset:
            Override the config's pruning speed for this call only (see `set_speed`).
        kwargs:
            Only what generic callers pass (`output_attentions` / `output_hidden_states` set to False, `use_cache`,
            `num_items_in_batch`); anything else is a `TypeError` naming the closest argument.
        """
        _check_forward_kwargs(type(self).forward, kwargs)
        speed = _resolve_speed(self.config, keep_ratio_scale=keep_ratio_scale, prune_threshold_offset=prune_threshold_offset)
        attention_mask = self._check_inputs(input_ids, inputs_embeds, attention_mask)
        stream, kept_tokens = _run_encoder(
            self,
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            speed.keep_ratio_scale,
            speed.prune_threshold_offset,
        )
        output = MagicPyramidModelOutput(
            last_hidden_state=self.driver.finalize(self.base_encoder, stream.hidden),
            attention_mask=stream.attention_mask,
            token_positions=stream.positions,
            kept_tokens=kept_tokens,
        )
        return output.to_tuple() if return_dict is False else output


class MagicPyramidForSequenceClassification(MagicPyramidPreTrainedModel):
    """A stock sequence classifier with an exit after chosen layers and optional token pruning.

    The final exit is the stock classification head, so a converted fine-tuned classifier gives the same logits.
    """

    _auto_model_class = AutoModelForSequenceClassification

    def __init__(self, config: MagicPyramidConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.exit_layers = config.resolved_exit_layers()
        backbone_config = config.backbone_config
        dropout = getattr(backbone_config, "hidden_dropout_prob", None)
        if dropout is None:
            dropout = getattr(backbone_config, "dropout", None) or getattr(backbone_config, "classifier_dropout", None) or 0.1
        eps = getattr(backbone_config, "layer_norm_eps", None) or getattr(backbone_config, "norm_eps", 1e-12)
        # One head per intermediate exit; keys are 1-based layer numbers as strings (nn.ModuleDict needs str keys).
        self.exits = nn.ModuleDict(
            {
                str(layer): make_exit_head(config.exit_head, config.hidden_size, config.num_labels, config.exit_pooling, dropout, eps)
                for layer in self.exit_layers[:-1]
            }
        )
        self.train_stage = 1  # for the two-stage objectives: 1 = backbone + final head, 2 = exits
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------------
    # Speed knob
    # ----------------------------------------------------------------------------------------------------------------
    _UNSET = object()

    def set_speed(self, exit_threshold=_UNSET, patience=_UNSET, keep_ratio_scale=_UNSET, prune_threshold_offset=_UNSET):
        """Change the run-time speed without retraining or reloading; validated, stored in the config (so it saves).

        `exit_threshold` (entropy / confidence, in [0, 1], None = never exit early), `patience` (int >= 1, None = never),
        `keep_ratio_scale` (topk pruning, in [0, 10]: kept share = ratio ** scale, 0 = pruning off), `prune_threshold_offset` (threshold
        pruning, in [-1, 1]). Returns self.

        Safe to call while other threads run forward: each forward reads the whole speed once when it starts, so a call
        runs entirely at the old speed or entirely at the new one.
        """
        config = self.config
        with _SPEED_LOCK:  # a concurrent forward reads all four knobs before or after this change, never half of it
            threshold = config.exit_threshold if exit_threshold is self._UNSET else exit_threshold
            patience_value = config.patience if patience is self._UNSET else patience
            scale = config.keep_ratio_scale if keep_ratio_scale is self._UNSET else keep_ratio_scale
            offset = config.prune_threshold_offset if prune_threshold_offset is self._UNSET else prune_threshold_offset
            check_speed(config.exit_criterion, threshold, patience_value)
            check_pruning_knobs(scale, offset)
            config.exit_threshold, config.patience = threshold, patience_value
            config.keep_ratio_scale, config.prune_threshold_offset = scale, offset
        return self

    # ----------------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------------
    def final_logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The stock head on the last layer's output (after the base model's final norm, if any)."""
        hidden = self.driver.finalize(self.base_encoder, hidden)
        return self.driver.final_head(self.backbone, hidden, attention_mask)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        exit_threshold: float | None = None,
        patience: int | None = None,
        keep_ratio_scale: float | None = None,
        prune_threshold_offset: float | None = None,
        output_all_exits: bool | None = None,
        output_flops: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MagicPyramidClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, or float `(batch_size, num_labels)` for multi-label / regression):
            With every exit's logits (training mode, or `output_all_exits=True`): the loss of the configured
            `exit_objective` over every exit. Otherwise (evaluation, e.g. `Trainer.evaluate()`): the stock task loss of
            the returned `logits`, i.e. each sample scored at the exit it took (the final head when no sample exits early).
        exit_threshold, patience, keep_ratio_scale, prune_threshold_offset:
            Override the config's speed for this call only (see `set_speed`).
        output_all_exits (`bool`, *optional*):
            Run every sample through every layer and return every exit's logits (`exit_logits`); used for training (the
            default in training mode) and for calibration. Otherwise samples leave the batch at their exit.
        output_flops (`bool`, defaults to `False`):
            Also return `flops`, each sample's analytic FLOPs (about 1 ms of bookkeeping per call, so off by default).
        return_dict (`bool`, *optional*):
            `False` returns the output's non-None fields as a tuple, as the stock models do.
        kwargs:
            Only what generic callers pass (`output_attentions` / `output_hidden_states` set to False, `use_cache`,
            `num_items_in_batch`, which is not used: `accepts_loss_kwargs` is False); anything else is a `TypeError`
            naming the closest argument.
        """
        _check_forward_kwargs(type(self).forward, kwargs)
        config = self.config
        # The whole speed, read once: a concurrent `set_speed` takes effect at the next call, never inside this one.
        speed = _resolve_speed(config, exit_threshold, patience, keep_ratio_scale, prune_threshold_offset)
        threshold, patience_value = speed.exit_threshold, speed.patience
        all_exits = self.training if output_all_exits is None else output_all_exits
        problem_type = resolve_problem_type(config, labels)
        num_layers = config.num_hidden_layers

        attention_mask = self._check_inputs(input_ids, inputs_embeds, attention_mask)
        batch, device = attention_mask.shape[0], attention_mask.device
        logits_out = None
        exit_layer = torch.full((batch,), num_layers, dtype=torch.long, device=device)
        collected: list[torch.Tensor] = []
        patience_state = PatienceState(batch, device)

        # Intermediate heads whose rule can never hold are not run at all (a converted model before calibration).
        rule_can_fire = exit_rule_can_fire(config.exit_criterion, threshold, patience_value, problem_type)
        heads_can_fire = all_exits or rule_can_fire
        if rule_can_fire and not all_exits and config.exits_trained is False and len(self.exit_layers) > 1:
            logger.warning_once(
                "The exit heads of this Magic Pyramid model were never trained (converted with from_backbone), yet the "
                "speed lets samples leave early: they leave on random heads. Train the exits first (hf_magicpyramid "
                "train, or a Trainer run), or keep exit_threshold=None / patience=None."
            )

        def on_layer(i: int, stream: _Stream) -> bool:
            nonlocal logits_out
            layer_number = i + 1
            if layer_number not in self.exit_layers or (layer_number != num_layers and not heads_can_fire):
                return False
            if layer_number == num_layers:
                logits = self.final_logits(stream.hidden, stream.attention_mask)
            else:
                logits = self.exits[str(layer_number)](stream.hidden, stream.attention_mask)
            if logits_out is None:
                logits_out = logits.new_zeros(batch, logits.shape[-1])
            if all_exits:
                collected.append(logits)
                if layer_number == num_layers:
                    logits_out = logits
                return False
            if layer_number == num_layers:
                logits_out = logits_out.index_put((stream.rows,), logits)
                return True
            done = exit_decision(
                logits, config.exit_criterion, threshold, patience_value, problem_type, patience_state, config.regression_tolerance
            )
            logits_out = retire_exited(stream, patience_state, done, logits, logits_out, exit_layer, layer_number)
            return False

        stream, kept_tokens = _run_encoder(
            self,
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            speed.keep_ratio_scale,
            speed.prune_threshold_offset,
            on_layer=on_layer,
        )

        loss = None
        if labels is not None:
            self._check_labels(labels, problem_type)
            if all_exits:
                loss = exit_objective_loss(
                    collected,
                    self.exit_layers,
                    labels,
                    problem_type,
                    config.exit_objective,
                    self.train_stage,
                    config.distillation_temperature,
                )
                self._note_exits_trained()
            else:
                loss = task_loss(logits_out, labels, problem_type)
        pruning_loss = torch.stack(stream.penalties).mean() if stream.penalties else None
        flops = None
        if output_flops:
            flops = sample_flops(
                self,
                kept_tokens,
                exit_layer,
                importance_layers=stream.scored_layers,
                keep_ratio_scale=speed.keep_ratio_scale,
                prune_threshold_offset=speed.prune_threshold_offset,
                count_exit_heads=heads_can_fire,
            )
        if loss is not None and pruning_loss is not None:
            loss = loss + config.pruning_penalty * pruning_loss
        output = MagicPyramidClassifierOutput(
            loss=loss,
            logits=logits_out,
            exit_layer=exit_layer,
            exit_logits=tuple(collected) if all_exits else None,
            kept_tokens=kept_tokens,
            flops=flops,
            pruning_loss=pruning_loss,
        )
        return output.to_tuple() if return_dict is False else output

    def _note_exits_trained(self) -> None:
        """Record in the config (so it saves) that a training loss reached the intermediate exit heads."""
        if self.config.exits_trained or not torch.is_grad_enabled() or len(self.exit_layers) < 2:
            return
        reaches_exits = self.config.exit_objective == "joint" or self.train_stage == 2
        if reaches_exits and any(p.requires_grad for p in self.exits.parameters()):
            self.config.exits_trained = True

    def _check_labels(self, labels: torch.Tensor, problem_type: str) -> None:
        if problem_type == "single_label_classification":
            bad = (labels < 0) | (labels >= self.num_labels)
            if bool((bad & (labels != -100)).any()):
                value = labels[bad & (labels != -100)][0].item()
                raise ValueError(f"Label {value} is out of range: this model has num_labels={self.num_labels} (labels 0..{self.num_labels - 1}).")

    # ----------------------------------------------------------------------------------------------------------------
    # Conversion
    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        name_or_path,
        num_labels: int | None = None,
        id2label: dict | None = None,
        label2id: dict | None = None,
        problem_type: str | None = None,
        attn_implementation: str | None = None,
        dtype=None,
        **pyramid_options,
    ) -> "MagicPyramidForSequenceClassification":
        """Convert any supported checkpoint (a bare encoder or a fine-tuned `XxxForSequenceClassification`) or a stock
        model instance. A fine-tuned classifier's head becomes the final exit, so logits are unchanged before training.

        `pyramid_options` are `MagicPyramidConfig` fields (`exit_layers`, `exit_criterion`, `token_pruning`, ...) and the
        `from_pretrained` download options (`revision`, `cache_dir`, `token`, `local_files_only`, `subfolder`,
        `force_download`, `trust_remote_code`); any other name is a `TypeError` naming the closest one.
        Raises `ValueError` when `num_labels` disagrees with a loaded classifier's head, or when `name_or_path` is neither
        a folder with a config.json nor a Hub model id.
        """
        hub_kwargs = _hub_kwargs(pyramid_options)
        pyramid_options = {name: value for name, value in pyramid_options.items() if name not in hub_kwargs}
        fields = _pyramid_fields()
        for name in pyramid_options:
            if name not in fields:
                allowed = fields + _HUB_OPTIONS + ("num_labels", "id2label", "label2id", "problem_type", "attn_implementation", "dtype")
                raise TypeError(_unknown_option(name, allowed, "from_backbone()"))
        if isinstance(name_or_path, PreTrainedModel):
            stock = name_or_path
        else:
            from transformers import AutoConfig

            source = str(name_or_path)
            # A Hub id is "name" or "owner/name"; anything else can only be a local path.
            looks_local = source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source
            if os.path.isdir(source) and not os.path.isfile(os.path.join(source, hub_kwargs.get("subfolder") or "", "config.json")):
                raise ValueError(f"from_backbone: {source} has no config.json; point it at a saved model folder (save_pretrained writes one).")
            if not os.path.exists(source) and looks_local:
                raise ValueError(f"from_backbone: {source} does not exist; give a saved model folder, a Hub model id or a model instance.")
            try:
                stock_config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
            except OSError as error:
                raise ValueError(
                    f"from_backbone: cannot load {source!r}: it is not a local folder, and as a Hub model id it failed: {' '.join(str(error).split())}"
                ) from error
            check_supported(stock_config.model_type)
            fine_tuned = any(a.endswith("ForSequenceClassification") for a in (stock_config.architectures or []))
            load_kwargs = dict(hub_kwargs)
            if attn_implementation is not None:
                load_kwargs["attn_implementation"] = attn_implementation
            if dtype is not None:
                load_kwargs["dtype"] = dtype
            if fine_tuned:
                if num_labels is not None and num_labels != stock_config.num_labels:
                    raise ValueError(
                        f"num_labels={num_labels} does not match the loaded classifier of {name_or_path!s}, which has "
                        f"{stock_config.num_labels} labels ({list(stock_config.id2label.values())}). Pass "
                        f"num_labels={stock_config.num_labels} (or omit it) to keep its head, or start from the bare encoder."
                    )
            else:
                label_kwargs = {k: v for k, v in (("num_labels", num_labels), ("id2label", id2label), ("label2id", label2id)) if v is not None}
                if problem_type is not None:
                    label_kwargs["problem_type"] = problem_type
                stock_config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs, **label_kwargs)
            stock = AutoModelForSequenceClassification.from_pretrained(name_or_path, config=stock_config, **load_kwargs)
        check_supported(stock.config.model_type)
        if num_labels is not None and num_labels != stock.config.num_labels:
            raise ValueError(
                f"num_labels={num_labels} does not match the given classifier, which has {stock.config.num_labels} labels."
            )
        stock_config = stock.config
        config = MagicPyramidConfig(
            backbone_config=copy.deepcopy(stock_config),
            id2label=dict(stock_config.id2label),
            label2id=dict(stock_config.label2id),
            problem_type=stock_config.problem_type,
            exits_trained=False,  # fresh exit heads: warn if a speed lets samples leave on them
            **pyramid_options,
        )
        config._attn_implementation = stock_config._attn_implementation
        model = cls(config)
        missing, unexpected = model.backbone.load_state_dict(stock.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"The stock weights do not fit the built backbone: missing {missing[:5]}, unexpected {unexpected[:5]}.")
        model.to(dtype=next(stock.parameters()).dtype)
        model.name_or_path = getattr(stock, "name_or_path", "")
        return model


# ---------------------------------------------------------------------------------------------------------------------
# Options, speed and loading checks (serving)
# ---------------------------------------------------------------------------------------------------------------------

# What generic callers (Trainer, pipelines, evaluation loops) pass to a stock classifier's forward; accepted and unused.
_PASSED_BY_CALLERS = ("use_cache", "num_items_in_batch")
# Stock outputs this model does not produce: accepted only when not asked for.
_NOT_PRODUCED = ("output_attentions", "output_hidden_states")
_HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")

# One lock for every model: `set_speed` writes, and forward reads, the four speed knobs as one unit.
_SPEED_LOCK = threading.Lock()


class _Speed(NamedTuple):
    """The speed of one forward call, resolved once at its start."""

    exit_threshold: float | None
    patience: int | None
    keep_ratio_scale: float
    prune_threshold_offset: float


def _resolve_speed(config, exit_threshold=None, patience=None, keep_ratio_scale=None, prune_threshold_offset=None) -> _Speed:
    """The config's speed (read under the lock) with this call's overrides (validated); None = the config's value."""
    with _SPEED_LOCK:
        speed = _Speed(config.exit_threshold, config.patience, config.keep_ratio_scale, config.prune_threshold_offset)
    if exit_threshold is not None or patience is not None:
        speed = speed._replace(
            exit_threshold=speed.exit_threshold if exit_threshold is None else exit_threshold,
            patience=speed.patience if patience is None else patience,
        )
        check_speed(config.exit_criterion, speed.exit_threshold, speed.patience)
    if keep_ratio_scale is not None or prune_threshold_offset is not None:
        speed = speed._replace(
            keep_ratio_scale=speed.keep_ratio_scale if keep_ratio_scale is None else keep_ratio_scale,
            prune_threshold_offset=speed.prune_threshold_offset if prune_threshold_offset is None else prune_threshold_offset,
        )
        check_pruning_knobs(speed.keep_ratio_scale, speed.prune_threshold_offset)
    return speed


def _unknown_option(name: str, allowed, where: str) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(sorted(allowed))}."
    return f"{where} got an unexpected keyword argument {name!r}; {hint}"


def _check_forward_kwargs(forward, kwargs: dict) -> None:
    """Refuse a forward keyword that would be silently ignored (a typo such as `exit_treshold`)."""
    for name, value in kwargs.items():
        if name in _PASSED_BY_CALLERS:
            continue
        if name in _NOT_PRODUCED:
            if value:
                raise ValueError(
                    f"{name}=True is not supported: a Magic Pyramid forward removes samples and tokens as it goes, so "
                    "it returns no per-layer attentions or hidden states (MagicPyramidModel gives the last hidden state)."
                )
            continue
        parameters = [p for p in inspect.signature(forward).parameters if p not in ("self", "kwargs")]
        raise TypeError(_unknown_option(name, parameters + list(_PASSED_BY_CALLERS + _NOT_PRODUCED), "forward()"))


def _pyramid_fields() -> tuple[str, ...]:
    """The `MagicPyramidConfig` fields `from_backbone` takes as options (all but the backbone config itself)."""
    return tuple(name for name in MagicPyramidConfig.__annotations__ if name != "backbone_config")


_LAYER_INDEX = re.compile(r"\.(?:layer|layers)\.(\d+)\.")
_EXIT_INDEX = re.compile(r"^exits\.(\d+)\.")


def _load_problem(model, source: str, info: dict, ignore_mismatched: bool) -> str | None:
    """One line saying what does not fit between a checkpoint and the model its config.json builds, or None."""
    config = model.config
    missing = sorted(set(info.get("missing_keys") or ()) - {"prune_thresholds"})  # mirrored in the config: not random
    unexpected = sorted(set(info.get("unexpected_keys") or ()) - {"prune_thresholds"})
    # (A MagicPyramidModel's expected missing and unused keys are already out: its `_keys_to_ignore_on_load_*`.)
    mismatched = sorted(info.get("mismatched_keys") or ()) if not ignore_mismatched else []
    if not (missing or unexpected or mismatched):
        return None
    where = f"The checkpoint in {source} does not fit its config.json"
    if mismatched:
        return where + ": " + _mismatch_cause(config, mismatched)
    layer_sizes = collections.Counter(int(m.group(1)) for k in model.state_dict() if (m := _LAYER_INDEX.search(k)))
    cause = _structure_cause(config, missing, unexpected, layer_sizes)
    listed = "; ".join(
        f"{kind} {len(keys)} tensors (e.g. {', '.join(keys[:3])})" for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys
    )
    return f"{where} ({listed}): {cause}"


def _mismatch_cause(config, mismatched) -> str:
    hidden, labels = config.hidden_size, config.num_labels
    example = ", ".join(f"{key} {tuple(saved)} in the file vs {tuple(built)} from config.json" for key, saved, built in mismatched[:2])
    if all(len(saved) == len(built) and saved[1:] == built[1:] and built[0] == labels for _, saved, built in mismatched):
        saved_labels = int(mismatched[0][1][0])
        return (
            f"the heads were saved with {saved_labels} labels but config.json has num_labels={labels} "
            f"(id2label={config.id2label}) (e.g. {example}). Restore id2label/label2id, or pass ignore_mismatched_sizes=True "
            "to start new heads for the new labels on purpose."
        )
    # Layer norms depend on the hidden size only (slimming never changes them): a norm that does not fit means hidden_size.
    saved_widths = [saved[-1] for key, saved, built in mismatched if "norm" in key.lower() and built[-1] == hidden != saved[-1]]
    if saved_widths:
        saved_hidden = max(set(saved_widths), key=saved_widths.count)
        return (
            f"config.json says hidden_size={hidden} but the weights are {saved_hidden} wide (e.g. {example}). "
            f"Restore hidden_size={saved_hidden} in backbone_config."
        )
    return (
        f"the per-layer widths mismatch (heads_per_layer={config.heads_per_layer}, ffn_per_layer={config.ffn_per_layer}; "
        f"e.g. {example}). A slender checkpoint's config must hold the widths it was saved with: save it with "
        "save_pretrained, and do not edit those fields by hand."
    )


_RESTORE = " Restore the config.json saved with these weights."


def _structure_cause(config, missing: list[str], unexpected: list[str], layer_sizes: dict[int, int]) -> str:
    """What most likely changed in config.json (or the file), from the names of the tensors that do not fit, and what to do."""
    bases = {entry.base_attr: name for name, entry in ADAPTERS.items()}
    saved_bases = {k.split(".")[1] for k in unexpected if k.startswith("backbone.") and k.split(".")[1] in bases}
    built_base = check_supported(config.backbone_type).base_attr
    if saved_bases and built_base not in saved_bases and any(k.startswith(f"backbone.{built_base}.") for k in missing):
        saved = "/".join(sorted(bases[b] for b in saved_bases))
        return f"the weights are for a {saved} backbone, but config.json says backbone_config.model_type={config.backbone_type!r}." + _RESTORE
    num_layers = config.num_hidden_layers
    extra = {int(m.group(1)) for k in unexpected if (m := _LAYER_INDEX.search(k))}
    absent_keys = collections.Counter(int(m.group(1)) for k in missing if (m := _LAYER_INDEX.search(k)))
    absent = set(absent_keys)
    # Whole layers at the end missing (every tensor of each) mean fewer saved layers; anything else, a damaged file.
    whole = all(absent_keys[i] == layer_sizes.get(i) for i in absent)
    if extra and not absent:
        return f"the weights hold {max(extra) + 1} layers, but config.json says num_hidden_layers={num_layers}." + _RESTORE
    if absent and not extra and whole and min(absent) > 0 and absent == set(range(min(absent), num_layers)):
        return f"the weights hold {min(absent)} layers, but config.json says num_hidden_layers={num_layers}." + _RESTORE
    if absent:
        return (
            f"the file lacks tensors of layer(s) {sorted(absent)} that config.json's shapes need: the file is incomplete "
            "or was edited. Save the model again with save_pretrained, or restore the original file."
        )
    saved_exits = sorted({int(m.group(1)) for k in unexpected if (m := _EXIT_INDEX.search(k))})
    new_exits = sorted({int(m.group(1)) for k in missing if (m := _EXIT_INDEX.search(k))})
    if saved_exits or new_exits:
        return (
            f"config.json's exit_layers={config.exit_layers} do not match the saved exit heads (heads in the file but not "
            f"in the config: {saved_exits}; in the config but not in the file: {new_exits})." + _RESTORE
        )
    return "the model built from config.json has other tensors than the file." + _RESTORE


__all__ = ["MagicPyramidModel", "MagicPyramidForSequenceClassification", "MagicPyramidPreTrainedModel", "FactorizedEmbedding"]
