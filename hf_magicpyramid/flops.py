"""Analytic FLOPs of the stock encoders and of what a Magic Pyramid model really ran.

A multiply-add counts as 2 FLOPs and only matrix products count (Linear layers, attention products, convolutions),
as `torch.utils.flop_counter.FlopCounterMode` counts them; elementwise work (softmax, LayerNorm, activations, rotary,
masking, pooling) and embedding lookups count 0.

Every count is per sample, on that sample's own real tokens (no padding): what the sample costs when it runs alone.
So the FLOPs of a padded batch, as FlopCounterMode sees it, are at least the sum over its samples (padding columns are
computed too), and for deberta-v2 at most that sum: its relative-position projections run once per call, not per sample.

Widths (attention heads, FFN neurons) are read from the layer modules as built, so slender layers are counted as they are.
The counts are the same under eager and sdpa attention (the work is the same). Note that FlopCounterMode on CPU does
not count the fused sdpa kernel (`_scaled_dot_product_flash_attention_for_cpu` has no formula), so compare with it
under eager attention, or give it that formula through `custom_mapping`.

This file travels to the Hub as custom code: it imports only installed packages and same-folder modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import LayerShape, PlainDriver, driver_for
from .pruning import scores_from_projections

LAYER_KINDS = ("standard", "disentangled")


# ---------------------------------------------------------------------------------------------------------------------
# Analytic counts of the pieces (tokens may be an int or an integer tensor; the result has the same kind)
# ---------------------------------------------------------------------------------------------------------------------


def linear_flops(in_features: int, out_features: int, tokens=1):
    """A Linear (in → out) applied to `tokens` vectors: 2 · tokens · in · out (the bias is not counted)."""
    return 2 * tokens * in_features * out_features


def layer_flops(
    hidden_size: int,
    heads: int,
    head_dim: int,
    ffn: int,
    tokens,
    gated_ffn: bool = False,
    layer_kind: str = "standard",
    relative_span: int = 0,
    relative_terms: int = 0,
    relative_projections: int = 0,
):
    """FLOPs of one encoder layer on `tokens` (n) tokens of one sample.

    - q, k, v and output projections: 4 · 2 · n · hidden · (heads · head_dim);
    - QKᵀ and attention · V: per head 2 · n² · head_dim each;
    - FFN: 2 · n · hidden · ffn for each of its two Linear layers; a gated FFN (ModernBERT: Wi has 2 · ffn outputs,
      then Wo) counts three;
    - `layer_kind="disentangled"` (deberta-v2) adds the relative-position work: `relative_terms` products (c2p
      query · pos_keyᵀ, p2c key · pos_queryᵀ) of 2 · n · head_dim · relative_span per head, where `relative_span` is the
      number of relative-embedding rows (2 · att_span), and `relative_projections` projections of those rows
      (2 · relative_span · hidden · heads · head_dim each), which do not depend on n.

    `tokens` may be an int or an integer tensor (then the result is a tensor of the same shape). The relative
    projections do not vanish at 0 tokens: callers count a layer only for the samples that ran it.
    """
    if layer_kind not in LAYER_KINDS:
        raise ValueError(f"layer_kind={layer_kind!r} is not supported; choose one of {', '.join(repr(k) for k in LAYER_KINDS)}.")
    inner = heads * head_dim
    projections = 4 * linear_flops(hidden_size, inner, tokens)
    attention = heads * 2 * (2 * tokens * tokens * head_dim)
    ffn_matrices = 3 if gated_ffn else 2
    feed_forward = ffn_matrices * linear_flops(hidden_size, ffn, tokens)
    total = projections + attention + feed_forward
    if layer_kind == "disentangled":
        if relative_span <= 0:
            raise ValueError(f"relative_span={relative_span!r}: a disentangled layer needs the number of relative-embedding rows (> 0).")
        total = total + relative_terms * heads * 2 * tokens * head_dim * relative_span
        total = total + relative_projections * linear_flops(hidden_size, inner, relative_span)
    return total


def conv_flops(channels: int, tokens, kernel_size: int, groups: int = 1, padding: int | None = None):
    """A 1D convolution channels → channels over `tokens` positions (deberta-v2's ConvLayer after its first layer):
    2 · out_len · kernel · channels · channels / groups, out_len = n + 2 · padding − kernel + 1 (padding defaults to
    (kernel − 1) // 2, as deberta-v2 pads)."""
    if padding is None:
        padding = (kernel_size - 1) // 2
    out_len = tokens + 2 * padding - kernel_size + 1
    return 2 * out_len * kernel_size * channels * (channels // groups)


def embedding_flops(model: nn.Module, tokens):
    """Matmul work in the embeddings of `tokens` tokens: the projections to the hidden size (electra's
    embeddings_project, albert's embedding_hidden_mapping_in, deberta-v2's embed_proj). Lookups count 0.

    `model` is a stock `XxxForSequenceClassification` or a Magic Pyramid model.
    """
    _, _, base, driver = _unwrap(model)
    return sum((linear_flops(i, o, tokens) for i, o in _embedding_projections(driver, base)), 0 * tokens)


def exit_head_flops(hidden_size: int, num_labels: int) -> int:
    """An intermediate exit (`exits.ExitHead`) on its pooled vector: dense hidden → hidden and classifier hidden →
    labels (pooling, LayerNorm and tanh are elementwise)."""
    return linear_flops(hidden_size, hidden_size) + linear_flops(hidden_size, num_labels)


def final_head_flops(model: nn.Module) -> int:
    """The stock classification head on one sample: every Linear of the task model outside its base model (roberta's,
    electra's and mpnet's classification heads, distilbert's pre_classifier, deberta-v2's context pooler, modernbert's
    prediction head, and the classifier) plus the base model's own pooler (bert, albert). Each runs on one pooled vector
    (the first token, or modernbert's mean), so the count does not depend on the sequence length.
    """
    _, stock, base, _ = _unwrap(model)
    base_ids = {id(m) for m in base.modules()}
    linears = [m for m in stock.modules() if isinstance(m, nn.Linear) and id(m) not in base_ids]
    pooler = getattr(base, "pooler", None)
    if pooler is not None:
        linears += [m for m in pooler.modules() if isinstance(m, nn.Linear)]
    return sum(linear_flops(m.in_features, m.out_features) for m in linears)


def importance_flops(heads: int, head_dim: int, tokens, from_projections: bool = True):
    """Token importance `cls_attention` recomputed from the q/k projections (sdpa): the first row q₀ · Kᵀ, 2 · n ·
    head_dim per head. 0 when the scores are read from the eager attention probabilities (no extra matmul)."""
    if not from_projections:
        return 0 * tokens
    return heads * 2 * tokens * head_dim


# ---------------------------------------------------------------------------------------------------------------------
# What a model is made of, read once from its modules
# ---------------------------------------------------------------------------------------------------------------------


def _shape_flops(shape: LayerShape, tokens):
    return layer_flops(
        shape.hidden_size,
        shape.heads,
        shape.head_dim,
        shape.ffn,
        tokens,
        gated_ffn=shape.gated_ffn,
        layer_kind=shape.layer_kind,
        relative_span=shape.relative_span,
        relative_terms=shape.relative_terms,
        relative_projections=shape.relative_projections,
    )


@dataclass
class _Profile:
    driver: PlainDriver
    embedding_projections: list[tuple[int, int]]
    layers: list[list[LayerShape]]  # per layer, the stock layers it runs (albert: the inner layers of its group)
    importance_widths: list[tuple[int, int]]  # per layer, (heads, head_dim) of the attention importance reads
    conv: tuple[int, int, int, int] | None  # deberta-v2 after layer 1: (channels, kernel, groups, padding)
    final_head: int
    exit_heads: dict[int, int] = field(default_factory=dict)  # 1-based layer → FLOPs of its intermediate exit

    def layer(self, index: int, tokens):
        """FLOPs of layer `index` (0-based) on `tokens`, 0 where tokens is 0 (the sample did not run it)."""
        total = sum((_shape_flops(shape, tokens) for shape in self.layers[index]), 0 * tokens)
        if index == 0 and self.conv is not None:
            channels, kernel, groups, padding = self.conv
            total = total + conv_flops(channels, tokens, kernel, groups, padding)
        if isinstance(tokens, torch.Tensor):
            return torch.where(tokens > 0, total, torch.zeros_like(total))
        return total if tokens > 0 else 0


def _unwrap(model: nn.Module):
    """(pyramid model or None, stock task model, stock base model, driver) of a Magic Pyramid model or a stock classifier."""
    pyramid = model if hasattr(model, "backbone") and hasattr(model, "driver") else None
    stock = model.backbone if pyramid is not None else model
    driver = driver_for(stock.config.model_type)
    return pyramid, stock, driver.base_model(stock), driver


def _embedding_projections(driver: PlainDriver, base: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in driver.embedding_projections(base)]


def _profile(model: nn.Module, full_width: bool = False) -> _Profile:
    pyramid, stock, base, driver = _unwrap(model)
    shapes = [driver.layer_shapes(base, layer) for layer in driver.layer_modules(base)]
    if full_width:
        heads, ffn = driver.full_widths(stock.config)
        for layer_shapes in shapes:
            for shape in layer_shapes:
                shape.heads, shape.ffn = heads, ffn
    # The attention the importance scores read is each layer's first (albert: the shared group's first inner layer).
    importance_widths = [(layer_shapes[0].heads, layer_shapes[0].head_dim) for layer_shapes in shapes]
    conv = driver.convolution(base)
    if conv is not None:
        conv = (conv.in_channels, conv.kernel_size[0], conv.groups, conv.padding[0])
    exit_heads = {}
    if pyramid is not None and hasattr(pyramid, "exits"):
        for key, head in pyramid.exits.items():
            # Every Linear of the head (the full head's dense + classifier, the light head's classifier alone).
            exit_heads[int(key)] = sum(linear_flops(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear))
    return _Profile(
        driver=driver,
        embedding_projections=_embedding_projections(driver, base),
        layers=shapes,
        importance_widths=importance_widths,
        conv=conv,
        final_head=final_head_flops(stock),
        exit_heads=exit_heads,
    )


def _importance(pyramid, profile: _Profile, importance_layers, keep_ratio_scale, prune_threshold_offset):
    """(1-based layers whose output scores token importance, whether the scores cost a matmul)."""
    if pyramid is None:
        return [], False
    config = pyramid.config
    num_layers = len(profile.layers)
    if importance_layers is None:
        # As the layer loop does: importance is scored after layer l when pruning happens before layer l + 1.
        plan = pyramid._pruning_plan(keep_ratio_scale, prune_threshold_offset)
        importance_layers = [layer for layer in range(1, num_layers) if plan[layer] is not None]
    for layer in importance_layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
            raise ValueError(f"importance_layers contains {layer!r}: layers are 1-based integers in [1, {num_layers}].")
    # The implementation the backbone really runs (the config copy may leave it unset).
    attn_impl = pyramid.backbone.config._attn_implementation or "eager"
    from_projections = scores_from_projections(profile.driver, config.token_importance, attn_impl)
    return list(importance_layers), from_projections


# ---------------------------------------------------------------------------------------------------------------------
# Per-sample totals
# ---------------------------------------------------------------------------------------------------------------------


def sample_flops(
    model: nn.Module,
    kept_tokens: torch.Tensor,
    exit_layer: torch.Tensor,
    importance_layers: list[int] | None = None,
    keep_ratio_scale: float | None = None,
    prune_threshold_offset: float | None = None,
    count_exit_heads: bool = True,
) -> torch.Tensor:
    """FLOPs each sample really cost in a Magic Pyramid forward, from its outputs `kept_tokens` and `exit_layer`.

    kept_tokens (batch, num_layers): real tokens each sample ran through in each layer (0 after it exited).
    exit_layer (batch,): the 1-based layer each sample exited after.
    importance_layers: 1-based layers after which token importance was scored; None derives them from the model's
    config and the run-time knobs `keep_ratio_scale` / `prune_threshold_offset` (pass those if forward got them).

    Counts the embeddings on the layer-1 token count, each layer on its kept count, the importance scores where they
    cost a matmul (cls_attention from projections under sdpa), each intermediate exit head the sample reached (every
    exit up to its exit layer), and the stock head when it reached the last layer. Returns int64 (batch,).
    """
    pyramid = _unwrap(model)[0]
    profile = _profile(model)
    num_layers = len(profile.layers)
    kept_tokens = torch.as_tensor(kept_tokens).to(torch.long)
    exit_layer = torch.as_tensor(exit_layer).to(torch.long)
    if kept_tokens.dim() != 2 or kept_tokens.shape[1] != num_layers:
        raise ValueError(
            f"kept_tokens must be (batch, num_layers={num_layers}), got shape {tuple(kept_tokens.shape)}."
        )
    if exit_layer.shape != kept_tokens.shape[:1]:
        raise ValueError(f"exit_layer must be (batch,) = {tuple(kept_tokens.shape[:1])}, got shape {tuple(exit_layer.shape)}.")
    if bool(((exit_layer < 1) | (exit_layer > num_layers)).any()):
        raise ValueError(f"exit_layer holds {exit_layer.tolist()}: exit layers are 1-based, in [1, {num_layers}].")

    total = sum((linear_flops(i, o, kept_tokens[:, 0]) for i, o in profile.embedding_projections), torch.zeros_like(exit_layer))
    for index in range(num_layers):
        total = total + profile.layer(index, kept_tokens[:, index])
    layers, from_projections = _importance(pyramid, profile, importance_layers, keep_ratio_scale, prune_threshold_offset)
    for layer in layers:
        heads, head_dim = profile.importance_widths[layer - 1]
        total = total + importance_flops(heads, head_dim, kept_tokens[:, layer - 1], from_projections)
    # The forward skips intermediate heads when its exit rule cannot fire (count_exit_heads=False then).
    for layer, flops in profile.exit_heads.items() if count_exit_heads else ():
        total = total + (exit_layer >= layer).to(torch.long) * flops
    total = total + (exit_layer == num_layers).to(torch.long) * profile.final_head
    return total


def full_model_flops(model: nn.Module, attention_mask: torch.Tensor, full_width: bool = False) -> torch.Tensor:
    """FLOPs of the plain stock classifier on each sample's real tokens: the baseline of a FLOP speedup. int64 (batch,).

    `model` is a stock `XxxForSequenceClassification` or a Magic Pyramid model (then its stock backbone as built, with
    no exit heads and no importance scores). attention_mask (batch, seq_len) 0/1 gives each sample's real tokens.
    `full_width=True` counts every layer at the backbone config's full head and FFN widths (the model before it was
    slenderized) instead of the widths as built.
    """
    profile = _profile(model, full_width=full_width)
    attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a 2D (batch, seq_len) 0/1 tensor, got shape {tuple(attention_mask.shape)}.")
    tokens = attention_mask.to(torch.long).sum(dim=1)
    total = sum((linear_flops(i, o, tokens) for i, o in profile.embedding_projections), torch.zeros_like(tokens))
    for index in range(len(profile.layers)):
        total = total + profile.layer(index, tokens)
    return total + profile.final_head


__all__ = [
    "layer_flops",
    "linear_flops",
    "conv_flops",
    "embedding_flops",
    "exit_head_flops",
    "final_head_flops",
    "importance_flops",
    "sample_flops",
    "full_model_flops",
]
