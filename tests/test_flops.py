"""Analytic FLOPs (hf_magicpyramid.flops) against torch's FlopCounterMode on the stock models and on Magic Pyramid runs.

FlopCounterMode on CPU has no formula for the fused sdpa kernel (`_scaled_dot_product_flash_attention_for_cpu`), so it
would count no attention at all under sdpa: the references run eager, or get that formula through `custom_mapping`.
"""



import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_magicpyramid import MagicPyramidConfig, MagicPyramidForSequenceClassification
from hf_magicpyramid.flops import (
    exit_head_flops,
    final_head_flops,
    full_model_flops,
    importance_flops,
    layer_flops,
    sample_flops,
)
from tiny import FAMILIES, SDPA_FAMILIES, tiny_config, tiny_stock

NUM_LAYERS = 4
HIDDEN = 32
NUM_LABELS = 3


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and attention · V of the CPU fused sdpa kernel, as FlopCounterMode counts the GPU kernels."""
    batch, heads, q_len, head_dim = query_shape
    k_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * q_len * k_len * head_dim + 2 * batch * heads * q_len * k_len * v_dim


def count_flops(model, **inputs) -> int:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(**inputs)
    return counter.get_total_flops()


def sample_ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (batch, length), generator=generator)
    ids[:, 0] = 2
    return ids


def relative_error(ours: int, reference: int) -> float:
    return abs(ours - reference) / reference


def pyramid(family: str, attn_implementation: str = "eager", **options) -> MagicPyramidForSequenceClassification:
    stock = tiny_stock(family, num_labels=NUM_LABELS, attn_implementation=attn_implementation)
    return MagicPyramidForSequenceClassification.from_backbone(stock, **options).eval()


# ---------------------------------------------------------------------------------------------------------------------
# The stock models
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [7, 40])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_model_flops_match_flop_counter(family, length):
    stock = tiny_stock(family, num_labels=NUM_LABELS, attn_implementation="eager")
    ids = sample_ids(length)
    reference = count_flops(stock, input_ids=ids)
    ours = int(full_model_flops(stock, torch.ones_like(ids))[0])
    assert relative_error(ours, reference) <= 0.05, (family, length, ours, reference)


@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_full_model_flops_same_under_sdpa(family):
    stock = tiny_stock(family, num_labels=NUM_LABELS, attn_implementation="sdpa")
    ids = sample_ids(40)
    reference = count_flops(stock, input_ids=ids)
    ours = int(full_model_flops(stock, torch.ones_like(ids))[0])
    assert relative_error(ours, reference) <= 0.05, (family, ours, reference)


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "modernbert"])
def test_full_model_flops_count_each_sample_on_its_own_tokens(family):
    stock = tiny_stock(family, num_labels=NUM_LABELS, attn_implementation="eager")
    lengths = [40, 9, 23]
    ids = sample_ids(max(lengths), batch=len(lengths))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    per_sample = full_model_flops(stock, mask)
    assert per_sample.shape == (len(lengths),) and per_sample.dtype == torch.long
    for row, length in enumerate(lengths):
        alone = count_flops(stock, input_ids=ids[row : row + 1, :length])
        assert relative_error(int(per_sample[row]), alone) <= 0.05, (family, length)


def test_albert_counts_every_inner_layer_of_a_shared_group():
    stock = tiny_stock("albert", num_labels=NUM_LABELS, attn_implementation="eager", inner_group_num=2)
    ids = sample_ids(40)
    reference = count_flops(stock, input_ids=ids)
    assert relative_error(int(full_model_flops(stock, torch.ones_like(ids))[0]), reference) <= 0.05


def test_layer_flops_terms():
    n, hidden, heads, head_dim, ffn = 10, 32, 4, 8, 37
    projections = 4 * 2 * n * hidden * heads * head_dim
    attention = heads * 2 * 2 * n * n * head_dim
    assert layer_flops(hidden, heads, head_dim, ffn, n) == projections + attention + 2 * 2 * n * hidden * ffn
    assert layer_flops(hidden, heads, head_dim, ffn, n, gated_ffn=True) == projections + attention + 3 * 2 * n * hidden * ffn
    plain = layer_flops(hidden, heads, head_dim, ffn, n)
    disentangled = layer_flops(
        hidden, heads, head_dim, ffn, n, layer_kind="disentangled", relative_span=16, relative_terms=2, relative_projections=2
    )
    assert disentangled == plain + 2 * heads * 2 * n * head_dim * 16 + 2 * 2 * 16 * hidden * heads * head_dim
    tokens = torch.tensor([0, 5, 10])
    assert layer_flops(hidden, heads, head_dim, ffn, tokens).tolist() == [0, layer_flops(hidden, heads, head_dim, ffn, 5), plain]
    assert importance_flops(heads, head_dim, n) == heads * 2 * n * head_dim
    assert importance_flops(heads, head_dim, n, from_projections=False) == 0
    assert exit_head_flops(hidden, NUM_LABELS) == 2 * hidden * hidden + 2 * hidden * NUM_LABELS
    with pytest.raises(ValueError, match="layer_kind"):
        layer_flops(hidden, heads, head_dim, ffn, n, layer_kind="sparse")
    with pytest.raises(ValueError, match="relative_span"):
        layer_flops(hidden, heads, head_dim, ffn, n, layer_kind="disentangled")


# ---------------------------------------------------------------------------------------------------------------------
# Magic Pyramid runs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_flops_at_full_length_are_the_stock_model_plus_exit_heads(family):
    model = pyramid(family)
    lengths = torch.tensor([40, 7])
    kept = lengths[:, None].expand(-1, NUM_LAYERS)
    exit_layer = torch.full((2,), NUM_LAYERS)
    mask = (torch.arange(40)[None, :] < lengths[:, None]).long()
    exits = (NUM_LAYERS - 1) * exit_head_flops(HIDDEN, NUM_LABELS)
    assert torch.equal(sample_flops(model, kept, exit_layer), full_model_flops(model, mask) + exits)
    # The stock model and the converted one count the same.
    assert torch.equal(full_model_flops(model, mask), full_model_flops(model.backbone, mask))
    assert final_head_flops(model) == final_head_flops(model.backbone) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_flops_match_flop_counter_on_a_pruned_early_exiting_run(family):
    # topk pruning (eager: importance is read from the probabilities, no extra matmul); entropy threshold 1.0 lets
    # the sample leave at its first exit that is not perfectly uncertain.
    for options in (dict(), dict(token_pruning="topk"), dict(token_pruning="topk", exit_layers=[2, 4], exit_threshold=1.0)):
        model = pyramid(family, **options)
        ids = sample_ids(40)
        with torch.no_grad():
            out = model(input_ids=ids)
        reference = count_flops(model, input_ids=ids)
        ours = int(sample_flops(model, out.kept_tokens, out.exit_layer)[0])
        assert relative_error(ours, reference) <= 0.05, (family, options, out.kept_tokens.tolist(), ours, reference)
        if options.get("exit_threshold") is not None:
            assert int(out.exit_layer[0]) == 2
        if options.get("token_pruning"):
            assert int(out.kept_tokens[0, -1]) < 40 or int(out.exit_layer[0]) < NUM_LAYERS


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_importance_from_projections_is_counted_under_sdpa(family):
    model = pyramid(family, attn_implementation="sdpa", token_pruning="topk")
    ids = sample_ids(40)
    with torch.no_grad():
        out = model(input_ids=ids)
    reference = count_flops(model, input_ids=ids)
    ours = sample_flops(model, out.kept_tokens, out.exit_layer)
    assert relative_error(int(ours[0]), reference) <= 0.05, (family, int(ours[0]), reference)
    without = sample_flops(model, out.kept_tokens, out.exit_layer, importance_layers=[])
    kept = out.kept_tokens[0, :3]
    assert int(ours[0] - without[0]) == sum(importance_flops(4, 8, int(n)) for n in kept)


def test_slender_model_matches_flop_counter():
    config = MagicPyramidConfig(
        backbone_config=tiny_config("bert", num_labels=NUM_LABELS),
        heads_per_layer=[4, 2, 1, 3],
        ffn_per_layer=[37, 20, 5, 11],
        num_labels=NUM_LABELS,
    )
    config._attn_implementation = "eager"
    model = MagicPyramidForSequenceClassification(config).eval()
    assert model.layer_widths() == [(4, 37), (2, 20), (1, 5), (3, 11)]
    ids = sample_ids(40)
    with torch.no_grad():
        out = model(input_ids=ids)
    assert out.exit_layer.tolist() == [NUM_LAYERS]  # the defaults never exit early
    reference = count_flops(model, input_ids=ids)
    ours = int(sample_flops(model, out.kept_tokens, out.exit_layer)[0])
    assert relative_error(ours, reference) <= 0.05, (ours, reference)
    exits = (NUM_LAYERS - 1) * exit_head_flops(HIDDEN, NUM_LABELS)
    slender = int(full_model_flops(model, torch.ones_like(ids))[0])
    assert ours == slender + exits
    # full_width: the backbone before slenderizing, i.e. the stock model of the same config.
    stock = tiny_stock("bert", num_labels=NUM_LABELS, attn_implementation="eager")
    full = int(full_model_flops(model, torch.ones_like(ids), full_width=True)[0])
    assert full == int(full_model_flops(stock, torch.ones_like(ids))[0]) > slender
    assert relative_error(full, count_flops(stock, input_ids=ids)) <= 0.05


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "modernbert"])
def test_fewer_tokens_or_earlier_exit_cost_less(family):
    model = pyramid(family, token_pruning="topk")
    full = torch.full((1, NUM_LAYERS), 40)
    last = torch.tensor([NUM_LAYERS])
    base = int(sample_flops(model, full, last)[0])
    previous = base
    for layer in range(1, NUM_LAYERS):  # prune harder and harder from layer 2 on
        kept = full.clone()
        kept[0, layer:] = 40 - 10 * layer
        flops = int(sample_flops(model, kept, last)[0])
        assert flops < base
        pruned_more = kept.clone()
        pruned_more[0, layer:] -= 5
        assert int(sample_flops(model, pruned_more, last)[0]) < flops
    for exit_at in range(NUM_LAYERS - 1, 0, -1):  # exit earlier and earlier
        kept = full.clone()
        kept[0, exit_at:] = 0
        flops = int(sample_flops(model, kept, torch.tensor([exit_at]))[0])
        assert flops < previous
        previous = flops
    # Batched: each row counts independently.
    kept = torch.stack([full[0], torch.tensor([40, 30, 0, 0])])
    both = sample_flops(model, kept, torch.tensor([NUM_LAYERS, 2]))
    assert both[0] == base and both[1] < base


def test_sample_flops_reject_bad_shapes_and_layers():
    model = pyramid("bert")
    kept = torch.full((2, NUM_LAYERS), 9)
    with pytest.raises(ValueError, match="kept_tokens"):
        sample_flops(model, kept[:, :2], torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="exit_layer"):
        sample_flops(model, kept, torch.tensor([4]))
    with pytest.raises(ValueError, match="exit_layer"):
        sample_flops(model, kept, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="importance_layers"):
        sample_flops(model, kept, torch.tensor([4, 4]), importance_layers=[5])
    with pytest.raises(ValueError, match="attention_mask"):
        full_model_flops(model, torch.ones(9))
