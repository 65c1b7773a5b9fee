"""Token pruning: removal is real and exact, positions stay the original ones, importance is the true attention."""

from __future__ import annotations


import pytest
import torch


from tiny import FAMILIES, SDPA_FAMILIES, padded_batch, stock_and_pyramid, tiny_stock

from hf_magicpyramid import MagicPyramidConfig, MagicPyramidForSequenceClassification  # noqa: E402
from hf_magicpyramid.modeling_magic_pyramid import _run_encoder  # noqa: E402
from hf_magicpyramid.pruning import AttentionCapture, select_tokens  # noqa: E402

ATTN_CASES = [(family, attn) for family in FAMILIES for attn in ("eager", "sdpa") if attn == "eager" or family in SDPA_FAMILIES]
LENGTHS = (12, 9, 5, 11)


def convert(family, attn="eager", **options):
    return stock_and_pyramid(family, attn, **options)


def record_positions(model, input_ids, attention_mask):
    """Run the real loop and record, before each layer, the original positions of the tokens it runs on."""
    seen = []

    def on_layer(i, stream):
        seen.append((stream.rows.clone(), stream.positions.clone(), stream.attention_mask.clone()))
        return False

    stream, kept = _run_encoder(model, input_ids, attention_mask, None, None, None, on_layer=on_layer)
    return stream, kept, seen


def embed_full_length(model, input_ids, attention_mask):
    """(driver, base, embeddings, layer context) for the unpruned input: where a hand-driven layer loop starts."""
    driver, base = model.driver, model.base_encoder
    hidden = driver.embed(base, input_ids, None, None, None, attention_mask)
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    return driver, base, hidden, driver.build_context(base, hidden, attention_mask, positions, pruned=False)


def masked_reference(model, input_ids, attention_mask, seen):
    """Full-length run where each layer sees only the tokens the pruned run kept for that layer (keys masked out)."""
    driver, base = model.driver, model.base_encoder
    hidden = driver.embed(base, input_ids, None, None, None, attention_mask)
    batch, seq_len = attention_mask.shape
    positions = torch.arange(seq_len).expand(batch, seq_len)
    for i, layer in enumerate(model.layers):
        rows, kept_positions, kept_mask = seen[i]
        layer_mask = torch.zeros_like(attention_mask)
        for row, pos, mask in zip(rows, kept_positions, kept_mask):
            layer_mask[row, pos[mask.bool()]] = 1
        ctx = driver.build_context(base, hidden, layer_mask, positions, pruned=False)
        hidden, _ = driver.run_layer(base, i, layer, hidden, ctx)
    return driver.finalize(base, hidden)


@pytest.mark.parametrize("family,attn", ATTN_CASES)
def test_pruned_run_equals_masked_full_length_run(family, attn):
    """Catches wrong positions: a pruned run must equal a full-length run with the same tokens masked from that layer on."""
    _, model = convert(family, attn, token_pruning="topk", keep_ratios=[1.0, 0.7, 0.5, 0.4])
    input_ids, attention_mask = padded_batch(LENGTHS, seed=3)
    with torch.no_grad():
        stream, kept, seen = record_positions(model, input_ids, attention_mask)
        pruned_hidden = model.driver.finalize(model.base_encoder, stream.hidden)
        reference = masked_reference(model, input_ids, attention_mask, seen)
    assert kept[:, -1].tolist() == [5, 4, 2, 5]  # ceil(0.4 * length): tokens really left the sequence
    assert pruned_hidden.shape[1] == 5
    for row in range(len(LENGTHS)):
        mask = stream.attention_mask[row].bool()
        expected = reference[row, stream.positions[row][mask]]
        torch.testing.assert_close(pruned_hidden[row][mask], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_settings_equal_unpruned(family):
    stock, plain = convert(family)
    keep_all = [
        dict(token_pruning="topk", keep_ratios=[1.0] * 4),
        dict(token_pruning="threshold", prune_thresholds=[0.0] * 4),
        dict(token_pruning="topk", keep_ratios=[1.0, 0.9, 0.8, 0.7], keep_ratio_scale=1e-9),
        dict(token_pruning="topk", keep_ratios=[1.0, 0.9, 0.8, 0.7], keep_ratio_scale=0),  # 0: pruning off
        dict(token_pruning="threshold", prune_thresholds=[0.0, 0.3, 0.3, 0.3], prune_threshold_offset=-1.0),
    ]
    input_ids, attention_mask = padded_batch(LENGTHS, seed=4)
    with torch.no_grad():
        expected = stock(input_ids=input_ids, attention_mask=attention_mask).logits
        for options in keep_all:
            model = MagicPyramidForSequenceClassification.from_backbone(stock, **options).eval()
            out = model(input_ids=input_ids, attention_mask=attention_mask)
            torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
            assert out.kept_tokens.tolist() == [[n] * 4 for n in LENGTHS]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in SDPA_FAMILIES])
def test_cls_attention_from_projections_equals_eager_probabilities(family):
    """Under sdpa the [CLS] row is rebuilt from hooked q/K; it must equal eager's attention probabilities."""
    stock_eager = tiny_stock(family, attn_implementation="eager")
    _, model = convert(family, "sdpa", token_pruning="topk")
    input_ids, attention_mask = padded_batch(LENGTHS, seed=5)
    with torch.no_grad():
        eager = stock_eager(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        driver, base, hidden, ctx = embed_full_length(model, input_ids, attention_mask)
        for i, layer in enumerate(model.layers):
            with AttentionCapture(driver, layer, "cls_attention", "sdpa") as capture:
                assert capture.from_projections
                hidden, _ = driver.run_layer(base, i, layer, hidden, ctx)
            scores = capture.scores(ctx)
            expected = eager[i][:, :, 0].mean(dim=1).masked_fill(~attention_mask.bool(), 0.0)
            torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "mpnet", "modernbert"])
def test_mean_attention_is_attention_received(family):
    stock_eager = tiny_stock(family, attn_implementation="eager")
    model = MagicPyramidForSequenceClassification.from_backbone(stock_eager, token_pruning="topk", token_importance="mean_attention").eval()
    input_ids, attention_mask = padded_batch(LENGTHS, seed=6)
    with torch.no_grad():
        eager = stock_eager(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        driver, base, hidden, ctx = embed_full_length(model, input_ids, attention_mask)
        capture = AttentionCapture(driver, model.layers[0], "mean_attention", "eager")
        hidden = capture.run_layer(base, 0, hidden, ctx)
        scores = capture.scores(ctx)
    real = attention_mask.bool()
    for row in range(len(LENGTHS)):
        n = int(real[row].sum())
        expected = eager[0][row, :, :n, :n].mean(dim=1).mean(dim=0)  # over heads, then over real queries
        torch.testing.assert_close(scores[row, :n], expected, atol=1e-5, rtol=0)


def test_mean_attention_under_sdpa_is_a_clear_error():
    _, model = convert("bert", "sdpa", token_pruning="topk", token_importance="mean_attention")
    input_ids, attention_mask = padded_batch(LENGTHS)
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        model(input_ids=input_ids, attention_mask=attention_mask)


def test_select_tokens_keeps_first_token_and_order():
    scores = torch.tensor([[0.0, 0.5, 0.1, 0.9, 0.3], [0.0, 0.2, 0.8, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    index, new_mask = select_tokens(scores, mask, torch.tensor([3, 2]))
    assert index[0].tolist() == [0, 1, 3]
    assert index[1, new_mask[1].bool()].tolist() == [0, 2]
    assert new_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_batch_equals_alone(family):
    _, model = convert(family, token_pruning="topk", keep_ratios=[1.0, 0.6, 0.5, 0.3])
    input_ids, attention_mask = padded_batch(LENGTHS, seed=7)
    with torch.no_grad():
        batch = model(input_ids=input_ids, attention_mask=attention_mask)
        for row, length in enumerate(LENGTHS):
            alone = model(input_ids=input_ids[row : row + 1, :length])
            torch.testing.assert_close(alone.logits[0], batch.logits[row], atol=1e-5, rtol=0)
            assert alone.kept_tokens[0].tolist() == batch.kept_tokens[row].tolist()


def test_threshold_pruning_removes_low_scoring_tokens_and_knob_scales_it():
    _, model = convert("bert", token_pruning="threshold", prune_thresholds=[0.0, 0.1, 0.1, 0.1])
    input_ids, attention_mask = padded_batch(LENGTHS, seed=8)
    with torch.no_grad():
        base = model(input_ids=input_ids, attention_mask=attention_mask).kept_tokens
        gentler = model(input_ids=input_ids, attention_mask=attention_mask, prune_threshold_offset=-0.05).kept_tokens
        harder = model(input_ids=input_ids, attention_mask=attention_mask, prune_threshold_offset=0.3).kept_tokens
    assert (gentler >= base).all() and (harder <= base).all()
    assert harder[:, 1:].eq(1).all()  # everything but [CLS] falls under 0.4 attention
    assert (base[:, 1:] < base[:, :1]).any()


def test_topk_knob_scales_kept_tokens():
    _, model = convert("bert", token_pruning="topk", keep_ratios=[1.0, 0.8, 0.6, 0.5])
    input_ids, attention_mask = padded_batch(LENGTHS, seed=9)
    with torch.no_grad():
        default = model(input_ids=input_ids, attention_mask=attention_mask).kept_tokens
        harder = model.set_speed(keep_ratio_scale=3.0)(input_ids=input_ids, attention_mask=attention_mask).kept_tokens
    assert default[:, 3].tolist() == [6, 5, 3, 6]  # ceil(0.5 * n)
    assert harder[:, 3].tolist() == [2, 2, 1, 2]  # ceil(0.125 * n)
    with pytest.raises(ValueError, match=r"keep_ratio_scale=-0.1 is out of range"):
        model.set_speed(keep_ratio_scale=-0.1)


def test_soft_threshold_phase_learns_thresholds_and_keeps_shapes():
    _, model = convert("bert", token_pruning="threshold", prune_thresholds=[0.0, 0.1, 0.1, 0.1])
    model.train()
    model.pruning_phase = "soft"
    input_ids, attention_mask = padded_batch(LENGTHS, seed=10)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 2, 0]))
    assert out.kept_tokens.tolist() == [[n] * 4 for n in LENGTHS]  # soft phase masks, never removes
    assert 0 < float(out.pruning_loss) < 1
    out.loss.backward()
    grad = model.prune_thresholds.grad
    assert grad[0] == 0 and bool((grad[1:] != 0).all())


def test_soft_phase_is_refused_for_deberta():
    _, model = convert("deberta-v2", token_pruning="threshold", prune_thresholds=[0.0, 0.1, 0.1, 0.1])
    model.train()
    model.pruning_phase = "soft"
    input_ids, attention_mask = padded_batch(LENGTHS)
    with pytest.raises(ValueError, match="not supported for deberta-v2"):
        model(input_ids=input_ids, attention_mask=attention_mask)


def test_learned_thresholds_are_saved_in_config_and_weights(tmp_path):
    _, model = convert("bert", token_pruning="threshold", prune_thresholds=[0.0, 0.1, 0.1, 0.1])
    with torch.no_grad():
        model.prune_thresholds.copy_(torch.tensor([0.0, 0.05, 0.07, 0.09]))
    model.save_pretrained(tmp_path)
    config = MagicPyramidConfig.from_pretrained(tmp_path)
    assert config.prune_thresholds == pytest.approx([0.0, 0.05, 0.07, 0.09])
    loaded = MagicPyramidForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.prune_thresholds, model.prune_thresholds)
    input_ids, attention_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
            model(input_ids=input_ids, attention_mask=attention_mask).logits,
        )


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(keep_ratios=[1.0, 0.5, 0.7, 0.4]), r"keep_ratios must not increase"),
        (dict(keep_ratios=[0.9, 0.5, 0.4, 0.3]), r"keep_ratios\[0\]=0.9"),
        (dict(keep_ratios=[1.0, 0.5]), r"keep_ratios has 2 entries; it needs one per layer \(4\)"),
        (dict(keep_ratios=[1.0, 0.5, 0.0, 0.0]), r"keep_ratios\[2\]=0.0 is out of range"),
        (dict(prune_thresholds=[0.0, 1.5, 0.1, 0.1]), r"prune_thresholds\[1\]=1.5 is out of range"),
        (dict(prune_thresholds=[0.2, 0.1, 0.1, 0.1]), r"prune_thresholds\[0\]=0.2"),
        (dict(token_pruning="random"), r"token_pruning='random' is not supported; choose one of 'none', 'topk', 'threshold'"),
        (dict(token_importance="norm"), r"token_importance='norm' is not supported"),
        (dict(min_kept_tokens=0), r"min_kept_tokens=0 is invalid"),
    ],
)
def test_bad_schedules_are_rejected(options, message):
    stock = tiny_stock("bert")
    with pytest.raises(ValueError, match=message):
        MagicPyramidForSequenceClassification.from_backbone(stock, token_pruning=options.pop("token_pruning", "topk"), **options)
