"""Token importance and token selection for width-wise pruning.

Importance is read from the stock attention layers while they run:
- `cls_attention`: the attention row of the first token, averaged over heads. Under sdpa no probabilities exist, so
  forward hooks on the query/key projections catch q and K and the first row is recomputed: softmax(q_0 · Kᵀ · scale +
  mask), (batch, heads, seq_len) only, never (seq_len × seq_len). Families whose scores are more than q · k (deberta-v2's
  disentangled terms, mpnet's position bias) run eager and read the row from the returned probabilities.
- `mean_attention`: the attention each token receives, averaged over real queries and heads (LTP, PoWER-BERT); eager.

This file travels to the Hub as custom code: it imports only installed packages and same-folder modules.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import BackboneAdapter, LayerContext, get_path


class AttentionCapture:
    """While one layer runs, catch what the importance score needs. Use as a context manager around `run_layer`.

    After the layer ran, `scores(ctx)` returns (batch, seq_len) importance in [0, 1] (padding gets 0).
    """

    def __init__(self, adapter: BackboneAdapter, layer: nn.Module, mode: str, attn_implementation: str):
        self.adapter = adapter
        self.layer = layer
        self.mode = mode
        self.attention = get_path(layer, adapter.attention)
        # deberta-v2 and mpnet return probabilities themselves when asked; no hooks needed there.
        self.layer_returns_weights = adapter.call in ("deberta", "mpnet")
        self.from_projections = mode == "cls_attention" and not self.layer_returns_weights and attn_implementation != "eager"
        self.handles = []
        self.query = self.key = self.weights = None

    @property
    def needs_layer_weights(self) -> bool:
        return self.layer_returns_weights

    def __enter__(self):
        if self.from_projections:
            query = get_path(self.attention, self.adapter.query)
            key = get_path(self.attention, self.adapter.key)
            if query is key:  # fused qkv projection
                self.handles.append(query.register_forward_hook(self._catch_fused))
            else:
                self.handles.append(query.register_forward_hook(self._catch("query")))
                self.handles.append(key.register_forward_hook(self._catch("key")))
        elif not self.layer_returns_weights:
            self.handles.append(self.attention.register_forward_hook(self._catch_weights))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _catch(self, name):
        def hook(module, inputs, output):
            setattr(self, name, output)

        return hook

    def _catch_fused(self, module, inputs, output):
        self.query, self.key, _ = output.chunk(3, dim=-1)

    def _catch_weights(self, module, inputs, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"token_importance={self.mode!r} needs attention probabilities, but the {self.adapter.model_type} "
                "attention returned none: load the model with attn_implementation='eager'."
            )
        self.weights = weights

    def set_layer_weights(self, weights: torch.Tensor | None) -> None:
        self.weights = weights

    def scores(self, ctx: LayerContext) -> torch.Tensor:
        """(batch, seq_len) importance of each current token, 0 on padding."""
        mask = ctx.attention_mask.to(torch.bool)
        if self.from_projections:
            row = self._cls_row_from_projections(ctx)
        elif self.mode == "cls_attention":
            row = self.weights[:, :, 0, :].mean(dim=1)
        else:
            real_queries = mask.to(self.weights.dtype)[:, None, :, None]
            received = (self.weights * real_queries).sum(dim=2) / real_queries.sum(dim=2).clamp(min=1.0)
            row = received.mean(dim=1)
        self.query = self.key = self.weights = None
        return row.float().masked_fill(~mask, 0.0)

    def _cls_row_from_projections(self, ctx: LayerContext) -> torch.Tensor:
        attention = self.attention
        head_dim = attention.head_dim if self.adapter.fused_qkv else attention.attention_head_size
        batch, seq_len, _ = self.key.shape
        query = self.query[:, :1].reshape(batch, 1, -1, head_dim).transpose(1, 2)  # (batch, heads, 1, head_dim)
        key = self.key.reshape(batch, seq_len, -1, head_dim).transpose(1, 2)  # (batch, heads, seq_len, head_dim)
        allowed = ctx.attention_mask.to(torch.bool)
        if self.adapter.call == "modernbert":
            from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

            cos, sin = ctx.extras["position_embeddings"][self.layer.attention_type]
            query, _ = apply_rotary_pos_emb(query, query, cos[:, :1], sin[:, :1], unsqueeze_dim=1)
            _, key = apply_rotary_pos_emb(key, key, cos, sin, unsqueeze_dim=1)
            if self.layer.attention_type == "sliding_attention":
                window = self.layer.attn.config.sliding_window
                allowed = allowed & ((ctx.positions - ctx.positions[:, :1]).abs() <= window)
        logits = torch.matmul(query, key.transpose(-1, -2)).squeeze(2) * head_dim**-0.5  # (batch, heads, seq_len)
        if ctx.extras.get("key_bias") is not None:  # LTP's soft mask, as the layer itself saw it
            logits = logits + ctx.extras["key_bias"][:, None, :].to(logits.dtype)
        logits = logits.masked_fill(~allowed[:, None, :], torch.finfo(logits.dtype).min)
        return torch.softmax(logits.float(), dim=-1).mean(dim=1)


def select_tokens(
    scores: torch.Tensor,
    attention_mask: torch.Tensor,
    keep_counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the `keep_counts[b]` most important real tokens of each sample, the first token always among them.

    scores (batch, seq_len), attention_mask (batch, seq_len) 0/1, keep_counts (batch,) ≥ 1.
    Returns (index, new_mask): index (batch, kept_len) of kept positions in their original order, padded to the batch's
    longest kept sequence; new_mask (batch, kept_len) 1 on kept tokens, 0 on the padding columns.
    """
    real = attention_mask.to(torch.bool)
    ranked = scores.masked_fill(~real, -math.inf).clone()
    ranked[:, 0] = math.inf  # the first token ([CLS]) always stays
    keep_counts = torch.minimum(keep_counts, real.sum(dim=1)).clamp(min=1)
    kept_len = int(keep_counts.max())
    # Best first; ties (e.g. zero attention outside a sliding window) go to the earlier token, so a sample's choice
    # does not depend on its padding or on the batch around it.
    top = ranked.sort(dim=1, descending=True, stable=True).indices[:, :kept_len]  # (batch, kept_len)
    valid = torch.arange(kept_len, device=scores.device)[None, :] < keep_counts[:, None]
    # Invalid slots (beyond a sample's own count) sort to the end, kept tokens keep their original order.
    order_key = torch.where(valid, top, top.new_full(top.shape, scores.shape[1]) + torch.arange(kept_len, device=scores.device))
    order = order_key.argsort(dim=1)
    index = top.gather(1, order)
    new_mask = valid.gather(1, order).to(attention_mask.dtype)
    return index, new_mask


def topk_counts(original_lengths: torch.Tensor, ratio: float, min_kept: int) -> torch.Tensor:
    """Tokens to keep per sample for a keep ratio of the original real length: ceil(ratio · length), at least `min_kept`."""
    counts = torch.ceil(original_lengths.to(torch.float64) * ratio - 1e-9).to(torch.long)
    return counts.clamp(min=min_kept)


def threshold_counts(scores: torch.Tensor, attention_mask: torch.Tensor, threshold: float, min_kept: int) -> torch.Tensor:
    """Tokens to keep per sample: the real tokens scoring at least `threshold` (plus the first token), at least `min_kept`."""
    real = attention_mask.to(torch.bool)
    above = (scores >= threshold) & real
    above[:, 0] = True
    return above.sum(dim=1).clamp(min=min_kept)


__all__ = ["AttentionCapture", "select_tokens", "topk_counts", "threshold_counts"]
