"""Early exit: criteria, the speed knob, exited samples really leave the batch, batch results equal alone results."""

from __future__ import annotations

import math

import pytest
import torch


from tiny import FAMILIES, padded_batch, sharpen_exits, stock_and_pyramid, tiny_stock

from hf_magicpyramid import MagicPyramidConfig, MagicPyramidForSequenceClassification  # noqa: E402
from hf_magicpyramid.exits import PatienceState, exit_decision, exit_objective_loss, normalized_entropy  # noqa: E402

LENGTHS = (9, 6, 3, 12, 7, 11)


def threshold_between_values(values: torch.Tensor) -> float:
    """A threshold in the middle of the gap nearest the median, so no value sits on the boundary."""
    ordered = values.flatten().sort().values
    middle = len(ordered) // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# Never-exit settings reproduce the full model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(exit_criterion="entropy", exit_threshold=0.0),
        dict(exit_criterion="confidence", exit_threshold=1.0),
        dict(exit_criterion="patience", patience=4),
    ],
    ids=["default", "entropy0", "confidence1", "patience-depth"],
)
def test_never_exit_settings_equal_full_model(family, options):
    stock, model = stock_and_pyramid(family, **options)
    sharpen_exits(model)
    input_ids, attention_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        expected = stock(input_ids=input_ids, attention_mask=attention_mask).logits
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    assert out.exit_layer.tolist() == [4] * len(LENGTHS)


# ---------------------------------------------------------------------------------------------------------------------
# Batched early exit: a sample's result in a batch equals its result alone
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", ["confidence", "entropy"])
def test_batch_equals_alone_with_mixed_exit_layers(family, criterion):
    _, model = stock_and_pyramid(family, exit_criterion=criterion)
    sharpen_exits(model)
    input_ids, attention_mask = padded_batch(LENGTHS, seed=1)
    with torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=attention_mask, output_all_exits=True).exit_logits[0]
        values = first.softmax(-1).max(-1).values if criterion == "confidence" else normalized_entropy(first)
        # About half the samples pass the rule at exit 1; the others go on and exit later.
        model.set_speed(exit_threshold=threshold_between_values(values))
        batch = model(input_ids=input_ids, attention_mask=attention_mask)
        for row, length in enumerate(LENGTHS):
            alone = model(input_ids=input_ids[row : row + 1, :length])
            assert alone.exit_layer.item() == batch.exit_layer[row].item()
            torch.testing.assert_close(alone.logits[0], batch.logits[row], atol=1e-5, rtol=0)
    assert len(set(batch.exit_layer.tolist())) >= 2, "the crafted threshold must make samples exit at different layers"


def test_patience_batch_equals_alone():
    _, model = stock_and_pyramid("bert", exit_criterion="patience", patience=1)
    sharpen_exits(model, seed=3)
    input_ids, attention_mask = padded_batch(LENGTHS, seed=2)
    with torch.no_grad():
        batch = model(input_ids=input_ids, attention_mask=attention_mask)
        every = model(input_ids=input_ids, attention_mask=attention_mask, output_all_exits=True).exit_logits
        predictions = torch.stack([logits.argmax(-1) for logits in every], dim=1)  # (batch, exits)
        for row, length in enumerate(LENGTHS):
            alone = model(input_ids=input_ids[row : row + 1, :length])
            assert alone.exit_layer.item() == batch.exit_layer[row].item()
            torch.testing.assert_close(alone.logits[0], batch.logits[row], atol=1e-5, rtol=0)
            # The rule itself: the first layer whose prediction equals the previous one (patience 1), else the last.
            same = [k for k in range(1, 4) if predictions[row, k] == predictions[row, k - 1]]
            expected_layer = same[0] + 1 if same else 4
            assert batch.exit_layer[row].item() == expected_layer


def test_exited_samples_really_leave_the_batch():
    _, model = stock_and_pyramid("bert", exit_criterion="entropy", exit_layers=[1, 2, 3])
    sharpen_exits(model)
    input_ids, attention_mask = padded_batch(LENGTHS, seed=1)
    seen_batch_sizes = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen_batch_sizes.append(i[0].shape[0])) for layer in model.layers]
    with torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=attention_mask, output_all_exits=True).exit_logits[0]
        seen_batch_sizes.clear()
        out = model(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=threshold_between_values(normalized_entropy(first)))
    for hook in hooks:
        hook.remove()
    # Each layer ran on exactly the samples that had not exited before it, and no layer ran on an empty batch.
    still_running = [int((out.exit_layer > k).sum()) for k in range(4)]
    assert seen_batch_sizes == [n for n in still_running if n > 0]
    assert 0 < still_running[1] < len(LENGTHS)


def test_padding_columns_leave_with_the_longest_sample():
    _, model = stock_and_pyramid("bert", exit_criterion="confidence")
    sharpen_exits(model)
    input_ids, attention_mask = padded_batch((12, 4), seed=4)  # seed 4: the long sample is the more confident at exit 1
    lengths_seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: lengths_seen.append(i[0].shape[1])) for layer in model.layers]
    with torch.no_grad():
        # Find the exit-1 confidence of each sample, then set the threshold so only the long one exits at layer 1.
        first = model(input_ids=input_ids, attention_mask=attention_mask, output_all_exits=True).exit_logits[0]
        confidence = first.softmax(-1).max(-1).values
        lengths_seen.clear()
        assert confidence[0] > confidence[1]
        threshold = float((confidence[0] + confidence[1]) / 2)
        out = model(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=threshold)
    for hook in hooks:
        hook.remove()
    assert out.exit_layer[0].item() == 1
    assert lengths_seen[0] == 12 and lengths_seen[1] == 4


# ---------------------------------------------------------------------------------------------------------------------
# The rules on hand-built logits
# ---------------------------------------------------------------------------------------------------------------------


def test_entropy_rule_is_normalised_by_label_count():
    uniform2, uniform20 = torch.zeros(1, 2), torch.zeros(1, 20)
    assert normalized_entropy(uniform2).item() == pytest.approx(1.0)
    assert normalized_entropy(uniform20).item() == pytest.approx(1.0)
    sharp = torch.tensor([[10.0, 0.0]])
    expected = -(torch.tensor([10.0, 0.0]).softmax(0) * torch.tensor([10.0, 0.0]).log_softmax(0)).sum() / math.log(2)
    assert normalized_entropy(sharp).item() == pytest.approx(expected.item(), rel=1e-5)
    logits = torch.tensor([[10.0, 0.0], [0.1, 0.0]])
    decide = lambda threshold: exit_decision(logits, "entropy", threshold, None, "single_label_classification", PatienceState(2, "cpu"))  # noqa: E731
    assert decide(0.5).tolist() == [True, False]
    assert decide(0.0).tolist() == [False, False]
    assert decide(None).tolist() == [False, False]


def test_confidence_rule():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # max prob 0.7870 and 1/3
    decide = lambda threshold: exit_decision(logits, "confidence", threshold, None, "single_label_classification", PatienceState(2, "cpu"))  # noqa: E731
    assert decide(0.78).tolist() == [True, False]
    assert decide(0.79).tolist() == [False, False]
    assert decide(0.3).tolist() == [True, True]
    assert decide(1.0).tolist() == [False, False]


def test_patience_rule_counts_consecutive_agreement():
    state = PatienceState(2, "cpu")
    steps = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])]
    decisions = [exit_decision(logits, "patience", None, 2, "single_label_classification", state).tolist() for logits in steps]
    assert decisions == [[False, False], [False, False], [True, False]]
    assert state.streak.tolist() == [2, 1]


def test_patience_rule_for_regression_uses_tolerance():
    state = PatienceState(2, "cpu")
    steps = [torch.tensor([[0.50], [0.50]]), torch.tensor([[0.52], [0.90]])]
    decisions = [exit_decision(v, "patience", None, 1, "regression", state, regression_tolerance=0.05).tolist() for v in steps]
    assert decisions == [[False, False], [True, False]]


def test_multilabel_confidence_needs_every_label_sure():
    logits = torch.tensor([[5.0, -5.0], [5.0, 0.1]])
    decision = exit_decision(logits, "confidence", 0.9, None, "multi_label_classification", PatienceState(2, "cpu"))
    assert decision.tolist() == [True, False]


# ---------------------------------------------------------------------------------------------------------------------
# The speed knob, validation, save/load
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "speed,message",
    [
        (dict(exit_threshold=1.5), r"exit_threshold=1.5 is out of range: it must be a number in \[0.0, 1.0\]"),
        (dict(exit_threshold=-0.1), r"exit_threshold=-0.1 is out of range"),
        (dict(exit_threshold="fast"), r"exit_threshold='fast' is out of range"),
        (dict(patience=2), r"patience=2 is only used by exit_criterion='patience'"),
    ],
)
def test_bad_speed_is_rejected(speed, message):
    _, model = stock_and_pyramid("bert")
    with pytest.raises(ValueError, match=message):
        model.set_speed(**speed)
    input_ids, attention_mask = padded_batch(LENGTHS)
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids, attention_mask=attention_mask, **speed)
    with pytest.raises(ValueError, match=message):
        MagicPyramidConfig(backbone_config=model.config.backbone_config, **speed)


def test_bad_patience_is_rejected():
    _, model = stock_and_pyramid("bert", exit_criterion="patience")
    with pytest.raises(ValueError, match=r"patience=0 is invalid: it must be an integer >= 1"):
        model.set_speed(patience=0)
    with pytest.raises(ValueError, match=r"exit_threshold=0.5 has no meaning for exit_criterion='patience'"):
        model.set_speed(exit_threshold=0.5)


def test_speed_knob_changes_exits_without_reload_and_per_call():
    _, model = stock_and_pyramid("bert", exit_criterion="entropy")
    sharpen_exits(model)
    input_ids, attention_mask = padded_batch(LENGTHS, seed=1)
    with torch.no_grad():
        slow = model(input_ids=input_ids, attention_mask=attention_mask).exit_layer
        fast = model(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=0.999).exit_layer
        assert model.config.exit_threshold is None  # a per-call override does not stick
        model.set_speed(exit_threshold=0.999)
        fast_again = model(input_ids=input_ids, attention_mask=attention_mask).exit_layer
    assert slow.tolist() == [4] * len(LENGTHS)
    assert fast.float().mean() < 2 and fast.tolist() == fast_again.tolist()


def test_save_load_keeps_speed_and_exit_layers(tmp_path):
    _, model = stock_and_pyramid("roberta", exit_layers=[1, 3], exit_criterion="confidence", exit_pooling="mean")
    sharpen_exits(model)
    model.set_speed(exit_threshold=0.6)
    model.save_pretrained(tmp_path)
    loaded = MagicPyramidForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.exit_threshold == 0.6 and loaded.config.exit_layers == [1, 3]
    assert loaded.exit_layers == [1, 3, 4] and sorted(loaded.exits) == ["1", "3"]
    input_ids, attention_mask = padded_batch(LENGTHS, seed=1)
    with torch.no_grad():
        a = model(input_ids=input_ids, attention_mask=attention_mask)
        b = loaded(input_ids=input_ids, attention_mask=attention_mask)
    assert a.exit_layer.tolist() == b.exit_layer.tolist()
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Training outputs and objectives
# ---------------------------------------------------------------------------------------------------------------------


def test_training_mode_returns_every_exit_and_joint_loss_weights_depth():
    _, model = stock_and_pyramid("bert", exit_layers=[1, 2, 3])
    model.train()
    input_ids, attention_mask = padded_batch(LENGTHS)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert len(out.exit_logits) == 4 and all(l.shape == (6, 3) for l in out.exit_logits)
    per_exit = torch.stack([torch.nn.functional.cross_entropy(l, labels) for l in out.exit_logits])
    expected = (per_exit * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum() / 10
    torch.testing.assert_close(out.loss, expected)


def test_two_stage_and_self_distillation_losses():
    logits = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0, -1.0]])]
    labels = torch.tensor([0])
    ce = [torch.nn.functional.cross_entropy(l, labels) for l in logits]
    stage1 = exit_objective_loss(logits, [1, 2, 3], labels, "single_label_classification", "two_stage", 1, 1.0)
    stage2 = exit_objective_loss(logits, [1, 2, 3], labels, "single_label_classification", "two_stage", 2, 1.0)
    torch.testing.assert_close(stage1, ce[2])
    torch.testing.assert_close(stage2, (ce[0] + ce[1]) / 2)
    distilled = exit_objective_loss(logits, [1, 2, 3], labels, "single_label_classification", "self_distillation", 2, 2.0)
    teacher = (logits[2] / 2).log_softmax(-1)
    kl = [(teacher.exp() * (teacher - (l / 2).log_softmax(-1))).sum() * 4 for l in logits[:2]]
    torch.testing.assert_close(distilled, (kl[0] + kl[1]) / 2)


def test_eval_loss_without_all_exits_is_the_returned_logits_loss():
    # Issue 16: a plain Trainer evaluates in eval mode with labels; the loss is that of the logits each sample exited with.
    stock, model = stock_and_pyramid("bert")
    input_ids, attention_mask = padded_batch(LENGTHS)
    labels = torch.zeros(6, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        torch.testing.assert_close(out.loss, stock(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss, rtol=0, atol=1e-6)
        assert out.exit_logits is None
        every = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_all_exits=True)
    assert every.loss is not None and len(every.exit_logits) == 4


def test_heads_that_cannot_fire_are_not_run_and_flops_say_so():
    # A converted model never exits early: its intermediate heads need not run. (Eager: FlopCounterMode has no CPU
    # formula for sdpa's fused kernel.)
    model = MagicPyramidForSequenceClassification.from_backbone(tiny_stock("bert", attn_implementation="eager")).eval()
    calls = []
    hooks = [head.register_forward_hook(lambda m, i, o: calls.append(1)) for head in model.exits.values()]
    input_ids, attention_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_flops=True)
        assert calls == []
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            model(input_ids=input_ids[3:4], attention_mask=attention_mask[3:4])  # the unpadded 12-token sample
        model.set_speed(exit_threshold=0.5)
        fired = model(input_ids=input_ids, attention_mask=attention_mask, output_flops=True)
    for hook in hooks:
        hook.remove()
    assert int(out.flops[3]) == counter.get_total_flops()
    assert len(calls) > 0 and model(input_ids=input_ids, attention_mask=attention_mask).flops is None
    assert bool((fired.flops[fired.exit_layer == 4] > out.flops[fired.exit_layer == 4]).all())  # heads ran, and cost


# ---------------------------------------------------------------------------------------------------------------------
# The light exit head (issue 12): pool → LayerNorm → dropout → linear
# ---------------------------------------------------------------------------------------------------------------------


def test_light_exit_head_runs_saves_and_counts_its_flops(tmp_path):
    from hf_magicpyramid.exits import ExitHead, LightExitHead
    from hf_magicpyramid.flops import linear_flops

    stock, light = stock_and_pyramid("bert", exit_head="light", exit_criterion="entropy", exit_threshold=0.0)
    _, full = stock_and_pyramid("bert", exit_criterion="entropy", exit_threshold=0.0)
    assert all(type(head) is LightExitHead for head in light.exits.values())
    assert all(type(head) is ExitHead for head in full.exits.values())
    assert not any("dense" in name for name, _ in light.exits.named_parameters())
    input_ids, attention_mask = padded_batch(LENGTHS)
    with torch.no_grad():  # exits off: the stock model's logits, whatever the head
        torch.testing.assert_close(light(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   stock(input_ids=input_ids, attention_mask=attention_mask).logits, atol=1e-5, rtol=0)
    # Every sample leaves at layer 1 (normalised entropy < 1): the FLOPs differ by the full head's dense layer alone.
    with torch.no_grad():
        light_out = light(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=1.0, output_flops=True)
        full_out = full(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=1.0, output_flops=True)
    assert light_out.exit_layer.tolist() == full_out.exit_layer.tolist() == [1] * len(LENGTHS)
    hidden = light.config.hidden_size
    assert (full_out.flops - light_out.flops).tolist() == [linear_flops(hidden, hidden)] * len(LENGTHS)
    # Saved and loaded: the same head and the same outputs.
    light.save_pretrained(tmp_path)
    loaded = MagicPyramidForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.exit_head == "light" and type(loaded.exits["1"]) is LightExitHead
    with torch.no_grad():
        again = loaded(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=1.0)
    torch.testing.assert_close(again.logits, light_out.logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"exit_head='tiny' is not supported; choose one of 'full', 'light'"):
        MagicPyramidConfig(backbone_config=stock.config, exit_head="tiny")
