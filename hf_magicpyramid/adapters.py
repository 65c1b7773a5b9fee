"""One table of backbone adapters: where each supported family keeps its modules and how its layers are called.

Nothing here copies a backbone's modeling code. Each entry names the stock modules of the installed transformers
(embeddings, layers, attention projections, FFN, classification head) and says how to call them, so that one generic
layer loop (`modeling_magic_pyramid.py`) can drive every family, run on fewer tokens, and stop early.

Adding a family means adding an entry to `ADAPTERS`.

This file travels to the Hub as custom code: it imports only installed packages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.pytorch_utils import prune_linear_layer

# ---------------------------------------------------------------------------------------------------------------------
# Per-family pieces that are more than an attribute name
# ---------------------------------------------------------------------------------------------------------------------


def _embed_bert_like(base, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask):
    hidden = base.embeddings(
        input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
    )
    project = getattr(base, "embeddings_project", None)  # electra, when embedding_size != hidden_size
    return project(hidden) if project is not None else hidden


def _embed_albert(base, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask):
    hidden = base.embeddings(input_ids, position_ids=position_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds)
    return base.encoder.embedding_hidden_mapping_in(hidden)


def _embed_distilbert(base, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask):
    return base.embeddings(input_ids, inputs_embeds, position_ids)


def _embed_deberta(base, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask):
    return base.embeddings(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        mask=attention_mask,
        inputs_embeds=inputs_embeds,
    )


def _embed_mpnet(base, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask):
    return base.embeddings(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)


def _embed_modernbert(base, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask):
    return base.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)


def _head_bert(model, hidden, attention_mask):  # bert, albert: base pooler, dropout, classifier
    base = model.base_model
    pooled = base.pooler(hidden[:, 0]) if model.config.model_type == "albert" else base.pooler(hidden)
    if model.config.model_type == "albert":
        pooled = base.pooler_activation(pooled)
    return model.classifier(model.dropout(pooled))


def _head_on_sequence(model, hidden, attention_mask):  # roberta, xlm-roberta, electra, mpnet: head takes the sequence
    return model.classifier(hidden)


def _head_distilbert(model, hidden, attention_mask):
    pooled = nn.functional.relu(model.pre_classifier(hidden[:, 0]))
    return model.classifier(model.dropout(pooled))


def _head_deberta(model, hidden, attention_mask):
    return model.classifier(model.dropout(model.pooler(hidden)))


def _head_modernbert(model, hidden, attention_mask):
    if model.config.classifier_pooling == "cls":
        pooled = hidden[:, 0]
    else:
        if attention_mask is None:
            attention_mask = hidden.new_ones(hidden.shape[:2])
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
    return model.classifier(model.drop(model.head(pooled)))


# ---------------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneAdapter:
    """Where a family keeps its modules and how its layers are called.

    Paths are dotted attribute paths: `base_attr` from the stock `XxxForSequenceClassification`, `layers` from the base
    encoder, the others from one layer module.
    """

    model_type: str
    base_attr: str
    layers: str
    call: str  # "plain": layer(h, mask) | "deberta" | "mpnet" | "modernbert" (see `run_layer`)
    embed: Callable
    final_head: Callable
    attention: str  # the self-attention module (returns (output, weights) under eager)
    query: str  # projection paths inside `attention`; modernbert fuses q, k, v in one Linear
    key: str
    value: str
    attention_out: str  # from the layer: the Linear after attention (its input columns are per head)
    ffn_in: str
    ffn_out: str
    heads_attrs: tuple[str, ...] = ("num_attention_heads", "all_head_size")  # on `attention`, updated when slimmed
    fused_qkv: bool = False
    gated_ffn: bool = False
    positions_matter: bool = False  # relative or rotary positions: must stay the original ones after pruning
    sdpa: bool = True
    first_token_pools: bool = True  # the stock head reads the first token (modernbert may pool the mean)
    slimmable: bool = True
    slim_note: str = ""


_BERT_LIKE = dict(
    layers="encoder.layer",
    call="plain",
    embed=_embed_bert_like,
    attention="attention.self",
    query="query",
    key="key",
    value="value",
    attention_out="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
)

ADAPTERS: dict[str, BackboneAdapter] = {
    "bert": BackboneAdapter("bert", base_attr="bert", final_head=_head_bert, **_BERT_LIKE),
    "roberta": BackboneAdapter("roberta", base_attr="roberta", final_head=_head_on_sequence, **_BERT_LIKE),
    "xlm-roberta": BackboneAdapter("xlm-roberta", base_attr="roberta", final_head=_head_on_sequence, **_BERT_LIKE),
    "electra": BackboneAdapter("electra", base_attr="electra", final_head=_head_on_sequence, **_BERT_LIKE),
    "distilbert": BackboneAdapter(
        "distilbert",
        base_attr="distilbert",
        layers="transformer.layer",
        call="plain",
        embed=_embed_distilbert,
        final_head=_head_distilbert,
        attention="attention",
        query="q_lin",
        key="k_lin",
        value="v_lin",
        attention_out="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        heads_attrs=("n_heads",),
    ),
    "albert": BackboneAdapter(
        "albert",
        base_attr="albert",
        layers="encoder.albert_layer_groups",  # shared: layer i runs group int(i / (N / G)); see `layer_modules`
        call="plain",
        embed=_embed_albert,
        final_head=_head_bert,
        attention="albert_layers.0.attention",
        query="query",
        key="key",
        value="value",
        attention_out="albert_layers.0.attention.dense",
        ffn_in="albert_layers.0.ffn",
        ffn_out="albert_layers.0.ffn_output",
        slimmable=False,
        slim_note="albert shares one set of layer weights across layers, so per-layer widths cannot differ",
    ),
    "deberta-v2": BackboneAdapter(
        "deberta-v2",
        base_attr="deberta",
        layers="encoder.layer",
        call="deberta",
        embed=_embed_deberta,
        final_head=_head_deberta,
        attention="attention.self",
        query="query_proj",
        key="key_proj",
        value="value_proj",
        attention_out="attention.output.dense",
        ffn_in="intermediate.dense",
        ffn_out="output.dense",
        positions_matter=True,
        sdpa=False,
    ),
    "mpnet": BackboneAdapter(
        "mpnet",
        base_attr="mpnet",
        layers="encoder.layer",
        call="mpnet",
        embed=_embed_mpnet,
        final_head=_head_on_sequence,
        attention="attention.attn",
        query="q",
        key="k",
        value="v",
        attention_out="attention.attn.o",
        ffn_in="intermediate.dense",
        ffn_out="output.dense",
        positions_matter=True,
        sdpa=False,
        slimmable=False,
        slim_note="mpnet adds one relative-position bias with a column per head to every layer, so heads cannot differ per layer",
    ),
    "modernbert": BackboneAdapter(
        "modernbert",
        base_attr="model",
        layers="layers",
        call="modernbert",
        embed=_embed_modernbert,
        final_head=_head_modernbert,
        attention="attn",
        query="Wqkv",
        key="Wqkv",
        value="Wqkv",
        attention_out="attn.Wo",
        ffn_in="mlp.Wi",
        ffn_out="mlp.Wo",
        heads_attrs=(),
        fused_qkv=True,
        gated_ffn=True,
        positions_matter=True,
        first_token_pools=False,
    ),
}

# Families that look close to a supported one but are not driven by this table; named so the error can say why.
UNSUPPORTED_NOTES = {
    "deberta": "DeBERTa v1 is not supported; DeBERTa-v2/v3 checkpoints ('deberta-v2') are.",
    "camembert": "CamemBERT is not in the table yet; its layers are RoBERTa's, so an entry like 'roberta' would add it.",
}


def check_supported(model_type: str) -> BackboneAdapter:
    """Return the adapter of `model_type`, or raise a `ValueError` listing the supported families."""
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    note = UNSUPPORTED_NOTES.get(model_type, "")
    raise ValueError(
        f"Unsupported backbone model_type {model_type!r}. {note} Supported backbones: {', '.join(sorted(ADAPTERS))}.".replace(
            "  ", " "
        )
    )


get_adapter = check_supported


def get_path(module: nn.Module, path: str):
    for name in path.split("."):
        module = module[int(name)] if name.isdigit() else getattr(module, name)
    return module


def set_path(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(module, parent) if parent else module, name, value)


# ---------------------------------------------------------------------------------------------------------------------
# Running the stock layers
# ---------------------------------------------------------------------------------------------------------------------


def layer_modules(adapter: BackboneAdapter, base: nn.Module) -> list[nn.Module]:
    """The module that runs layer i, for i in 0..N-1 (albert repeats its shared groups)."""
    modules = list(get_path(base, adapter.layers))
    if adapter.model_type == "albert":
        config = base.config
        return [modules[int(i / (config.num_hidden_layers / config.num_hidden_groups))] for i in range(config.num_hidden_layers)]
    return modules


@dataclass
class LayerContext:
    """What every layer needs besides the hidden states, for the current (possibly pruned) sequence.

    `attention_mask` is the 2D (batch, seq_len) 0/1 mask of the current tokens, `positions` (batch, seq_len) their
    original positions, `pruned` whether tokens were removed (then relative positions are built from `positions`).
    """

    attention_mask: torch.Tensor
    positions: torch.Tensor
    pruned: bool
    layer_mask: object = None  # the mask in the form the family's layers take (dict per layer type for modernbert)
    extras: dict | None = None  # relative_pos / rel_embeddings / position_bias / position_embeddings


def build_context(
    adapter: BackboneAdapter,
    base: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    pruned: bool,
    key_bias: torch.Tensor | None = None,
) -> LayerContext:
    """Masks and position information for the sequence in `hidden` (batch, seq_len, hidden).

    `key_bias` (batch, seq_len), optional: added to every query's attention logits for each key (LTP's soft mask,
    as log(mask)); the layer mask then becomes a float additive (batch, 1, seq_len, seq_len) tensor.
    """
    ctx = _build_context(adapter, base, hidden, attention_mask, positions, pruned)
    if key_bias is not None:
        if adapter.call == "deberta":
            raise ValueError(
                "Soft token masks (token_pruning='threshold' while learning thresholds) are not supported for deberta-v2, "
                "whose attention takes a 0/1 mask; learn a 'topk' schedule instead, or fix thresholds (pruning_phase='hard')."
            )
        ctx.extras["key_bias"] = key_bias
        if isinstance(ctx.layer_mask, dict):
            ctx.layer_mask = {k: _add_key_bias(v, key_bias, hidden.dtype) for k, v in ctx.layer_mask.items()}
        else:
            ctx.layer_mask = _add_key_bias(ctx.layer_mask, key_bias, hidden.dtype)
    return ctx


def _add_key_bias(mask, key_bias: torch.Tensor, dtype) -> torch.Tensor:
    """Turn a stock mask (None, bool keep-mask, or float additive) into float additive plus a per-key bias."""
    batch, seq_len = key_bias.shape
    minimum = torch.finfo(dtype).min
    if mask is None:
        additive = key_bias.new_zeros(batch, 1, seq_len, seq_len, dtype=dtype)
    elif mask.dtype == torch.bool:
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, minimum)
    else:
        additive = mask.to(dtype)
    # Clamp so that padding (already at the dtype's minimum) does not overflow to -inf and produce NaNs.
    return (additive + key_bias[:, None, None, :].to(dtype)).clamp(min=minimum)


def _build_context(adapter, base, hidden, attention_mask, positions, pruned) -> LayerContext:
    config = base.config
    ctx = LayerContext(attention_mask=attention_mask, positions=positions, pruned=pruned, extras={})
    if adapter.call == "deberta":
        encoder = base.encoder
        ctx.layer_mask = encoder.get_attention_mask(attention_mask)
        if encoder.relative_attention:
            if pruned:
                relative = positions[:, :, None] - positions[:, None, :]
                if encoder.position_buckets > 0 and encoder.max_relative_positions > 0:
                    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

                    relative = make_log_bucket_position(relative, encoder.position_buckets, encoder.max_relative_positions)
                # Per-sample relative positions: the attention gathers over (batch * heads) rows.
                heads = get_path(layer_modules(adapter, base)[0], adapter.attention).num_attention_heads
                relative = relative.to(torch.long).repeat_interleave(heads, dim=0).unsqueeze(0)
                ctx.extras["relative_pos"] = relative
            else:
                ctx.extras["relative_pos"] = encoder.get_rel_pos(hidden)
            ctx.extras["rel_embeddings"] = encoder.get_rel_embedding()
        return ctx

    ctx.layer_mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    if adapter.call == "mpnet":
        encoder = base.encoder
        if pruned:
            relative = positions[:, None, :] - positions[:, :, None]
            # The stock encoder buckets with its method's defaults (32 buckets); so does this.
            buckets = encoder.relative_position_bucket(relative)
            ctx.extras["position_bias"] = encoder.relative_attention_bias(buckets).permute(0, 3, 1, 2).contiguous()
        else:
            ctx.extras["position_bias"] = encoder.compute_position_bias(hidden)
    elif adapter.call == "modernbert":
        if pruned:
            window = config.sliding_window
            original = positions

            def near(batch_idx, head_idx, q_idx, kv_idx):
                return (original[batch_idx, q_idx] - original[batch_idx, kv_idx]).abs() <= window

            sliding = create_bidirectional_mask(
                config=config, inputs_embeds=hidden, attention_mask=attention_mask, and_mask_function=near
            )
            position_ids = positions
        else:
            from transformers.masking_utils import create_bidirectional_sliding_window_mask

            sliding = create_bidirectional_sliding_window_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        ctx.layer_mask = {"full_attention": ctx.layer_mask, "sliding_attention": sliding}
        ctx.extras["position_embeddings"] = {
            layer_type: base.rotary_emb(hidden, position_ids, layer_type) for layer_type in set(config.layer_types)
        }
    return ctx


def run_layer(
    adapter: BackboneAdapter,
    base: nn.Module,
    index: int,
    layer: nn.Module,
    hidden: torch.Tensor,
    ctx: LayerContext,
    output_attentions: bool = False,
):
    """Run stock layer `index` (0-based). Returns (hidden, attention weights or None).

    Hidden states go positionally, so gradient checkpointing checkpoints them. Attention weights come back only where
    the layer itself returns them (deberta-v2, mpnet) and `output_attentions` is set.
    """
    weights = None
    if adapter.call == "plain":
        out = layer(hidden, ctx.layer_mask)
    elif adapter.call == "deberta":
        out, weights = layer(
            hidden,
            ctx.layer_mask,
            relative_pos=ctx.extras.get("relative_pos"),
            rel_embeddings=ctx.extras.get("rel_embeddings"),
            output_attentions=output_attentions,
        )
        if index == 0 and base.encoder.conv is not None:
            out = base.encoder.conv(hidden, out, ctx.attention_mask)
    elif adapter.call == "mpnet":
        outputs = layer(hidden, ctx.layer_mask, ctx.extras["position_bias"], output_attentions=output_attentions)
        out = outputs[0]
        weights = outputs[1] if output_attentions else None
    elif adapter.call == "modernbert":
        layer_type = layer.attention_type
        out = layer(
            hidden,
            attention_mask=ctx.layer_mask[layer_type],
            position_embeddings=ctx.extras["position_embeddings"][layer_type],
        )
    else:  # pragma: no cover - the table only holds known call kinds
        raise ValueError(f"Unknown layer call kind {adapter.call!r}")
    if isinstance(out, tuple):
        out = out[0]
    return out, weights


def finalize(adapter: BackboneAdapter, base: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What the base model applies after its last layer (modernbert's final norm)."""
    if adapter.call == "modernbert":
        return base.final_norm(hidden)
    return hidden


def max_positions(adapter: BackboneAdapter, config) -> int | None:
    """The longest input the backbone's position machinery accepts, or None when it has no fixed limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if adapter.model_type in ("roberta", "xlm-roberta", "mpnet"):
        # Positions start after the padding index (RoBERTa style), so pad_token_id + 1 slots are not usable.
        return limit - (config.pad_token_id if config.pad_token_id is not None else 1) - 1
    if adapter.model_type == "deberta-v2" and not getattr(config, "position_biased_input", True):
        return None if getattr(config, "relative_attention", False) else limit
    if adapter.model_type == "modernbert":
        return None
    return limit


# ---------------------------------------------------------------------------------------------------------------------
# Per-layer widths (slender layers)
# ---------------------------------------------------------------------------------------------------------------------


def layer_widths(adapter: BackboneAdapter, layer: nn.Module) -> tuple[int, int]:
    """(attention heads, FFN neurons) of a layer module as built."""
    attention = get_path(layer, adapter.attention)
    out_features = get_path(attention, adapter.query).out_features
    head_dim = _head_dim(adapter, attention)
    heads = out_features // head_dim // (3 if adapter.fused_qkv else 1)
    ffn = get_path(layer, adapter.ffn_in).out_features // (2 if adapter.gated_ffn else 1)
    return heads, ffn


def _head_dim(adapter: BackboneAdapter, attention: nn.Module) -> int:
    return attention.head_dim if adapter.fused_qkv else attention.attention_head_size


def slim_layer(adapter: BackboneAdapter, layer: nn.Module, head_index: torch.Tensor | None, ffn_index: torch.Tensor | None) -> None:
    """Keep only the attention heads `head_index` and the FFN neurons `ffn_index` of a stock layer, in place.

    Uses `prune_linear_layer` on the stock Linear modules: q/k/v rows and the attention output's columns per head,
    the FFN's first Linear rows and second Linear columns. At least one head stays.
    """
    if not adapter.slimmable:
        raise ValueError(f"Per-layer widths are not supported for {adapter.model_type}: {adapter.slim_note}.")
    attention = get_path(layer, adapter.attention)
    if head_index is not None:
        head_index = torch.as_tensor(head_index, dtype=torch.long)
        if head_index.numel() < 1:
            raise ValueError("A layer must keep at least one attention head.")
        head_dim = _head_dim(adapter, attention)
        full_heads, _ = layer_widths(adapter, layer)
        rows = (head_index[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
        if adapter.fused_qkv:  # Wqkv rows are [q heads | k heads | v heads]
            rows = torch.cat([rows + part * full_heads * head_dim for part in range(3)])
            _prune(attention, adapter.query, rows, dim=0)
        else:
            for path in (adapter.query, adapter.key, adapter.value):
                _prune(attention, path, rows, dim=0)
        out_rows = rows[: head_index.numel() * head_dim] if adapter.fused_qkv else rows
        _prune(layer, adapter.attention_out, out_rows, dim=1)
        for attr in adapter.heads_attrs:
            value = head_index.numel() if attr in ("num_attention_heads", "n_heads") else head_index.numel() * head_dim
            setattr(attention, attr, value)
    if ffn_index is not None:
        ffn_index = torch.as_tensor(ffn_index, dtype=torch.long)
        if ffn_index.numel() < 1:
            raise ValueError("A layer must keep at least one FFN neuron.")
        rows = ffn_index
        if adapter.gated_ffn:  # Wi rows are [input | gate]
            full = get_path(layer, adapter.ffn_in).out_features // 2
            rows = torch.cat([ffn_index, ffn_index + full])
        _prune(layer, adapter.ffn_in, rows, dim=0)
        _prune(layer, adapter.ffn_out, ffn_index, dim=1)


def _prune(root: nn.Module, path: str, index: torch.Tensor, dim: int) -> None:
    linear = get_path(root, path)
    set_path(root, path, prune_linear_layer(linear, index.to(linear.weight.device), dim=dim))


__all__ = ["ADAPTERS", "BackboneAdapter", "check_supported", "get_adapter"]
