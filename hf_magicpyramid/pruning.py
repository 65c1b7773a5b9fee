"""Token importance and token selection for width-wise pruning.

Importance is read from the stock attention layers while they run:
- `cls_attention`: the attention row of the first token, averaged over heads. Under sdpa no probabilities exist, so
  the outputs of the query/key projections are caught and the first row is recomputed: softmax(q_0 · Kᵀ · scale +
  mask), (batch, heads, seq_len) only, never (seq_len × seq_len); no projection runs twice. Families whose scores are
  more than q · k (deberta-v2's disentangled terms, mpnet's position bias) run eager and return the probabilities from
  the layer call itself.
- `mean_attention`: the attention each token receives, averaged over real queries and heads (LTP, PoWER-BERT); eager.

Concurrent calls on one model are safe: the forward hooks that catch q, K or the probabilities are installed once per
module, hold no state, and write into the `AttentionCapture` of the call that is running the layer, found through a
context variable (each thread and each asyncio task sees its own).

This file travels to the Hub as custom code: it imports only installed packages and same-folder modules.
"""

from __future__ import annotations

import math
import threading
from contextvars import ContextVar

import torch
from torch import nn

from .adapters import LayerContext, PlainDriver

# The capture of the layer the current thread / task is running, if it scores importance; None otherwise.
_ACTIVE_CAPTURE: ContextVar["AttentionCapture | None"] = ContextVar("magic_pyramid_attention_capture", default=None)
_HOOKED = "_magic_pyramid_capture_hook"  # set on a module once its hook is installed
_install_lock = threading.Lock()  # so that two threads reaching a new module together install one hook, not two


def _capture_hook(module: nn.Module, inputs, output) -> None:
    capture = _ACTIVE_CAPTURE.get()
    if capture is not None:
        capture._catch(module, output)


def _ensure_hook(module: nn.Module) -> None:
    """Install the stateless capture hook on `module` once (again after surgery replaced a module: it is a new one)."""
    if module.__dict__.get(_HOOKED):
        return
    with _install_lock:
        if not module.__dict__.get(_HOOKED):
            module.register_forward_hook(_capture_hook)
            module.__dict__[_HOOKED] = True


def scores_from_projections(driver: PlainDriver, mode: str, attn_implementation: str) -> bool:
    """Whether `cls_attention` is rebuilt from the q/K projections (sdpa: no probabilities to read), which costs one
    q₀ · Kᵀ product per scoring layer."""
    return mode == "cls_attention" and not driver.returns_attention and attn_implementation != "eager"


class AttentionCapture:
    """What one layer's run gives token importance, for one call. `run_layer` runs the layer and catches it;
    `scores(ctx)` then returns (batch, seq_len) importance in [0, 1] (padding gets 0).

    Also a context manager around a hand-made `driver.run_layer` call (then pass `output_attentions=needs_layer_weights`
    and hand the returned probabilities to `weights`).
    """

    def __init__(self, driver: PlainDriver, layer: nn.Module, mode: str, attn_implementation: str):
        self.driver = driver
        self.layer = layer
        self.mode = mode
        self.attention = driver.attention(layer)
        self.needs_layer_weights = driver.returns_attention
        self.from_projections = scores_from_projections(driver, mode, attn_implementation)
        self.query_module, self.key_module = driver.projection_modules(layer) if self.from_projections else (None, None)
        self.query = self.key = self.weights = None
        self._token = None

    def __enter__(self):
        if self.from_projections:
            _ensure_hook(self.query_module)
            _ensure_hook(self.key_module)
        elif not self.needs_layer_weights:
            _ensure_hook(self.attention)
        self._token = _ACTIVE_CAPTURE.set(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE_CAPTURE.reset(self._token)
        self._token = None

    def run_layer(self, base: nn.Module, index: int, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Run layer `index` through the driver while catching what the scores need; returns its hidden states."""
        with self:
            hidden, weights = self.driver.run_layer(base, index, self.layer, hidden, ctx, output_attentions=self.needs_layer_weights)
        if self.needs_layer_weights:
            self.weights = weights
        return hidden

    def _catch(self, module: nn.Module, output) -> None:
        """Called by the hooks, in the thread running this capture's layer."""
        if self.from_projections:
            if module is self.query_module and module is self.key_module:
                self.query, self.key = self.driver.split_projections(output, output)
            elif module is self.query_module:
                self.query = output
            elif module is self.key_module:
                self.key = output
        elif module is self.attention and not self.needs_layer_weights:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    f"token_importance={self.mode!r} needs attention probabilities, but the {self.driver.model_type} "
                    "attention returned none: load the model with attn_implementation='eager'."
                )
            self.weights = weights

    def scores(self, ctx: LayerContext) -> torch.Tensor:
        """(batch, seq_len) importance of each current token, 0 on padding."""
        mask = ctx.attention_mask.to(torch.bool)
        if self.from_projections:
            row = self._cls_row_from_projections(ctx)
        else:
            if self.weights is None:
                raise RuntimeError(f"No attention probabilities were caught from the {self.driver.model_type} layer.")
            if self.mode == "cls_attention":
                row = self.weights[:, :, 0, :].mean(dim=1)
            else:
                real_queries = mask.to(self.weights.dtype)[:, None, :, None]
                received = (self.weights * real_queries).sum(dim=2) / real_queries.sum(dim=2).clamp(min=1.0)
                row = received.mean(dim=1)
        self.query = self.key = self.weights = None
        return row.float().masked_fill(~mask, 0.0)

    def _cls_row_from_projections(self, ctx: LayerContext) -> torch.Tensor:
        if self.query is None or self.key is None:
            raise RuntimeError(f"The query/key projections of the {self.driver.model_type} layer did not run while it was captured.")
        head_dim = self.driver.head_dim(self.attention)
        batch, seq_len, _ = self.key.shape
        query = self.query[:, :1].reshape(batch, 1, -1, head_dim).transpose(1, 2)  # (batch, heads, 1, head_dim)
        key = self.key.reshape(batch, seq_len, -1, head_dim).transpose(1, 2)  # (batch, heads, seq_len, head_dim)
        query, key, allowed = self.driver.position_scores(self.layer, query, key, ctx)
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


__all__ = ["AttentionCapture", "scores_from_projections", "select_tokens", "topk_counts", "threshold_counts"]
