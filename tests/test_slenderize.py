"""COST-EFF slenderization: structural pruning of heads and neurons on every family, importance, distillation losses,
the step schedule, the command, and a small real run."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hf_magicpyramid import MagicPyramidConfig, MagicPyramidForSequenceClassification
from hf_magicpyramid.flops import full_model_flops, layer_flops
from tiny import FAMILIES, padded_batch, tiny_config, tiny_stock

ATOL = 1e-5
HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 8, 37, 4
KEEP_HEADS = [4, 2, 1, 3]
KEEP_FFN = [37, 20, 5, 11]
# albert's layers 1-2 and 3-4 share weights (tiny config: 2 groups): one width per group.
ALBERT_KEEP_HEADS = [2, 2, 3, 3]
ALBERT_KEEP_FFN = [20, 20, 11, 11]

# Where each family keeps, in the stock classifier's state dict, the Linear whose input columns are per head (the
# attention output) and the one whose input columns are per FFN neuron (the FFN's second Linear). Written out here,
# independently of the adapter table, so that the zeroing reference does not share code with the pruning.
OUTPUT_WEIGHTS = {
    "bert": ("bert.encoder.layer.{i}.attention.output.dense.weight", "bert.encoder.layer.{i}.output.dense.weight"),
    "roberta": ("roberta.encoder.layer.{i}.attention.output.dense.weight", "roberta.encoder.layer.{i}.output.dense.weight"),
    "xlm-roberta": ("roberta.encoder.layer.{i}.attention.output.dense.weight", "roberta.encoder.layer.{i}.output.dense.weight"),
    "electra": ("electra.encoder.layer.{i}.attention.output.dense.weight", "electra.encoder.layer.{i}.output.dense.weight"),
    "distilbert": ("distilbert.transformer.layer.{i}.attention.out_lin.weight", "distilbert.transformer.layer.{i}.ffn.lin2.weight"),
    "albert": (
        "albert.encoder.albert_layer_groups.{g}.albert_layers.0.attention.dense.weight",
        "albert.encoder.albert_layer_groups.{g}.albert_layers.0.ffn_output.weight",
    ),
    "deberta-v2": ("deberta.encoder.layer.{i}.attention.output.dense.weight", "deberta.encoder.layer.{i}.output.dense.weight"),
    "mpnet": ("mpnet.encoder.layer.{i}.attention.attn.o.weight", "mpnet.encoder.layer.{i}.output.dense.weight"),
    "modernbert": ("model.layers.{i}.attn.Wo.weight", "model.layers.{i}.mlp.Wo.weight"),
}


def keep_plan(family: str, seed: int = 0):
    """Per layer, the sorted head and neuron indices to keep (random which, fixed how many); albert's shared layers
    get the same lists."""
    generator = torch.Generator().manual_seed(seed)
    heads_kept, ffn_kept = (ALBERT_KEEP_HEADS, ALBERT_KEEP_FFN) if family == "albert" else (KEEP_HEADS, KEEP_FFN)
    heads, ffn = [], []
    for layer in range(LAYERS):
        if family == "albert" and layer % 2 == 1:
            heads.append(list(heads[-1]))
            ffn.append(list(ffn[-1]))
            continue
        heads.append(sorted(torch.randperm(HEADS, generator=generator)[: heads_kept[layer]].tolist()))
        ffn.append(sorted(torch.randperm(FFN, generator=generator)[: ffn_kept[layer]].tolist()))
    return heads, ffn


def zero_removed(state_dict: dict, family: str, heads, ffn, prefix: str = "") -> dict:
    """A copy of a stock state dict in which every head and neuron not kept is zeroed in the output Linear's columns."""
    state = {key: value.clone() for key, value in state_dict.items()}
    attention_out, ffn_out = OUTPUT_WEIGHTS[family]
    for layer in range(LAYERS):
        names = dict(i=layer, g=layer // 2)
        attention_weight = state[prefix + attention_out.format(**names)]
        for head in range(HEADS):
            if head not in heads[layer]:
                attention_weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
        ffn_weight = state[prefix + ffn_out.format(**names)]
        for neuron in range(FFN):
            if neuron not in ffn[layer]:
                ffn_weight[:, neuron] = 0
    return state


def stock_and_pyramid(family: str, attn_implementation: str | None = None, **options):
    """A tiny stock classifier with weights 10x the usual initialisation (so that logits are of order 1 and a 1e-5
    parity means something) and the Magic Pyramid model converted from it; `options` are config fields."""
    stock = tiny_stock(family, attn_implementation=attn_implementation, initializer_range=0.2)
    return stock, MagicPyramidForSequenceClassification.from_backbone(stock, **options).eval()


def run(model, input_ids, attention_mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, output_all_exits=True, **kwargs)


def assert_close(actual, expected, atol=ATOL, what=""):
    difference = (actual - expected).abs().max().item()
    assert difference <= atol, f"{what}: max difference {difference} > {atol}"


# ---------------------------------------------------------------------------------------------------------------------
# 1. Structural pruning by explicit index lists, every family
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_equals_zeroing_the_removed_heads_and_neurons(family, tmp_path):
    stock, pyramid = stock_and_pyramid(family, exit_layers=[1, 2, 3, 4])
    heads, ffn = keep_plan(family)
    # The reference: the same model with the removed heads' and neurons' output columns zeroed, nothing removed.
    zeroed = copy.deepcopy(pyramid)
    zeroed.backbone.load_state_dict(zero_removed(pyramid.backbone.state_dict(), family, heads, ffn))
    zeroed_stock = copy.deepcopy(stock)
    zeroed_stock.load_state_dict(zero_removed(stock.state_dict(), family, heads, ffn))

    full_parameters = sum(p.numel() for p in pyramid.parameters())
    pyramid.slim(heads, ffn)
    expected_heads, expected_ffn = (ALBERT_KEEP_HEADS, ALBERT_KEEP_FFN) if family == "albert" else (KEEP_HEADS, KEEP_FFN)
    assert pyramid.layer_widths() == list(zip(expected_heads, expected_ffn))
    assert pyramid.config.heads_per_layer == expected_heads and pyramid.config.ffn_per_layer == expected_ffn
    assert sum(p.numel() for p in pyramid.parameters()) < full_parameters

    input_ids, attention_mask = padded_batch()
    ours = run(pyramid, input_ids, attention_mask)
    reference = run(zeroed, input_ids, attention_mask)
    for layer, (mine, theirs) in enumerate(zip(ours.exit_logits, reference.exit_logits, strict=True), start=1):
        assert_close(mine, theirs, what=f"{family} exit {layer}")
    with torch.no_grad():
        stock_logits = zeroed_stock(input_ids=input_ids, attention_mask=attention_mask).logits
    assert_close(ours.logits, stock_logits, what=f"{family} final logits vs the zeroed stock model")
    # Pruning really changed the model (the zeroed heads and neurons mattered).
    with torch.no_grad():
        full_logits = stock(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (full_logits - stock_logits).abs().max() > 1e-2
    assert ours.logits.abs().max() > 0.1

    # Save -> load with the plugin: same tensors, same outputs, bit for bit.
    pyramid.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["heads_per_layer"] == expected_heads and saved["ffn_per_layer"] == expected_ffn
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.layer_widths() == pyramid.layer_widths()
    assert loaded.state_dict().keys() == pyramid.state_dict().keys()
    for key, value in pyramid.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    again = run(loaded, input_ids, attention_mask)
    for mine, theirs in zip(again.exit_logits, ours.exit_logits, strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_twice_composes(family):
    """A second cut indexes the layer's current numbering: two steps equal one cut to the composed indices."""
    _, once = stock_and_pyramid(family)
    twice = copy.deepcopy(once)
    heads, ffn = keep_plan(family)
    once.slim(heads, ffn)
    # First drop neurons 0 and 36 everywhere (heads untouched), then cut to the plan, renumbered.
    first_ffn = [[n for n in range(FFN) if n not in (0, 36)] for _ in range(LAYERS)]
    keep_ffn = [[n for n in layer if n not in (0, 36)] for layer in ffn]
    twice.slim(None, first_ffn)
    twice.slim(heads, [[first_ffn[layer].index(n) for n in keep_ffn[layer]] for layer in range(LAYERS)])
    _, single = stock_and_pyramid(family)
    single.slim(heads, keep_ffn)
    assert twice.layer_widths() == single.layer_widths()
    input_ids, attention_mask = padded_batch()
    for mine, theirs in zip(run(twice, input_ids, attention_mask).exit_logits, run(single, input_ids, attention_mask).exit_logits):
        assert_close(mine, theirs, what=family)


@pytest.mark.parametrize("family", ["deberta-v2", "mpnet", "bert", "modernbert"])
def test_slender_with_token_pruning_batch_equals_alone(family):
    """Per-layer head widths with tokens removed (deberta-v2 repeats its per-sample relative positions by each layer's
    own head count; mpnet gathers each layer's bias columns): every sample in a batch gets what it gets alone."""
    _, pyramid = stock_and_pyramid(family, token_pruning="topk", keep_ratios=[1.0, 0.7, 0.5, 0.4])
    heads, ffn = keep_plan(family)
    pyramid.slim(heads, ffn)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        batch = pyramid(input_ids=input_ids, attention_mask=attention_mask)
        assert int(batch.kept_tokens[:, -1].sum()) < int(attention_mask.sum())  # tokens really went
        for row in range(input_ids.shape[0]):
            length = int(attention_mask[row].sum())
            alone = pyramid(input_ids=input_ids[row : row + 1, :length], attention_mask=attention_mask[row : row + 1, :length])
            assert_close(batch.logits[row], alone.logits[0], what=f"{family} row {row}")


def test_albert_shared_layers_keep_the_same_indices():
    _, pyramid = stock_and_pyramid("albert")
    heads, _ = keep_plan("albert")
    heads[1] = [0]  # layer 2 shares layer 1's weights
    with pytest.raises(ValueError, match=r"head_index\[1\]=\[0\] differs from head_index\[0\]=.*share one set of weights"):
        pyramid.slim(heads, None)
    with pytest.raises(ValueError, match=r"heads_per_layer=\[4, 2, 4, 4\] is not supported for albert: layers 1 and 2 share"):
        MagicPyramidConfig(backbone_config=tiny_config("albert"), heads_per_layer=[4, 2, 4, 4])


def test_bad_index_lists_are_refused():
    _, pyramid = stock_and_pyramid("bert")
    with pytest.raises(ValueError, match=r"head_index has 2 entries; it needs one per layer \(4\)"):
        pyramid.slim([[0], [1]], None)
    with pytest.raises(ValueError, match=r"head_index\[1\] is empty: layer 2 must keep at least one head"):
        pyramid.slim([None, [], None, None], None)
    with pytest.raises(ValueError, match=r"ffn_index\[0\]=\[0, 37\] is out of range: layer 1 has indices 0..36"):
        pyramid.slim(None, [[0, 37], None, None, None])


# ---------------------------------------------------------------------------------------------------------------------
# Parameters and FLOPs follow the shapes
# ---------------------------------------------------------------------------------------------------------------------


def test_parameter_count_matches_the_shapes():
    """bert: each removed head takes head_dim rows (weights + bias) of q, k, v and head_dim columns of the output;
    each removed neuron a row (weights + bias) of the first FFN Linear and a column of the second."""
    _, pyramid = stock_and_pyramid("bert")
    before = sum(p.numel() for p in pyramid.parameters())
    heads, ffn = keep_plan("bert")
    pyramid.slim(heads, ffn)
    removed_heads = sum(HEADS - len(h) for h in heads)
    removed_neurons = sum(FFN - len(n) for n in ffn)
    per_head = 3 * HEAD_DIM * (HIDDEN + 1) + HEAD_DIM * HIDDEN
    per_neuron = (HIDDEN + 1) + HIDDEN
    assert sum(p.numel() for p in pyramid.parameters()) == before - removed_heads * per_head - removed_neurons * per_neuron


def test_mpnet_parameter_count_adds_the_per_layer_bias_columns():
    _, pyramid = stock_and_pyramid("mpnet")
    before = sum(p.numel() for p in pyramid.parameters())
    heads, ffn = keep_plan("mpnet")
    pyramid.slim(heads, ffn)
    buckets = pyramid.config.backbone_config.relative_attention_num_buckets
    removed = sum(HEADS - len(h) for h in heads) * (3 * HEAD_DIM * (HIDDEN + 1) + HEAD_DIM * HIDDEN)
    removed += sum(FFN - len(n) for n in ffn) * (2 * HIDDEN + 1)
    own_tables = sum(buckets * len(h) for h in heads if len(h) < HEADS)
    assert sum(p.numel() for p in pyramid.parameters()) == before - removed + own_tables


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_follow_the_pruned_shapes(family):
    from torch.utils.flop_counter import FlopCounterMode

    _, pyramid = stock_and_pyramid(family, attn_implementation="eager")
    heads, ffn = keep_plan(family)
    full = int(full_model_flops(pyramid, torch.ones(1, 12, dtype=torch.long))[0])
    pyramid.slim(heads, ffn)
    ids = padded_batch(lengths=(12,))[0]
    slender = int(full_model_flops(pyramid, torch.ones_like(ids))[0])
    assert slender < full
    assert int(full_model_flops(pyramid, torch.ones_like(ids), full_width=True)[0]) == full
    if family in ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert"):
        # Standard layers: the analytic count at the kept widths, plus the unchanged head and embedding projections.
        widths = pyramid.layer_widths()
        layers = sum(layer_flops(HIDDEN, h, HEAD_DIM, f, 12) for h, f in widths)
        full_layers = sum(layer_flops(HIDDEN, HEADS, HEAD_DIM, FFN, 12) for _ in widths)
        assert full - slender == full_layers - layers
    # And the counter agrees with what really runs (eager attention: every matmul visible; the default speed runs no
    # intermediate exit head).
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        pyramid(input_ids=ids)
    measured = counter.get_total_flops()
    assert abs(slender - measured) <= 0.05 * measured, (family, slender, measured)


@pytest.mark.slow
def test_slender_models_load_through_trust_remote_code(tmp_path):
    """Every family, pruned, loads through `trust_remote_code=True` in a process that cannot import hf_magicpyramid,
    with the same outputs."""
    from test_foundation import REMOTE_CHILD

    input_ids, attention_mask = padded_batch()
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "inputs.pt")
    jobs, expected = [], {}
    for family in FAMILIES:
        _, pyramid = stock_and_pyramid(family, exit_layers=[1, 2, 4])
        pyramid.slim(*keep_plan(family))
        pyramid.factorize_embeddings(6)  # the SVD embeddings travel too
        pyramid.save_pretrained(tmp_path / family)
        expected[family] = (pyramid.config.to_dict(), run(pyramid, input_ids, attention_mask))
        jobs.append({"dir": str(tmp_path / family), "out": str(tmp_path / f"{family}.pt")})
    (tmp_path / "child.py").write_text(REMOTE_CHILD)
    (tmp_path / "cwd").mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), json.dumps(jobs), str(tmp_path / "inputs.pt")],
        cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "PACKAGE-ABSENT" in result.stdout and f"DONE {len(FAMILIES)}" in result.stdout, result.stdout
    for family in FAMILIES:
        remote = torch.load(tmp_path / f"{family}.pt")
        config, outputs = expected[family]
        assert remote["module"].startswith("transformers_modules."), remote["module"]
        for name in ("heads_per_layer", "ffn_per_layer", "embedding_rank"):
            assert remote["config"].get(name) == config.get(name), (family, name)
        for mine, theirs in zip(remote["exit_logits"], outputs.exit_logits, strict=True):
            assert_close(mine, theirs, atol=1e-6, what=f"{family} remote exit logits")


# ---------------------------------------------------------------------------------------------------------------------
# 3. Distillation losses, on hand-built tensors
# ---------------------------------------------------------------------------------------------------------------------

from hf_magicpyramid.slenderize import (  # noqa: E402
    DistillationWeights,
    distillation_loss,
    forward_all,
    hidden_mse,
    importance_scores,
    select_kept,
    width_schedule,
)


def test_soft_cross_entropy_terms_by_hand():
    student = [torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])]
    teacher = torch.tensor([[0.0, 2.0 * torch.log(torch.tensor(3.0))]])  # at T=2: teacher probs (1/4, 3/4)
    weights = DistillationWeights(final=1.0, exits=0.0, hidden=0.0, hard=0.0, temperature=2.0)
    total, terms = distillation_loss(student, teacher, weights)
    # final: student at T=2 is softmax(1, 0); CE = -(1/4 log p0 + 3/4 log p1), times T² = 4.
    p = torch.softmax(torch.tensor([1.0, 0.0]), dim=0)
    expected = -(0.25 * p[0].log() + 0.75 * p[1].log()) * 4
    assert torch.allclose(terms["final"], expected) and torch.allclose(total, expected)
    # exits: without an assistant the intermediate exit learns from the teacher: uniform student -> CE = log 2, x T².
    weights = DistillationWeights(final=0.0, exits=1.0, hidden=0.0, hard=0.0, temperature=2.0)
    _, terms = distillation_loss(student, teacher, weights)
    assert torch.allclose(terms["exits"], torch.log(torch.tensor(2.0)) * 4)
    # With an assistant, exit i learns from the assistant's exit i: a one-hot-ish assistant exit.
    assistant = [torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    weights = DistillationWeights(final=0.0, exits=1.0, hidden=0.0, hard=0.0, temperature=1.0)
    _, terms = distillation_loss(student, teacher, weights, assistant_logits=assistant)
    assert torch.allclose(terms["exits"], torch.log(torch.tensor(2.0)), atol=1e-6)


def test_hidden_mse_counts_real_tokens_only():
    student = torch.zeros(2, 3, 4)
    teacher = torch.zeros(2, 3, 4)
    teacher[0, 0] = 2.0  # real token: squared error 4 on each of 4 dims
    teacher[1, 2] = 100.0  # padding: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # 5 real tokens x 4 dims; total squared error 16.
    assert torch.allclose(hidden_mse(student, teacher, mask), torch.tensor(16.0 / 20))
    weights = DistillationWeights(final=0.0, exits=0.0, hidden=2.0, hard=0.0)
    logits = [torch.zeros(2, 2)]
    total, terms = distillation_loss(logits, torch.zeros(2, 2), weights, student_hidden=[student, student],
                                     teacher_hidden=[teacher, torch.zeros(2, 3, 4)], attention_mask=mask)
    assert torch.allclose(terms["hidden"], torch.tensor(0.4)) and torch.allclose(total, torch.tensor(0.8))


def test_hard_label_term_and_weights():
    logits = [torch.tensor([[0.0, 0.0]]), torch.tensor([[10.0, 0.0]])]
    labels = torch.tensor([0])
    weights = DistillationWeights(final=0.5, exits=0.0, hidden=0.0, hard=3.0)
    total, terms = distillation_loss(logits, torch.tensor([[10.0, 0.0]]), weights, labels=labels)
    hard = (torch.log(torch.tensor(2.0)) + torch.nn.functional.cross_entropy(logits[1], labels)) / 2
    assert torch.allclose(terms["hard"], hard)
    assert torch.allclose(total, 0.5 * terms["final"] + 3.0 * hard)
    with pytest.raises(ValueError, match=r"distillation weight hidden=-1 is out of range"):
        DistillationWeights(hidden=-1)
    with pytest.raises(ValueError, match="every distillation term is off"):
        distillation_loss(logits, logits[1], DistillationWeights(final=0, exits=0, hidden=0, hard=0))


# ---------------------------------------------------------------------------------------------------------------------
# 2. Importance, and the schedule
# ---------------------------------------------------------------------------------------------------------------------


def test_forward_all_matches_the_model():
    _, pyramid = stock_and_pyramid("bert")
    input_ids, attention_mask = padded_batch()
    logits, hidden, mask = forward_all(pyramid, input_ids, attention_mask)
    reference = run(pyramid, input_ids, attention_mask)
    assert len(hidden) == LAYERS and torch.equal(mask, attention_mask)
    for mine, theirs in zip(logits, reference.exit_logits, strict=True):
        assert torch.equal(mine, theirs)


def _batches(n=3, seed=0):
    return [dict(zip(("input_ids", "attention_mask"), padded_batch(seed=seed + i))) for i in range(n)]


def test_taylor_scores_by_hand_on_one_head():
    """A head's Taylor score is |Σ g ⊙ W| over its q/k/v rows (and biases) and its output columns, gradients summed
    over the batches: recomputed here from autograd on the stock parameter names."""
    teacher_stock, teacher = stock_and_pyramid("bert", exit_layers=[2, 4])
    torch.manual_seed(1)
    _, student = stock_and_pyramid("bert", exit_layers=[2, 4])
    batches = _batches()
    heads, ffn = importance_scores(student, batches, teacher, method="taylor", num_batches=2)
    assert [h.shape[0] for h in heads] == [HEADS] * LAYERS and [f.shape[0] for f in ffn] == [FFN] * LAYERS
    # By hand: the same loss, gradients by autograd, layer 2 head 1 and neuron 5.
    student.zero_grad()
    for batch in batches[:2]:
        with torch.no_grad():
            target = forward_all(teacher, **batch)[0][-1]
        logits = forward_all(student, **batch)[0]
        loss = sum(torch.nn.functional.cross_entropy(l, torch.softmax(target, -1)) for l in logits)
        loss.backward()
    named = dict(student.named_parameters())
    prefix = "backbone.bert.encoder.layer.1."
    rows = slice(HEAD_DIM, 2 * HEAD_DIM)
    total = 0.0
    for name in ("query", "key", "value"):
        w, b = named[f"{prefix}attention.self.{name}.weight"], named[f"{prefix}attention.self.{name}.bias"]
        total += (w.grad[rows] * w[rows]).sum() + (b.grad[rows] * b[rows]).sum()
    out = named[f"{prefix}attention.output.dense.weight"]
    total += (out.grad[:, rows] * out[:, rows]).sum()
    assert torch.allclose(heads[1][1], total.abs().detach(), rtol=1e-4, atol=1e-9)
    ffn_in, ffn_bias = named[f"{prefix}intermediate.dense.weight"], named[f"{prefix}intermediate.dense.bias"]
    ffn_out = named[f"{prefix}output.dense.weight"]
    neuron = (ffn_in.grad[5] * ffn_in[5]).sum() + ffn_bias.grad[5] * ffn_bias[5] + (ffn_out.grad[:, 5] * ffn_out[:, 5]).sum()
    assert torch.allclose(ffn[1][5], neuron.abs().detach(), rtol=1e-4, atol=1e-9)
    # Final-exit-only differs from all exits; magnitude needs no data and is the L1 norm of the unit's weights.
    student.zero_grad(set_to_none=True)
    final_only, _ = importance_scores(student, batches, teacher, method="taylor_final", num_batches=2)
    assert not torch.allclose(final_only[0], heads[0])
    magnitude, _ = importance_scores(student, [], method="magnitude")
    expected = sum(named[f"{prefix}attention.self.{n}.weight"][rows].abs().sum() + named[f"{prefix}attention.self.{n}.bias"][rows].abs().sum()
                   for n in ("query", "key", "value")) + out[:, rows].abs().sum()
    assert torch.allclose(magnitude[1][1], expected.detach())
    # Scoring leaves no gradients behind and the training mode as it was.
    assert all(p.grad is None for p in student.parameters()) and not student.training


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_runs_on_every_family_and_albert_shares(family):
    _, teacher = stock_and_pyramid(family)
    _, student = stock_and_pyramid(family)
    heads, ffn = importance_scores(student, _batches(1), teacher, num_batches=1)
    assert all(torch.isfinite(h).all() and h.shape == (HEADS,) for h in heads)
    assert all(torch.isfinite(f).all() and f.shape == (FFN,) for f in ffn)
    if family == "albert":  # layers 1-2 share a group: the same scores
        assert torch.equal(heads[0], heads[1]) and torch.equal(ffn[2], ffn[3])
    groups = student.driver.layer_groups(student.config.backbone_config)
    widths = [2, 2, 1, 1] if family != "albert" else [2, 2, 1, 1]
    student.slim(select_kept(heads, widths, groups), select_kept(ffn, [10, 10, 5, 5], groups))
    assert student.config.heads_per_layer == widths


def test_select_kept_and_schedule():
    scores = [torch.tensor([0.1, 0.9, 0.5, 0.9]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    assert select_kept(scores, [2, 4]) == [[1, 3], None]
    assert select_kept(scores, [0, 1]) == [[1], [3]]  # at least one stays
    assert width_schedule([12, 12], [4, 6], 2) == [[8, 9], [4, 6]]
    assert width_schedule([1536], [384], 2) == [[960], [384]]
    with pytest.raises(ValueError, match="steps=0 is out of range"):
        width_schedule([12], [4], 0)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Steps, resumable; 5. the command
# ---------------------------------------------------------------------------------------------------------------------


def _tiny_teacher_and_data(tmp_path):
    import datasets

    from tiny import word_tokenizer

    folder = tmp_path / "teacher"
    tokenizer = word_tokenizer(folder)
    stock = tiny_stock("bert", num_labels=2, initializer_range=0.2)
    stock.config.id2label, stock.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    stock.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 94, (6,), generator=generator)) for _ in range(48)]
    labels = ["pos" if "w1" in t or "w2" in t else "neg" for t in texts]
    data = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return folder, tokenizer, data


def test_slenderize_in_steps_resumes_and_saves_a_pyramid(tmp_path):
    from hf_magicpyramid.slenderize import SUMMARY_FILE, slenderize

    teacher, _, data = _tiny_teacher_and_data(tmp_path)
    out = tmp_path / "slender"
    options = dict(heads=[2, 2, 1, 1], ffn=9, steps=2, importance_batches=2, epochs_per_step=1.0, batch_size=16,
                   max_length=16, disable_tqdm=True, log=lambda *_: None)
    summary = slenderize(str(teacher), data, data, out, **options)
    assert [s["heads_per_layer"] for s in summary["steps"]] == [[3, 3, 2, 2], [2, 2, 1, 1]]
    assert [s["ffn_per_layer"] for s in summary["steps"]] == [[23] * 4, [9] * 4]
    assert summary["parameters"] < summary["teacher_parameters"]
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    assert json.loads((out / SUMMARY_FILE).read_text())["heads_per_layer"] == [2, 2, 1, 1]
    for step in (1, 2):
        assert (out / f"step{step}" / "step.json").is_file() and not (out / f"step{step}" / "checkpoints").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert isinstance(model, MagicPyramidForSequenceClassification)
    assert model.layer_widths() == [(2, 9), (2, 9), (1, 9), (1, 9)] and model.config.exits_trained
    # A Magic Pyramid model still: exits and the speed knob work.
    input_ids, attention_mask = padded_batch(vocab=99)
    with torch.no_grad():
        fast = model(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=1.0)
    assert fast.exit_layer.tolist() == [1, 1, 1, 1]
    # Rerun: every step is complete, nothing retrains; the same result.
    (out / "step2" / "step.json").unlink()  # as if step 2 was interrupted after step 1
    again = slenderize(str(teacher), data, data, out, **options)
    assert again["steps"][0]["seconds"] == summary["steps"][0]["seconds"]  # step 1 read back, not rerun
    assert again["heads_per_layer"] == [2, 2, 1, 1]
    # Another target into the same folder is refused, naming what changed.
    with pytest.raises(ValueError, match=r"holds another slenderize run \(ffn was \[9, 9, 9, 9\], is \[10, 10, 10, 10\]\)"):
        slenderize(str(teacher), data, data, out, **dict(options, ffn=10))


def test_slenderize_refuses_bad_targets(tmp_path):
    from hf_magicpyramid.slenderize import slenderize

    teacher, _, data = _tiny_teacher_and_data(tmp_path)
    with pytest.raises(ValueError, match=r"--heads 5 \(layer 1\) is out of range: widths are integers in \[1, 4\]"):
        slenderize(str(teacher), data, None, tmp_path / "x", heads=5, ffn=9)
    with pytest.raises(ValueError, match=r"--ffn has 3 entries"):
        slenderize(str(teacher), data, None, tmp_path / "x", heads=2, ffn=[9, 9, 9])


# ---------------------------------------------------------------------------------------------------------------------
# 7. A small real run: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, slenderized
# ---------------------------------------------------------------------------------------------------------------------

def _fine_tuned_minilm(folder, train, max_length: int) -> str:
    """all-MiniLM-L6-v2 fine-tuned as a plain classifier on `train` (two epochs, plain AdamW loop), saved to `folder`:
    the teacher a user would bring to `slenderize`."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_magicpyramid.training import default_backbone

    backbone = default_backbone()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone, num_labels=2, id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1})
    encoded = tokenizer(list(train["text"]), truncation=True, max_length=max_length)
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], train["label"], strict=True)]
    collate = DataCollatorWithPadding(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(2):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(rows), 32):
            loss = model(**collate([rows[i] for i in order[start:start + 32]])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_real_minilm_slenderized_keeps_its_accuracy(tmp_path):
    """all-MiniLM-L6-v2 fine-tuned on 640 Rotten Tomatoes snippets (fresh vs rotten), cut from 12 to 8 heads and from
    1536 to 1024 FFN neurons per layer by Taylor importance and one short distillation: still clearly above the
    majority class on 200 validation snippets, and close to its teacher. A wrong cut (e.g. keeping the least important
    units, or indices that do not match the weights) lands at the majority class."""
    from hf_magicpyramid.data import load_dataset_by_name
    from hf_magicpyramid.slenderize import slenderize

    torch.manual_seed(0)
    splits = load_dataset_by_name("rotten_tomatoes")
    train = splits["train"].shuffle(seed=1).select(range(640))
    validation = splits["validation"].shuffle(seed=1).select(range(200))
    teacher = _fine_tuned_minilm(tmp_path / "teacher", train, max_length=24)
    summary = slenderize(
        teacher, train.select(range(160)), validation, tmp_path / "slender", heads=8, ffn=1024, steps=1,
        importance_batches=2, epochs_per_step=1.0, batch_size=32, max_length=24, learning_rate=5e-5, disable_tqdm=True,
        log=lambda *_: None,
    )
    assert summary["heads_per_layer"] == [8] * 6 and summary["ffn_per_layer"] == [1024] * 6
    assert summary["parameters"] < 0.85 * summary["teacher_parameters"]
    majority = max(sum(validation["label"]), len(validation) - sum(validation["label"])) / len(validation)
    assert summary["teacher_eval_accuracy"] >= majority + 0.08, summary
    assert summary["eval_accuracy"] >= max(majority + 0.05, summary["teacher_eval_accuracy"] - 0.12), summary


# ---------------------------------------------------------------------------------------------------------------------
# 6. Embedding factorisation (truncated SVD)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_factorisation_full_rank_is_exact_and_round_trips(family, tmp_path):
    _, pyramid = stock_and_pyramid(family)
    input_ids, attention_mask = padded_batch()
    expected = run(pyramid, input_ids, attention_mask)
    table = pyramid.get_input_embeddings().weight.detach().clone()
    full_rank = pyramid.config.embedding_size
    parameters = sum(p.numel() for p in pyramid.parameters())
    pyramid.factorize_embeddings(full_rank)
    out = run(pyramid, input_ids, attention_mask)
    for mine, theirs in zip(out.exit_logits, expected.exit_logits, strict=True):
        assert_close(mine, theirs, atol=1e-4, what=f"{family} full-rank factorisation")
    # A lower rank: the table is the truncated SVD of the stock one, and the parameter count follows the shapes.
    pyramid.factorize_embeddings(4)
    left, singular, right = torch.linalg.svd(table, full_matrices=False)
    assert_close(pyramid.get_input_embeddings().weight, (left[:, :4] * singular[:4]) @ right[:4], atol=1e-4, what="rank-4 table")
    vocab = table.shape[0]
    assert sum(p.numel() for p in pyramid.parameters()) == parameters - vocab * full_rank + vocab * 4 + 4 * full_rank
    # FLOPs count the new projection: 2 · tokens · rank · embedding size more than the stock embeddings.
    ones = torch.ones(1, 10, dtype=torch.long)
    stock_flops = int(full_model_flops(stock_and_pyramid(family)[1], ones)[0])
    assert int(full_model_flops(pyramid, ones)[0]) == stock_flops + 2 * 10 * 4 * full_rank
    pyramid.slim(*keep_plan(family))
    pyramid.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["embedding_rank"] == 4
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    for key, value in pyramid.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for mine, theirs in zip(run(loaded, input_ids, attention_mask).exit_logits, run(pyramid, input_ids, attention_mask).exit_logits):
        assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match=rf"embedding rank 0 is invalid: it must be an integer in \[1, {full_rank}\]"):
        pyramid.factorize_embeddings(0)


def test_slenderize_command(tmp_path, capsys):
    from hf_magicpyramid.cli import main
    from hf_magicpyramid.slenderize import SUMMARY_FILE

    teacher, _, data = _tiny_teacher_and_data(tmp_path)
    data.to_csv(str(tmp_path / "train.csv"), index=False)
    data.select(range(16)).to_csv(str(tmp_path / "dev.csv"), index=False)
    out = tmp_path / "out"
    code = main([
        "slenderize", "--teacher", str(teacher), "--train-file", str(tmp_path / "train.csv"), "--validation-file",
        str(tmp_path / "dev.csv"), "--heads", "2", "--ffn", "9", "--embedding-rank", "8", "--steps", "1",
        "--importance-batches", "1", "--max-length", "16", "--batch-size", "16", "--output-dir", str(out), "--disable-tqdm", "true",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert '"embedding_rank": 8' in printed and '"heads_per_layer"' in printed
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["heads_per_layer"] == [2] * 4 and summary["ffn_per_layer"] == [9] * 4 and summary["embedding_rank"] == 8
    assert summary["steps"][0]["eval_accuracy"] is not None and summary["parameters"] < summary["teacher_parameters"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.embedding_rank == 8 and model.layer_widths() == [(2, 9)] * 4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ffn", "9"], None),  # heads alone or ffn alone is fine (checked below only for parsing)
        ([], "no target widths: pass --heads H"),
        (["--heads", "0"], r"heads=0 is out of range"),
        (["--heads", "2", "--steps", "0"], r"steps=0 is out of range"),
        (["--heads", "2", "--importance", "random"], r"invalid choice: 'random'"),
    ],
)
def test_slenderize_command_refuses_bad_flags(flags, message, capsys):
    from hf_magicpyramid.cli import parse_arguments

    argv = ["--teacher", "t", "--dataset", "rotten_tomatoes", "--output_dir", "o", *flags]
    if message is None:
        run, _ = parse_arguments("slenderize", argv)
        assert run.ffn == [9] and run.heads == []
        return
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments("slenderize", argv)
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
