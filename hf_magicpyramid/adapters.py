"""One table of supported backbones, and one driver per way of calling their layers.

Nothing here copies a backbone's modeling code. Each table entry names the stock modules of the installed transformers
(embeddings, layers, attention projections, FFN, classification head) and the driver that calls them. A driver is
everything a family does differently, in one class per call kind:

- `PlainDriver`: layer(hidden, mask), as BERT, RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT run (their differences are
  module paths and attribute names in the table);
- `AlbertDriver`: plain layers, but shared: layer i runs group int(i / (N / G)), a group runs its inner layers;
- `DebertaDriver`: a 0/1 mask, relative positions and a convolution after the first layer; eager attention only;
- `MpnetDriver`: a relative-position bias shared by every layer; eager attention only;
- `ModernBertDriver`: rotary positions, sliding-window layers, fused q/k/v, gated FFN and a final norm.

A driver owns embedding, the per-call layer context (masks; relative or rotary positions rebuilt from the original
positions after pruning), the layer call, what follows the last layer, what token importance reads from the attention,
the layer modules, per-layer widths and shapes, head size, the longest input, and per-layer surgery (`slim_layer`).
One generic layer loop (`modeling_magic_pyramid.py`) drives every family through these methods.

Adding a BERT-like family means adding a table entry; a new call kind means a new driver.

This file travels to the Hub as custom code: it imports only installed packages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask
from transformers.pytorch_utils import prune_linear_layer


def get_path(module: nn.Module, path: str):
    for name in path.split("."):
        module = module[int(name)] if name.isdigit() else getattr(module, name)
    return module


def set_path(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(module, parent) if parent else module, name, value)


# ---------------------------------------------------------------------------------------------------------------------
# What the drivers hand around
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LayerContext:
    """What every layer needs besides the hidden states, for the current (possibly pruned) sequence.

    `attention_mask` is the 2D (batch, seq_len) 0/1 mask of the current tokens, `positions` (batch, seq_len) their
    original positions, `pruned` whether tokens were removed (then relative positions are built from `positions`).
    Built per call: nothing in it is shared between calls.
    """

    attention_mask: torch.Tensor
    positions: torch.Tensor
    pruned: bool
    layer_mask: object = None  # the mask in the form the family's layers take (dict per layer type for modernbert)
    extras: dict | None = None  # relative_pos / rel_embeddings / position_bias / position_embeddings / key_bias


@dataclass
class LayerShape:
    """The sizes that fix the matmul work of one stock (sub)layer; `flops.layer_flops` takes them as arguments.

    `layer_kind="disentangled"` (deberta-v2) adds relative-position work: `relative_terms` products over
    `relative_span` relative-embedding rows, and `relative_projections` projections of those rows.
    """

    hidden_size: int
    heads: int
    head_dim: int
    ffn: int
    gated_ffn: bool = False
    layer_kind: str = "standard"
    relative_span: int = 0
    relative_terms: int = 0
    relative_projections: int = 0


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


# ---------------------------------------------------------------------------------------------------------------------
# The drivers
# ---------------------------------------------------------------------------------------------------------------------


class PlainDriver:
    """BERT-like layers called as layer(hidden, mask). Holds its table entry and nothing else: one instance serves every
    model and every thread of that family."""

    sdpa = True  # has an sdpa attention
    returns_attention = False  # the layer call itself returns attention probabilities (under eager)
    fused_qkv = False  # one Linear makes q, k and v (rows [q heads | k heads | v heads])
    gated_ffn = False  # the FFN's first Linear makes [input | gate]
    slim_note = ""  # why layers cannot have their own widths; empty when they can

    def __init__(self, adapter: "BackboneAdapter"):
        self.adapter = adapter

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.adapter.model_type!r})"

    @property
    def model_type(self) -> str:
        return self.adapter.model_type

    @property
    def slimmable(self) -> bool:
        return not self.slim_note

    # --- facts from the stock config ----------------------------------------------------------------------------------
    def full_widths(self, config) -> tuple[int, int]:
        """(attention heads, FFN neurons) of every layer of a stock config, before any slimming."""
        return config.num_attention_heads, getattr(config, self.adapter.ffn_size_attr)

    def max_positions(self, config) -> int | None:
        """The longest input the backbone's position machinery accepts, or None when it has no fixed limit."""
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and self.adapter.positions_after_padding:
            # Positions start after the padding index (RoBERTa style), so pad_token_id + 1 slots are not usable.
            return limit - (config.pad_token_id if config.pad_token_id is not None else 1) - 1
        return limit

    # --- modules ------------------------------------------------------------------------------------------------------
    def base_model(self, backbone: nn.Module) -> nn.Module:
        """The stock base model (e.g. `BertModel`) inside a stock classifier; a base model is returned as is."""
        return getattr(backbone, self.adapter.base_attr, backbone)

    def layer_modules(self, base: nn.Module) -> list[nn.Module]:
        """The module that runs layer i, for i in 0..N-1."""
        return list(get_path(base, self.adapter.layers))

    def sublayers(self, layer: nn.Module) -> list[nn.Module]:
        """The stock layers one layer module runs, in order (one, except for albert's shared groups)."""
        return [layer]

    def attention(self, layer: nn.Module) -> nn.Module:
        """The self-attention module whose scores token importance reads (the first sublayer's)."""
        return get_path(self.sublayers(layer)[0], self.adapter.attention)

    def projection_modules(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The (query, key) projections of `attention(layer)`; the same module twice when q, k, v are fused."""
        attention = self.attention(layer)
        return get_path(attention, self.adapter.query), get_path(attention, self.adapter.key)

    def split_projections(self, query_output: torch.Tensor, key_output: torch.Tensor):
        """(q, k), each (batch, seq_len, heads · head_dim), from what the projection modules returned."""
        return query_output, key_output

    # --- widths and shapes (the one place that reads them off the modules) --------------------------------------------
    def head_dim(self, attention: nn.Module) -> int:
        return attention.attention_head_size

    def _widths(self, sublayer: nn.Module) -> tuple[int, int, int]:
        """(heads, head_dim, ffn) of one stock layer as built."""
        attention = get_path(sublayer, self.adapter.attention)
        head_dim = self.head_dim(attention)
        heads = get_path(attention, self.adapter.query).out_features // head_dim // (3 if self.fused_qkv else 1)
        ffn = get_path(sublayer, self.adapter.ffn_in).out_features // (2 if self.gated_ffn else 1)
        return heads, head_dim, ffn

    def layer_widths(self, layer: nn.Module) -> tuple[int, int]:
        """(attention heads, FFN neurons) of a layer module as built."""
        heads, _, ffn = self._widths(self.sublayers(layer)[0])
        return heads, ffn

    def layer_shapes(self, base: nn.Module, layer: nn.Module) -> list[LayerShape]:
        """The shape of every stock layer that layer module `layer` runs (albert: each inner layer of its group)."""
        hidden_size = base.config.hidden_size
        return [LayerShape(hidden_size, *self._widths(sublayer), gated_ffn=self.gated_ffn) for sublayer in self.sublayers(layer)]

    def embedding_projections(self, base: nn.Module) -> list[nn.Linear]:
        """The Linear layers embedding runs (deberta-v2's embed_proj, electra's and albert's projections to hidden)."""
        linears = [m for m in base.embeddings.modules() if isinstance(m, nn.Linear)]
        project = self._embedding_project(base)
        return linears + ([project] if project is not None else [])

    def convolution(self, base: nn.Module) -> nn.Conv1d | None:
        """A convolution that runs after the first layer (deberta-v2), else None."""
        return None

    # --- running ------------------------------------------------------------------------------------------------------
    def _embedding_project(self, base: nn.Module) -> nn.Module | None:
        if self.adapter.embed_project is None:
            return None
        try:
            return get_path(base, self.adapter.embed_project)
        except AttributeError:  # electra builds its projection only when embedding_size != hidden_size
            return None

    def embed(self, base, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        """(batch, seq_len, hidden) input of the first layer."""
        inputs = dict(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        if self.adapter.token_types:
            inputs["token_type_ids"] = token_type_ids
        hidden = base.embeddings(**inputs)
        project = self._embedding_project(base)
        return project(hidden) if project is not None else hidden

    def build_context(
        self,
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
        ctx = LayerContext(attention_mask=attention_mask, positions=positions, pruned=pruned, extras={})
        self._fill_context(ctx, base, hidden)
        if key_bias is not None:
            ctx.extras["key_bias"] = key_bias
            if isinstance(ctx.layer_mask, dict):
                ctx.layer_mask = {k: _add_key_bias(v, key_bias, hidden.dtype) for k, v in ctx.layer_mask.items()}
            else:
                ctx.layer_mask = _add_key_bias(ctx.layer_mask, key_bias, hidden.dtype)
        return ctx

    def _fill_context(self, ctx: LayerContext, base: nn.Module, hidden: torch.Tensor) -> None:
        ctx.layer_mask = create_bidirectional_mask(config=base.config, inputs_embeds=hidden, attention_mask=ctx.attention_mask)

    def run_layer(
        self,
        base: nn.Module,
        index: int,
        layer: nn.Module,
        hidden: torch.Tensor,
        ctx: LayerContext,
        output_attentions: bool = False,
    ):
        """Run stock layer `index` (0-based). Returns (hidden, attention probabilities or None).

        Hidden states go positionally, so gradient checkpointing checkpoints them. Probabilities come back only where
        the layer itself returns them (`returns_attention`) and `output_attentions` is set.
        """
        return _first(layer(hidden, ctx.layer_mask)), None

    def finalize(self, base: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the base model applies after its last layer (nothing, except modernbert's final norm)."""
        return hidden

    def final_head(self, backbone: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The stock classification head of `backbone` on the finalized last hidden states: (batch, num_labels)."""
        return self.adapter.final_head(backbone, hidden, attention_mask)

    def position_scores(self, layer, query: torch.Tensor, key: torch.Tensor, ctx: LayerContext):
        """The first query (batch, heads, 1, head_dim) and the keys (batch, heads, seq_len, head_dim) as the layer's
        attention scores them, and which keys it may see (batch, seq_len): what token importance rebuilds under sdpa."""
        return query, key, ctx.attention_mask.to(torch.bool)

    # --- surgery ------------------------------------------------------------------------------------------------------
    def layer_groups(self, config) -> list[int]:
        """For each layer (0-based), the index of the weight module it runs. Layers with the same index share weights
        (albert), so they must keep the same heads and neurons."""
        return list(range(config.num_hidden_layers))

    def slim_layer(
        self,
        layer: nn.Module,
        head_index: torch.Tensor | None,
        ffn_index: torch.Tensor | None,
        base: nn.Module | None = None,
    ) -> None:
        """Keep only the attention heads `head_index` and the FFN neurons `ffn_index` (0-based, in the layer's current
        numbering) of a layer module, in place; None keeps them all. Every stock layer the module runs is cut alike
        (albert: each inner layer of the shared group).

        Uses `prune_linear_layer` on the stock Linear modules: q/k/v rows (and the family's other per-head projections)
        and the attention output's columns per head, the FFN's first Linear rows and second Linear columns; each keeps
        its dtype. `base` (the stock base model) is needed where a head owns weights outside the layer (mpnet's
        relative-position bias). At least one head and one neuron stay.
        """
        if not self.slimmable:
            raise ValueError(f"Per-layer widths are not supported for {self.model_type}: {self.slim_note}.")
        # Indices live on the CPU (also while a model is built on the meta device); `_prune` moves them to the weights.
        if head_index is not None:
            head_index = torch.as_tensor(head_index, dtype=torch.long, device="cpu")
            if head_index.numel() < 1:
                raise ValueError("A layer must keep at least one attention head.")
        if ffn_index is not None:
            ffn_index = torch.as_tensor(ffn_index, dtype=torch.long, device="cpu")
            if ffn_index.numel() < 1:
                raise ValueError("A layer must keep at least one FFN neuron.")
        for sublayer in self.sublayers(layer):
            self._slim_sublayer(sublayer, head_index, ffn_index)
        if head_index is not None:
            self._slim_head_extras(layer, head_index, base)

    def _head_projections(self, attention: nn.Module) -> list[str]:
        """Paths (from the attention module) of the Linear layers whose output rows are per head."""
        return list(dict.fromkeys((self.adapter.query, self.adapter.key, self.adapter.value)))

    def _slim_head_extras(self, layer: nn.Module, head_index: torch.Tensor, base: nn.Module | None) -> None:
        """Per-head weights outside the stock layer (none here; mpnet's relative-position bias)."""

    def _slim_sublayer(self, layer: nn.Module, head_index: torch.Tensor | None, ffn_index: torch.Tensor | None) -> None:
        adapter = self.adapter
        attention = get_path(layer, adapter.attention)
        if head_index is not None:
            full_heads, head_dim, _ = self._widths(layer)
            if int(head_index.max()) >= full_heads or int(head_index.min()) < 0:
                raise ValueError(f"head index {head_index.tolist()} is out of range: this layer has heads 0..{full_heads - 1}.")
            rows = (head_index[:, None] * head_dim + torch.arange(head_dim, device="cpu")[None, :]).reshape(-1)
            if self.fused_qkv:  # rows are [q heads | k heads | v heads]
                _prune(attention, adapter.query, torch.cat([rows + part * full_heads * head_dim for part in range(3)]), dim=0)
            else:
                for path in self._head_projections(attention):
                    _prune(attention, path, rows, dim=0)
            _prune(layer, adapter.attention_out, rows, dim=1)
            for attr in adapter.head_count_attrs:
                setattr(attention, attr, head_index.numel())
            for attr in adapter.head_size_attrs:
                setattr(attention, attr, head_index.numel() * head_dim)
        if ffn_index is not None:
            _, _, full_ffn = self._widths(layer)
            if int(ffn_index.max()) >= full_ffn or int(ffn_index.min()) < 0:
                raise ValueError(f"FFN index {ffn_index.tolist()} is out of range: this layer has neurons 0..{full_ffn - 1}.")
            rows = ffn_index
            if self.gated_ffn:  # rows are [input | gate]
                rows = torch.cat([ffn_index, ffn_index + full_ffn])
            _prune(layer, adapter.ffn_in, rows, dim=0)
            _prune(layer, adapter.ffn_out, ffn_index, dim=1)


class AlbertDriver(PlainDriver):
    """ALBERT: plain layers, shared. Layer i runs group int(i / (N / G)); a group runs its `inner_group_num` layers."""

    def layer_modules(self, base: nn.Module) -> list[nn.Module]:
        groups = list(get_path(base, self.adapter.layers))
        return [groups[group] for group in self.layer_groups(base.config)]

    def layer_groups(self, config) -> list[int]:
        # Layers sharing a group share its weights: they keep the same heads and neurons (the group is cut once).
        return [int(i / (config.num_hidden_layers / config.num_hidden_groups)) for i in range(config.num_hidden_layers)]

    def sublayers(self, layer: nn.Module) -> list[nn.Module]:
        return list(get_path(layer, self.adapter.sublayers))


class DebertaDriver(PlainDriver):
    """DeBERTa-v2/v3: disentangled attention over relative positions, a 0/1 mask, a convolution after layer 1."""

    sdpa = False
    returns_attention = True

    def max_positions(self, config) -> int | None:
        if not getattr(config, "position_biased_input", True):
            # No absolute position embeddings: only a relative-only model has no fixed limit.
            return None if getattr(config, "relative_attention", False) else config.max_position_embeddings
        return super().max_positions(config)

    def embed(self, base, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        return base.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            mask=attention_mask,
            inputs_embeds=inputs_embeds,
        )

    def build_context(self, base, hidden, attention_mask, positions, pruned, key_bias=None) -> LayerContext:
        if key_bias is not None:
            raise ValueError(
                "Soft token masks (token_pruning='threshold' while learning thresholds) are not supported for deberta-v2, "
                "whose attention takes a 0/1 mask; learn a 'topk' schedule instead, or fix thresholds (pruning_phase='hard')."
            )
        return super().build_context(base, hidden, attention_mask, positions, pruned)

    def _fill_context(self, ctx: LayerContext, base: nn.Module, hidden: torch.Tensor) -> None:
        encoder = base.encoder
        ctx.layer_mask = encoder.get_attention_mask(ctx.attention_mask)
        if not encoder.relative_attention:
            return
        if ctx.pruned:
            positions = ctx.positions
            relative = positions[:, :, None] - positions[:, None, :]
            if encoder.position_buckets > 0 and encoder.max_relative_positions > 0:
                from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

                relative = make_log_bucket_position(relative, encoder.position_buckets, encoder.max_relative_positions)
            # Per-sample relative positions, (batch, seq, seq); each layer repeats them by its own head count, since
            # the attention gathers over (batch * heads) rows and a slender model's layers differ in heads.
            ctx.extras["sample_relative_pos"] = relative.to(torch.long)
            ctx.extras["relative_pos_by_heads"] = {}
        else:
            ctx.extras["relative_pos"] = encoder.get_rel_pos(hidden)
        ctx.extras["rel_embeddings"] = encoder.get_rel_embedding()

    def _relative_pos(self, layer: nn.Module, ctx: LayerContext):
        """The relative positions layer `layer` takes: shared (seq, seq), or per sample as (1, batch · heads, seq, seq)."""
        per_sample = ctx.extras.get("sample_relative_pos")
        if per_sample is None:
            return ctx.extras.get("relative_pos")
        heads = self.attention(layer).num_attention_heads
        cache = ctx.extras["relative_pos_by_heads"]  # per call: layers of the same width share one tensor
        if heads not in cache:
            cache[heads] = per_sample.repeat_interleave(heads, dim=0).unsqueeze(0)
        return cache[heads]

    def _head_projections(self, attention: nn.Module) -> list[str]:
        # Without shared keys, the relative embeddings have their own per-head projections: cut with the heads they serve.
        extra = [name for name in ("pos_key_proj", "pos_query_proj") if isinstance(getattr(attention, name, None), nn.Linear)]
        return super()._head_projections(attention) + extra

    def run_layer(self, base, index, layer, hidden, ctx, output_attentions=False):
        out, weights = layer(
            hidden,
            ctx.layer_mask,
            relative_pos=self._relative_pos(layer, ctx),
            rel_embeddings=ctx.extras.get("rel_embeddings"),
            output_attentions=output_attentions,
        )
        if index == 0 and base.encoder.conv is not None:
            out = base.encoder.conv(hidden, out, ctx.attention_mask)
        return _first(out), weights

    def layer_shapes(self, base: nn.Module, layer: nn.Module) -> list[LayerShape]:
        shapes = super().layer_shapes(base, layer)
        attention = self.attention(layer)
        if getattr(attention, "relative_attention", False):
            for shape in shapes:
                shape.layer_kind = "disentangled"
                shape.relative_span = min(2 * attention.pos_ebd_size, base.encoder.rel_embeddings.num_embeddings)
                shape.relative_terms = sum(term in attention.pos_att_type for term in ("c2p", "p2c"))
                # With shared keys both query_proj and key_proj run on the relative embeddings, whatever pos_att_type holds.
                shape.relative_projections = 2 if attention.share_att_key else shape.relative_terms
        return shapes

    def convolution(self, base: nn.Module) -> nn.Conv1d | None:
        return base.encoder.conv.conv if base.encoder.conv is not None else None


class MpnetDriver(PlainDriver):
    """MPNet: one relative-position bias, computed once per call, added in every layer.

    The bias has a column per head. A layer that lost heads gets its own bias table with the columns of the heads it
    kept (`attention.attn.relative_attention_bias`, buckets × kept heads, saved with the model); a layer at full width
    reads the shared one.
    """

    sdpa = False
    returns_attention = True

    def _fill_context(self, ctx: LayerContext, base: nn.Module, hidden: torch.Tensor) -> None:
        super()._fill_context(ctx, base, hidden)
        encoder = base.encoder
        if ctx.pruned:
            relative = ctx.positions[:, None, :] - ctx.positions[:, :, None]
        else:
            positions = torch.arange(hidden.shape[1], dtype=torch.long, device=hidden.device)
            relative = (positions[None, :] - positions[:, None]).unsqueeze(0)
        # The stock encoder buckets with its method's defaults (32 buckets); so does this.
        buckets = encoder.relative_position_bucket(relative)
        ctx.extras["position_buckets"] = buckets
        ctx.extras["position_bias"] = self._bias(encoder.relative_attention_bias, buckets, hidden.shape[0])

    @staticmethod
    def _bias(table: nn.Embedding, buckets: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch, heads, seq, seq) bias from (batch or 1, seq, seq) buckets, as the stock `compute_position_bias`."""
        values = table(buckets).permute(0, 3, 1, 2)
        return values.expand(batch, -1, -1, -1).contiguous()

    def run_layer(self, base, index, layer, hidden, ctx, output_attentions=False):
        own = getattr(self.attention(layer), "relative_attention_bias", None)
        bias = ctx.extras["position_bias"] if own is None else self._bias(own, ctx.extras["position_buckets"], hidden.shape[0])
        outputs = layer(hidden, ctx.layer_mask, bias, output_attentions=output_attentions)
        return _first(outputs[0]), outputs[1] if output_attentions else None

    def _slim_head_extras(self, layer: nn.Module, head_index: torch.Tensor, base: nn.Module | None) -> None:
        attention = self.attention(layer)
        table = getattr(attention, "relative_attention_bias", None)
        if table is None:
            if base is None:
                raise ValueError("Slimming an mpnet layer's heads needs the base model (its relative-position bias): pass base=.")
            table = base.encoder.relative_attention_bias
        weight = table.weight.detach()[:, head_index.to(table.weight.device)]
        own = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            own.weight.copy_(weight)
        own.weight.requires_grad_(table.weight.requires_grad)
        attention.relative_attention_bias = own


class ModernBertDriver(PlainDriver):
    """ModernBERT: rotary positions, full and sliding-window layers, fused q/k/v, gated FFN, a final norm."""

    fused_qkv = True
    gated_ffn = True

    def max_positions(self, config) -> int | None:
        return None  # rotary positions: no table to run out of

    def embed(self, base, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        return base.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)

    def head_dim(self, attention: nn.Module) -> int:
        return attention.head_dim

    def split_projections(self, query_output, key_output):
        query, key, _ = query_output.chunk(3, dim=-1)
        return query, key

    def _fill_context(self, ctx: LayerContext, base: nn.Module, hidden: torch.Tensor) -> None:
        config = base.config
        full = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=ctx.attention_mask)
        if ctx.pruned:
            window = config.sliding_window
            original = ctx.positions

            def near(batch_idx, head_idx, q_idx, kv_idx):
                return (original[batch_idx, q_idx] - original[batch_idx, kv_idx]).abs() <= window

            sliding = create_bidirectional_mask(
                config=config, inputs_embeds=hidden, attention_mask=ctx.attention_mask, and_mask_function=near
            )
            position_ids = ctx.positions
        else:
            sliding = create_bidirectional_sliding_window_mask(config=config, inputs_embeds=hidden, attention_mask=ctx.attention_mask)
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        ctx.layer_mask = {"full_attention": full, "sliding_attention": sliding}
        ctx.extras["position_embeddings"] = {
            layer_type: base.rotary_emb(hidden, position_ids, layer_type) for layer_type in set(config.layer_types)
        }

    def run_layer(self, base, index, layer, hidden, ctx, output_attentions=False):
        layer_type = layer.attention_type
        out = layer(hidden, attention_mask=ctx.layer_mask[layer_type], position_embeddings=ctx.extras["position_embeddings"][layer_type])
        return _first(out), None

    def finalize(self, base: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return base.final_norm(hidden)

    def position_scores(self, layer, query, key, ctx):
        from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

        cos, sin = ctx.extras["position_embeddings"][layer.attention_type]
        query, _ = apply_rotary_pos_emb(query, query, cos[:, :1], sin[:, :1], unsqueeze_dim=1)
        _, key = apply_rotary_pos_emb(key, key, cos, sin, unsqueeze_dim=1)
        allowed = ctx.attention_mask.to(torch.bool)
        if layer.attention_type == "sliding_attention":
            window = self.attention(layer).config.sliding_window
            allowed = allowed & ((ctx.positions - ctx.positions[:, :1]).abs() <= window)
        return query, key, allowed


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _prune(root: nn.Module, path: str, index: torch.Tensor, dim: int) -> None:
    linear = get_path(root, path)
    pruned = prune_linear_layer(linear, index.to(linear.weight.device), dim=dim)
    # prune_linear_layer builds the new Linear in the default dtype (fp32 for a bf16 layer): keep the layer's own.
    set_path(root, path, pruned.to(dtype=linear.weight.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Stock classification heads (a per-entry choice: families that share a call kind differ here)
# ---------------------------------------------------------------------------------------------------------------------


def _head_pooler(model, hidden, attention_mask):  # bert: base pooler, dropout, classifier
    return model.classifier(model.dropout(model.base_model.pooler(hidden)))


def _head_albert(model, hidden, attention_mask):  # albert's pooler is a Linear on the first token, then tanh
    base = model.base_model
    return model.classifier(model.dropout(base.pooler_activation(base.pooler(hidden[:, 0]))))


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
    """Where a family keeps its modules, and which driver calls them.

    Paths are dotted attribute paths: `base_attr` from the stock `XxxForSequenceClassification`, `layers` and
    `embed_project` from the base model, `sublayers` from a layer module, `attention_out`, `ffn_in`, `ffn_out` and
    `attention` from one stock layer, `query`/`key`/`value` from the attention module.
    """

    model_type: str
    base_attr: str
    driver: type[PlainDriver]
    final_head: Callable  # (stock classifier, finalized hidden, attention_mask) -> logits
    layers: str = "encoder.layer"
    attention: str = "attention.self"  # the self-attention module (returns (output, weights) under eager)
    query: str = "query"  # modernbert fuses q, k, v in one Linear: all three name it
    key: str = "key"
    value: str = "value"
    attention_out: str = "attention.output.dense"  # the Linear after attention (its input columns are per head)
    ffn_in: str = "intermediate.dense"
    ffn_out: str = "output.dense"
    sublayers: str | None = None  # albert: the inner layers of a shared group
    embed_project: str | None = None  # a Linear from the embedding size to the hidden size, after the embeddings
    token_types: bool = True  # the embeddings take token_type_ids
    positions_after_padding: bool = False  # RoBERTa-style positions start at pad_token_id + 1
    ffn_size_attr: str = "intermediate_size"  # the stock config's FFN width
    head_count_attrs: tuple[str, ...] = ("num_attention_heads",)  # on `attention`, updated when heads are removed
    head_size_attrs: tuple[str, ...] = ("all_head_size",)

    @property
    def sdpa(self) -> bool:
        return self.driver.sdpa


ADAPTERS: dict[str, BackboneAdapter] = {
    "bert": BackboneAdapter("bert", "bert", PlainDriver, _head_pooler),
    "roberta": BackboneAdapter("roberta", "roberta", PlainDriver, _head_on_sequence, positions_after_padding=True),
    "xlm-roberta": BackboneAdapter("xlm-roberta", "roberta", PlainDriver, _head_on_sequence, positions_after_padding=True),
    "electra": BackboneAdapter("electra", "electra", PlainDriver, _head_on_sequence, embed_project="embeddings_project"),
    "distilbert": BackboneAdapter(
        "distilbert",
        "distilbert",
        PlainDriver,
        _head_distilbert,
        layers="transformer.layer",
        attention="attention",
        query="q_lin",
        key="k_lin",
        value="v_lin",
        attention_out="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        token_types=False,
        ffn_size_attr="hidden_dim",
        head_count_attrs=("n_heads",),
        head_size_attrs=(),
    ),
    "albert": BackboneAdapter(
        "albert",
        "albert",
        AlbertDriver,
        _head_albert,
        layers="encoder.albert_layer_groups",
        sublayers="albert_layers",
        attention="attention",
        attention_out="attention.dense",
        ffn_in="ffn",
        ffn_out="ffn_output",
        embed_project="encoder.embedding_hidden_mapping_in",
    ),
    "deberta-v2": BackboneAdapter(
        "deberta-v2", "deberta", DebertaDriver, _head_deberta, query="query_proj", key="key_proj", value="value_proj"
    ),
    "mpnet": BackboneAdapter(
        "mpnet",
        "mpnet",
        MpnetDriver,
        _head_on_sequence,
        attention="attention.attn",
        query="q",
        key="k",
        value="v",
        attention_out="attention.attn.o",
        token_types=False,
        positions_after_padding=True,
    ),
    "modernbert": BackboneAdapter(
        "modernbert",
        "model",
        ModernBertDriver,
        _head_modernbert,
        layers="layers",
        attention="attn",
        query="Wqkv",
        key="Wqkv",
        value="Wqkv",
        attention_out="attn.Wo",
        ffn_in="mlp.Wi",
        ffn_out="mlp.Wo",
        token_types=False,
        head_count_attrs=(),
        head_size_attrs=(),
    ),
}

# One immutable driver per family, shared by every model of it.
DRIVERS: dict[str, PlainDriver] = {model_type: adapter.driver(adapter) for model_type, adapter in ADAPTERS.items()}

# Families that look close to a supported one but are not in the table; named so the error can say why.
UNSUPPORTED_NOTES = {
    "deberta": "DeBERTa v1 is not supported; DeBERTa-v2/v3 checkpoints ('deberta-v2') are.",
    "camembert": "CamemBERT is not in the table yet; its layers are RoBERTa's, so an entry like 'roberta' would add it.",
}


def check_supported(model_type: str) -> BackboneAdapter:
    """Return the table entry of `model_type`, or raise a `ValueError` listing the supported families."""
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    note = UNSUPPORTED_NOTES.get(model_type, "")
    raise ValueError(
        f"Unsupported backbone model_type {model_type!r}. {note} Supported backbones: {', '.join(sorted(ADAPTERS))}.".replace(
            "  ", " "
        )
    )


def driver_for(model_type: str) -> PlainDriver:
    """The driver of `model_type`; raises the `check_supported` error for an unsupported family."""
    return DRIVERS[check_supported(model_type).model_type]


__all__ = [
    "ADAPTERS",
    "BackboneAdapter",
    "LayerContext",
    "LayerShape",
    "PlainDriver",
    "AlbertDriver",
    "DebertaDriver",
    "MpnetDriver",
    "ModernBertDriver",
    "check_supported",
    "driver_for",
]
