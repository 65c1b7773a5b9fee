"""Foundation tests: with exits and pruning off, a Magic Pyramid model is the stock model, for all nine families.

- parity of logits, losses and hidden states with the stock models (eager and sdpa, padded batches);
- save → load (config JSON, safetensors, auto_map, and `trust_remote_code=True` without the package installed);
- non-persistent buffers after loading (the meta-device init trap);
- slender (per-layer width) models;
- bad input fails with a message naming the bad value and what is allowed;
- Auto-class registration and the `pipeline`;
- one real checkpoint (all-MiniLM-L6-v2).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DebertaConfig,
    GPT2Config,
)

import hf_magicpyramid
from hf_magicpyramid import (
    SUPPORTED_BACKBONES,
    MagicPyramidConfig,
    MagicPyramidForSequenceClassification,
    MagicPyramidModel,
)
from tiny import FAMILIES, SDPA_FAMILIES, padded_batch, tiny_config, tiny_stock

ATOL = 1e-5
EAGER_AND_SDPA = [(family, "eager") for family in FAMILIES] + [(family, "sdpa") for family in SDPA_FAMILIES]
SLIM_HEADS = [4, 2, 1, 3]
SLIM_FFN = [37, 20, 8, 30]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


def config_fields(config) -> dict:
    """`config.to_dict()` without `_name_or_path`, which records where a loaded config came from."""
    return {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}


def masked_max_diff(hidden_a: torch.Tensor, hidden_b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Largest difference over real (mask 1) positions of two (batch, seq_len, hidden) tensors."""
    return ((hidden_a - hidden_b).abs() * attention_mask[..., None]).max().item()


@torch.no_grad()
def classify(model, input_ids, attention_mask, **kwargs):
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def converted(stock_path, **kwargs) -> MagicPyramidForSequenceClassification:
    return MagicPyramidForSequenceClassification.from_backbone(stock_path, **kwargs).eval()


# ---------------------------------------------------------------------------------------------------------------------
# 1. Parity with the stock classifier
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,attn", EAGER_AND_SDPA)
def test_fine_tuned_classifier_parity(stock_dir, family, attn):
    path = stock_dir(family)
    stock = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=attn).eval()
    model = converted(path, attn_implementation=attn)
    assert model.config.backbone_type == family
    assert model.backbone.config._attn_implementation == attn
    input_ids, attention_mask = padded_batch()
    expected = classify(stock, input_ids, attention_mask).logits
    out = classify(model, input_ids, attention_mask)
    assert_close(out.logits, expected, what=f"{family}/{attn} logits")
    # Exits and pruning are off by default: every sample runs every layer on every real token.
    assert out.exit_layer.tolist() == [4] * 4
    assert out.kept_tokens.tolist() == [[int(n)] * 4 for n in attention_mask.sum(dim=1)]
    # The default converted model has an exit after every layer; forcing every exit must not change the final logits.
    all_exits = classify(model, input_ids, attention_mask, output_all_exits=True)
    assert len(all_exits.exit_logits) == 4
    assert_close(all_exits.exit_logits[-1], expected, what=f"{family}/{attn} final exit")


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_model_instance_converts(family):
    stock = tiny_stock(family)
    model = MagicPyramidForSequenceClassification.from_backbone(stock).eval()
    input_ids, attention_mask = padded_batch()
    assert_close(classify(model, input_ids, attention_mask).logits, classify(stock, input_ids, attention_mask).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_encoder_conversion_shapes(encoder_dir, family):
    model = converted(encoder_dir(family), num_labels=5, exit_layers=[2, 4])
    assert model.config.num_labels == 5
    assert model.exit_layers == [2, 4]
    input_ids, attention_mask = padded_batch()
    out = classify(model, input_ids, attention_mask, output_all_exits=True)
    assert out.logits.shape == (4, 5)
    assert [tuple(logits.shape) for logits in out.exit_logits] == [(4, 5), (4, 5)]
    assert torch.isfinite(out.logits).all()


def _bare_encoder_pair(path, seed: int, **label_kwargs):
    """The stock classifier and our conversion from a bare encoder; both draw the new head from the same seed."""
    torch.manual_seed(seed)
    stock = AutoModelForSequenceClassification.from_pretrained(path, **label_kwargs).eval()
    torch.manual_seed(seed)
    model = converted(path, exit_layers=[4], **label_kwargs)
    return stock, model


@pytest.mark.parametrize("family", FAMILIES)
def test_regression_head_logits_and_loss(encoder_dir, family):
    stock, model = _bare_encoder_pair(encoder_dir(family), seed=1, num_labels=1)
    input_ids, attention_mask = padded_batch()
    labels = torch.tensor([0.5, -1.0, 2.0, 0.25])
    expected = classify(stock, input_ids, attention_mask, labels=labels)
    out = classify(model, input_ids, attention_mask, labels=labels, output_all_exits=True)
    assert out.logits.shape == (4, 1)
    # deberta-v2's stock head flattens regression logits to (batch,) when labels are given.
    assert_close(out.logits.reshape(-1), expected.logits.reshape(-1), what="regression logits")
    assert_close(out.loss, expected.loss, what="regression loss (MSE)")


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_label_head_logits_and_loss(encoder_dir, family):
    stock, model = _bare_encoder_pair(encoder_dir(family), seed=2, num_labels=3, problem_type="multi_label_classification")
    assert model.config.problem_type == "multi_label_classification"
    input_ids, attention_mask = padded_batch()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    expected = classify(stock, input_ids, attention_mask, labels=labels)
    out = classify(model, input_ids, attention_mask, labels=labels, output_all_exits=True)
    assert_close(out.logits, expected.logits, what="multi-label logits")
    assert_close(out.loss, expected.loss, what="multi-label loss (BCE)")


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "modernbert"])
def test_single_label_loss_in_train_mode_equals_stock(stock_dir, family):
    """In train mode (dropout off via config) the loss comes without output_all_exits; final-exit-only = stock loss."""
    path = stock_dir(family)
    no_dropout = {"bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                  "deberta-v2": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0),
                  "modernbert": dict(embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)}[family]
    stock = AutoModelForSequenceClassification.from_pretrained(path, **no_dropout).train()
    model = MagicPyramidForSequenceClassification.from_backbone(stock, exit_layers=[4]).train()
    input_ids, attention_mask = padded_batch()
    labels = torch.tensor([0, 2, 1, 1])
    expected = stock(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert_close(out.loss, expected.loss, what="cross-entropy loss")
    # And the gradients agree: the loop drives the stock modules, so training updates the same weights the same way.
    expected.loss.backward()
    out.loss.backward()
    stock_grad = stock.get_input_embeddings().weight.grad
    our_grad = model.get_input_embeddings().weight.grad
    assert_close(our_grad, stock_grad, atol=1e-6, what="embedding gradient")


# ---------------------------------------------------------------------------------------------------------------------
# 2. The bare encoder (AutoModel)
# ---------------------------------------------------------------------------------------------------------------------


def _pyramid_encoder(base: torch.nn.Module) -> MagicPyramidModel:
    """A MagicPyramidModel holding the weights of a stock base model."""
    model = AutoModel.from_config(MagicPyramidConfig(backbone_config=copy.deepcopy(base.config)))
    assert isinstance(model, MagicPyramidModel)
    model.backbone.load_state_dict(base.state_dict())
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_last_hidden_state_parity(encoder_dir, family, tmp_path):
    base = AutoModel.from_pretrained(encoder_dir(family)).eval()
    model = _pyramid_encoder(base)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    assert out.last_hidden_state.shape == expected.shape
    assert masked_max_diff(out.last_hidden_state, expected, attention_mask) <= ATOL
    assert torch.equal(out.attention_mask, attention_mask)
    assert torch.equal(out.token_positions, torch.arange(12).expand(4, 12))

    # A saved MagicPyramidModel reloads through AutoModel with the same outputs.
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, MagicPyramidModel)
    with torch.no_grad():
        again = reloaded(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert masked_max_diff(again, expected, attention_mask) <= ATOL


@pytest.mark.parametrize("family", ["bert"])
def test_automodel_from_saved_classifier_keeps_encoder_weights(stock_dir, family, tmp_path):
    path = stock_dir(family)
    converted(path).save_pretrained(tmp_path)
    encoder = AutoModel.from_pretrained(tmp_path).eval()  # auto_map / registration: MagicPyramidModel
    assert isinstance(encoder, MagicPyramidModel)
    base = AutoModel.from_pretrained(path).eval()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert masked_max_diff(out, expected, attention_mask) <= ATOL


def test_config_does_not_mutate_the_given_backbone_config():
    stock = tiny_stock("bert", attn_implementation="sdpa")
    input_ids, attention_mask = padded_batch()
    before = classify(stock, input_ids, attention_mask).logits
    config = MagicPyramidConfig(backbone_config=stock.config)
    assert config.backbone_config.model_type == "bert"
    assert stock.config._attn_implementation == "sdpa"
    assert_close(classify(stock, input_ids, attention_mask).logits, before)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Save → load
# ---------------------------------------------------------------------------------------------------------------------

NON_DEFAULT_FIELDS = dict(
    exit_layers=[1, 3],
    exit_pooling="mean",
    exit_criterion="confidence",
    exit_threshold=0.8,
    token_pruning="topk",
    keep_ratios=[1.0, 0.8, 0.6, 0.5],
    keep_ratio_scale=1.5,
    min_kept_tokens=2,
    heads_per_layer=SLIM_HEADS,
    ffn_per_layer=SLIM_FFN,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_dict_round_trip(family):
    config = MagicPyramidConfig(backbone_config=tiny_config(family), exit_layers=[2], exit_threshold=0.3)
    as_dict = config.to_dict()
    assert as_dict["backbone_config"]["model_type"] == family
    assert MagicPyramidConfig.from_dict(as_dict).to_dict() == as_dict
    assert json.loads(config.to_json_string()) == json.loads(MagicPyramidConfig.from_dict(as_dict).to_json_string())


def test_config_save_pretrained_round_trip(tmp_path):
    config = MagicPyramidConfig(backbone_config=tiny_config("bert"), id2label={0: "a", 1: "b"}, **NON_DEFAULT_FIELDS)
    config.save_pretrained(tmp_path)
    for loaded in (MagicPyramidConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, MagicPyramidConfig)
        assert config_fields(loaded) == config_fields(config)
        for name, value in NON_DEFAULT_FIELDS.items():
            assert getattr(loaded, name) == value, name
        assert loaded.num_labels == 2 and loaded.id2label == {0: "a", 1: "b"}
        assert loaded.backbone_config.model_type == "bert"
        assert loaded.resolved_exit_layers() == [1, 3, 4]


@pytest.mark.parametrize("family", FAMILIES)
def test_model_save_load_identical(stock_dir, family, tmp_path):
    model = converted(stock_dir(family), exit_layers=[2, 4])
    model.save_pretrained(tmp_path)

    files = {path.name for path in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files), files
    # The custom code travels with the checkpoint: the modeling/config files and their same-folder imports.
    assert {"configuration_magic_pyramid.py", "modeling_magic_pyramid.py", "adapters.py", "exits.py", "pruning.py"} <= files
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["model_type"] == "magic_pyramid"
    assert saved_config["auto_map"] == {
        "AutoConfig": "configuration_magic_pyramid.MagicPyramidConfig",
        "AutoModel": "modeling_magic_pyramid.MagicPyramidModel",
        "AutoModelForSequenceClassification": "modeling_magic_pyramid.MagicPyramidForSequenceClassification",
    }

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MagicPyramidConfig)
    assert config_fields(config) == config_fields(model.config)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is MagicPyramidForSequenceClassification
    expected_state = model.state_dict()
    loaded_state = loaded.state_dict()
    assert expected_state.keys() == loaded_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(loaded_state[key], value), key

    input_ids, attention_mask = padded_batch()
    expected = classify(model, input_ids, attention_mask, output_all_exits=True)
    out = classify(loaded, input_ids, attention_mask, output_all_exits=True)
    assert_close(out.logits, expected.logits, atol=0.0)
    for ours, theirs in zip(out.exit_logits, expected.exit_logits, strict=True):
        assert_close(ours, theirs, atol=0.0)


REMOTE_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_magicpyramid" or name.startswith("hf_magicpyramid."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockPackage())
    try:
        import hf_magicpyramid  # noqa: F401
    except ModuleNotFoundError:
        print("PACKAGE-ABSENT")
    else:
        print("PACKAGE-IMPORTED")

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    jobs = json.loads(sys.argv[1])
    inputs = torch.load(sys.argv[2])
    for job in jobs:
        config = AutoConfig.from_pretrained(job["dir"], trust_remote_code=True)
        model = AutoModelForSequenceClassification.from_pretrained(job["dir"], trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(**inputs, output_all_exits=True)
            fast = model(**inputs)
        torch.save(
            {
                "module": type(model).__module__,
                "config_module": type(config).__module__,
                "config": config.to_dict(),
                "exit_logits": out.exit_logits,
                "logits": fast.logits,
                "exit_layer": fast.exit_layer,
                "kept_tokens": fast.kept_tokens,
            },
            job["out"],
        )
    print("DONE", len(jobs))
    """
)


@pytest.mark.slow
def test_trust_remote_code_without_the_package(stock_dir, tmp_path):
    """All nine families load through `trust_remote_code=True` in a process that cannot import hf_magicpyramid."""
    input_ids, attention_mask = padded_batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    torch.save(inputs, tmp_path / "inputs.pt")
    jobs, expected = [], {}
    for family in FAMILIES:
        # Non-default exits, speed and pruning, so that the config's fields have to travel too.
        model = converted(
            stock_dir(family),
            exit_layers=[1, 2, 4],
            exit_threshold=0.9,
            token_pruning="topk",
            keep_ratios=[1.0, 0.75, 0.5, 0.5],
        )
        folder = tmp_path / family
        model.save_pretrained(folder)
        all_exits = classify(model, input_ids, attention_mask, output_all_exits=True)
        fast = classify(model, input_ids, attention_mask)
        expected[family] = (model.config.to_dict(), all_exits, fast)
        jobs.append({"dir": str(folder), "out": str(tmp_path / f"{family}.pt")})
    (tmp_path / "child.py").write_text(REMOTE_CHILD)

    outside = tmp_path / "cwd"
    outside.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), json.dumps(jobs), str(tmp_path / "inputs.pt")],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "PACKAGE-ABSENT" in result.stdout, result.stdout
    assert "PACKAGE-IMPORTED" not in result.stdout
    assert f"DONE {len(FAMILIES)}" in result.stdout

    for family in FAMILIES:
        remote = torch.load(tmp_path / f"{family}.pt")
        config_dict, all_exits, fast = expected[family]
        assert remote["module"].startswith("transformers_modules."), remote["module"]
        assert remote["config_module"].startswith("transformers_modules."), remote["config_module"]
        assert remote["config"]["backbone_config"] == config_dict["backbone_config"]
        for name in ("exit_layers", "exit_threshold", "token_pruning", "keep_ratios"):
            assert remote["config"][name] == config_dict[name], (family, name)
        for ours, theirs in zip(remote["exit_logits"], all_exits.exit_logits, strict=True):
            assert_close(ours, theirs, atol=1e-6, what=f"{family} exit logits")
        assert_close(remote["logits"], fast.logits, atol=1e-6, what=f"{family} logits")
        assert torch.equal(remote["exit_layer"], fast.exit_layer)
        assert torch.equal(remote["kept_tokens"], fast.kept_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Non-persistent buffers after loading (models are built on the meta device)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_buffers_after_from_pretrained(stock_dir, family, tmp_path):
    converted(stock_dir(family)).save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    reference = dict(tiny_stock(family).named_buffers())  # built eagerly on CPU: buffers hold their true values
    buffers = dict(loaded.backbone.named_buffers())
    assert buffers.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(buffers[name], value), f"{family}: buffer {name} differs after from_pretrained"
    for name, value in buffers.items():
        if name.endswith("position_ids"):
            assert torch.equal(value, torch.arange(64).unsqueeze(0)), name
        if name.endswith("token_type_ids"):
            assert torch.equal(value, torch.zeros(1, 64, dtype=torch.long)), name


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_buffers_after_from_pretrained(family, tmp_path):
    base = AutoModel.from_config(tiny_config(family))
    _pyramid_encoder(base).save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    embeddings = loaded.backbone.embeddings
    assert torch.equal(embeddings.position_ids, torch.arange(64).unsqueeze(0))
    assert torch.equal(embeddings.token_type_ids, torch.zeros(1, 64, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# 5. Slender models (per-layer widths)
# ---------------------------------------------------------------------------------------------------------------------


def _slender(family: str = "bert") -> MagicPyramidForSequenceClassification:
    torch.manual_seed(0)
    config = MagicPyramidConfig(backbone_config=tiny_config(family), heads_per_layer=SLIM_HEADS, ffn_per_layer=SLIM_FFN)
    return MagicPyramidForSequenceClassification(config).eval()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "albert"])
def test_slender_model_widths_and_round_trip(family, tmp_path):
    model = _slender(family)
    assert model.layer_widths() == list(zip(SLIM_HEADS, SLIM_FFN))
    full = MagicPyramidForSequenceClassification(MagicPyramidConfig(backbone_config=tiny_config(family)))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    input_ids, attention_mask = padded_batch()
    expected = classify(model, input_ids, attention_mask, output_all_exits=True)
    assert torch.isfinite(expected.logits).all()

    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.layer_widths() == list(zip(SLIM_HEADS, SLIM_FFN))
    out = classify(loaded, input_ids, attention_mask, output_all_exits=True)
    for ours, theirs in zip(out.exit_logits, expected.exit_logits, strict=True):
        assert_close(ours, theirs, atol=0.0)


@pytest.mark.parametrize("family", ["albert"])
def test_slender_unsupported_families_fail_clearly(family):
    # Layers that share weights (albert's groups: layers 1-2 here) cannot differ in width; refused when the config is
    # built, before any model exists. (mpnet is slimmable: each slim layer gets its own bias columns.)
    with pytest.raises(ValueError, match=rf"heads_per_layer=\[4, 2, 4, 4\] is not supported for {family}"):
        MagicPyramidConfig(backbone_config=tiny_config(family), heads_per_layer=[4, 2, 4, 4])
    # Full widths written out are fine: they change nothing.
    MagicPyramidConfig(backbone_config=tiny_config(family), heads_per_layer=[4, 4, 4, 4])


def _save_with_wrong_widths(tmp_path) -> Path:
    _slender().save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    saved["heads_per_layer"] = [4, 4, 4, 4]
    saved["ffn_per_layer"] = [37, 37, 37, 37]
    config_path.write_text(json.dumps(saved))
    return tmp_path


def test_width_mismatch_checkpoint_does_not_load_silently(tmp_path):
    path = _save_with_wrong_widths(tmp_path)
    with pytest.raises((RuntimeError, ValueError), match="(?i)mismatch"):
        AutoModelForSequenceClassification.from_pretrained(path)


def test_width_mismatch_checkpoint_error_names_the_widths(tmp_path):
    path = _save_with_wrong_widths(tmp_path)
    with pytest.raises((RuntimeError, ValueError), match=r"heads_per_layer|ffn_per_layer"):
        AutoModelForSequenceClassification.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Bad input fails with a message naming the bad value and what is allowed
# ---------------------------------------------------------------------------------------------------------------------

SUPPORTED_LIST = r"Supported backbones: albert, bert, deberta-v2, distilbert, electra, modernbert, mpnet, roberta, xlm-roberta"


def test_supported_backbones_constant():
    assert set(SUPPORTED_BACKBONES) == set(FAMILIES)


def test_unknown_family_in_config():
    with pytest.raises(ValueError, match=r"Unsupported backbone model_type 'gpt2'.*" + SUPPORTED_LIST):
        MagicPyramidConfig(backbone_config=GPT2Config(n_layer=2, n_embd=32, n_head=4))


def test_deberta_v1_named():
    with pytest.raises(ValueError, match=r"'deberta'.*DeBERTa v1 is not supported.*deberta-v2"):
        MagicPyramidConfig(backbone_config=DebertaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4))


def test_unknown_family_from_backbone(tmp_path):
    gpt2 = AutoModelForSequenceClassification.from_config(
        GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=99, pad_token_id=0)
    )
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2'.*" + SUPPORTED_LIST):
        MagicPyramidForSequenceClassification.from_backbone(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2'.*" + SUPPORTED_LIST):
        MagicPyramidForSequenceClassification.from_backbone(gpt2)


@pytest.mark.parametrize("layer", [0, 5, -1, 2.0, True])
def test_exit_layer_out_of_range(layer):
    with pytest.raises(ValueError, match=rf"exit_layers contains {layer!r}.*\[1, 4\].*4-layer bert"):
        MagicPyramidConfig(backbone_config=tiny_config("bert"), exit_layers=[1, layer])


def test_exit_layers_empty():
    with pytest.raises(ValueError, match=r"exit_layers=\[\] is empty.*\[1, 4\]"):
        MagicPyramidConfig(backbone_config=tiny_config("bert"), exit_layers=[])


def test_num_labels_mismatch_with_fine_tuned_classifier(stock_dir):
    path = stock_dir("bert")
    with pytest.raises(ValueError, match=r"num_labels=5 does not match.*3 labels.*num_labels=3"):
        MagicPyramidForSequenceClassification.from_backbone(path, num_labels=5)
    with pytest.raises(ValueError, match=r"num_labels=5 does not match the given classifier, which has 3 labels"):
        MagicPyramidForSequenceClassification.from_backbone(tiny_stock("bert"), num_labels=5)
    # The matching count is accepted and keeps the head.
    assert converted(path, num_labels=3).config.num_labels == 3


# (family, the longest input it takes with max_position_embeddings=64): RoBERTa-style positions start after padding_idx.
POSITION_LIMITS = [("bert", 64), ("electra", 64), ("distilbert", 64), ("albert", 64), ("roberta", 62), ("xlm-roberta", 62), ("mpnet", 62)]


@pytest.mark.parametrize("family,limit", POSITION_LIMITS)
def test_input_longer_than_positions(family, limit):
    stock = tiny_stock(family)
    model = MagicPyramidForSequenceClassification.from_backbone(stock).eval()
    ids = torch.randint(5, 99, (2, limit + 1), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=rf"Input length {limit + 1} exceeds the {limit} positions this {family} backbone"):
        classify(model, ids, torch.ones_like(ids))
    # Exactly at the limit it runs and still matches the stock model.
    at_limit = ids[:, :limit]
    mask = torch.ones_like(at_limit)
    assert_close(classify(model, at_limit, mask).logits, classify(stock, at_limit, mask).logits)


@pytest.mark.parametrize("family", ["deberta-v2", "modernbert"])
def test_families_without_position_limit_take_long_inputs(family):
    stock = tiny_stock(family)
    model = MagicPyramidForSequenceClassification.from_backbone(stock).eval()
    ids = torch.randint(5, 99, (2, 80), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    assert_close(classify(model, ids, mask).logits, classify(stock, ids, mask).logits)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("exit_criterion", "margin", r"exit_criterion='margin' is not supported; choose one of 'entropy', 'confidence', 'patience'"),
        ("exit_pooling", "max", r"exit_pooling='max' is not supported; choose one of 'cls', 'mean'"),
        ("exit_objective", "pabee", r"exit_objective='pabee' is not supported"),
        ("token_pruning", "random", r"token_pruning='random' is not supported; choose one of 'none', 'topk', 'threshold'"),
        ("token_importance", "norm", r"token_importance='norm' is not supported"),
        ("exit_threshold", 1.5, r"exit_threshold=1.5 is out of range: it must be a number in \[0.0, 1.0\]"),
        ("exit_threshold", -0.1, r"exit_threshold=-0.1 is out of range: it must be a number in \[0.0, 1.0\]"),
        ("exit_threshold", float("nan"), r"exit_threshold=nan is out of range"),
        ("keep_ratios", [1.0, 0.5, 0.8, 0.4], r"keep_ratios must not increase.*keep_ratios\[2\]=0.8 > keep_ratios\[1\]=0.5"),
        ("keep_ratios", [1.0, 0.5], r"keep_ratios has 2 entries; it needs one per layer \(4\)"),
        ("keep_ratios", [0.9, 0.8, 0.7, 0.6], r"keep_ratios\[0\]=0.9.*must be 1.0"),
        ("keep_ratios", [1.0, 0.5, 0.0, 0.0], r"keep_ratios\[2\]=0.0 is out of range"),
        ("prune_thresholds", [0.1, 0.1, 0.1, 0.1], r"prune_thresholds\[0\]=0.1.*must be 0"),
        ("heads_per_layer", [4, 5, 4, 4], r"heads_per_layer\[1\]=5 \(layer 2\) is invalid: widths are integers in \[1, 4\]"),
        ("heads_per_layer", [4, 0, 4, 4], r"heads_per_layer\[1\]=0 \(layer 2\) is invalid: widths are integers in \[1, 4\]"),
        ("heads_per_layer", [4, 4], r"heads_per_layer has 2 entries; it needs one per layer \(4\)"),
        ("ffn_per_layer", [37, 38, 37, 37], r"ffn_per_layer\[1\]=38 \(layer 2\) is invalid: widths are integers in \[1, 37\]"),
        ("min_kept_tokens", 0, r"min_kept_tokens=0 is invalid: it must be an integer >= 1"),
        ("keep_ratio_scale", -0.5, r"keep_ratio_scale=-0.5 is out of range: it must be a number in \[0, 10\] \(0 turns pruning off\)"),
        ("patience", 2, r"patience=2 is only used by exit_criterion='patience', but exit_criterion='entropy'"),
    ],
)
def test_invalid_config_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        MagicPyramidConfig(backbone_config=tiny_config("bert"), **{field: value})


def test_invalid_values_also_fail_when_loading_a_config(tmp_path):
    MagicPyramidConfig(backbone_config=tiny_config("bert")).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["exit_criterion"] = "margin"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"exit_criterion='margin' is not supported"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(exit_threshold=1.5), r"exit_threshold=1.5 is out of range: it must be a number in \[0.0, 1.0\]"),
        (dict(exit_threshold=-0.1), r"exit_threshold=-0.1 is out of range"),
        (dict(exit_threshold="high"), r"exit_threshold='high' is out of range"),
        (dict(patience=3), r"patience=3 is only used by exit_criterion='patience', but exit_criterion='entropy'"),
        (dict(keep_ratio_scale=-1), r"keep_ratio_scale=-1 is out of range: it must be a number in \[0, 10\]"),
        (dict(keep_ratio_scale=11), r"keep_ratio_scale=11 is out of range"),
        (dict(prune_threshold_offset=2), r"prune_threshold_offset=2 is out of range: it must be a number in \[-1.0, 1.0\]"),
    ],
)
def test_set_speed_rejects_bad_values_and_keeps_the_config(kwargs, message):
    model = _tiny_classifier()
    with pytest.raises(ValueError, match=message):
        model.set_speed(**kwargs)
    assert model.config.exit_threshold is None
    assert model.config.patience is None
    assert model.config.keep_ratio_scale == 1.0
    assert model.config.prune_threshold_offset == 0.0
    # A good value is accepted and stored in the config (so it saves).
    assert model.set_speed(exit_threshold=0.3, keep_ratio_scale=2.0) is model
    assert (model.config.exit_threshold, model.config.keep_ratio_scale) == (0.3, 2.0)


def test_set_speed_patience_criterion():
    model = _tiny_classifier(exit_criterion="patience")
    with pytest.raises(ValueError, match=r"patience=0 is invalid: it must be an integer >= 1"):
        model.set_speed(patience=0)
    with pytest.raises(ValueError, match=r"exit_threshold=0.5 has no meaning for exit_criterion='patience'"):
        model.set_speed(exit_threshold=0.5)
    model.set_speed(patience=2)
    assert model.config.patience == 2


def test_forward_rejects_bad_inputs():
    model = _tiny_classifier().eval()
    input_ids, attention_mask = padded_batch()
    with pytest.raises(ValueError, match=r"attention_mask must be a 2D \(batch, seq_len\) 0/1 tensor of shape \(4, 12\), got \(4, 11\)"):
        model(input_ids=input_ids, attention_mask=attention_mask[:, :11])
    with pytest.raises(ValueError, match=r"exactly one of input_ids or inputs_embeds"):
        model(input_ids=input_ids, inputs_embeds=torch.zeros(4, 12, 32), attention_mask=attention_mask)
    with pytest.raises(ValueError, match=r"Label 7 is out of range: this model has num_labels=3 \(labels 0\.\.2\)"):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 7, 2]), output_all_exits=True)
    with pytest.raises(ValueError, match=r"Label 7 is out of range: this model has num_labels=3 \(labels 0\.\.2\)"):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 7, 2]))  # evaluation loss too
    with pytest.raises(ValueError, match=r"exit_threshold=2.0 is out of range"):
        model(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=2.0)


def test_forward_without_inputs_names_the_problem():
    model = _tiny_classifier().eval()
    with pytest.raises(ValueError, match=r"exactly one of input_ids or inputs_embeds"):
        model(attention_mask=torch.ones(2, 5, dtype=torch.long))


def _tiny_classifier(**fields) -> MagicPyramidForSequenceClassification:
    torch.manual_seed(0)
    return MagicPyramidForSequenceClassification(MagicPyramidConfig(backbone_config=tiny_config("bert"), **fields))


# ---------------------------------------------------------------------------------------------------------------------
# 7. Registration and pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_auto_registration():
    config = AutoConfig.for_model("magic_pyramid", backbone_config=tiny_config("roberta"), exit_layers=[2])
    assert isinstance(config, MagicPyramidConfig)
    assert config.backbone_type == "roberta" and config.resolved_exit_layers() == [2, 4]
    # A dict backbone config (as read from JSON) works too.
    from_dict = AutoConfig.for_model("magic_pyramid", backbone_config=tiny_config("bert").to_dict())
    assert from_dict.backbone_config.model_type == "bert"
    assert type(AutoModel.from_config(config)) is MagicPyramidModel
    assert type(AutoModelForSequenceClassification.from_config(config)) is MagicPyramidForSequenceClassification
    assert hf_magicpyramid.MagicPyramidConfig.model_type == "magic_pyramid"


def test_text_classification_pipeline(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = AutoConfig.for_model(
        "magic_pyramid",
        backbone_config=tiny_config("bert", vocab_size=len(tokenizer)),
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    classifier = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer)
    texts = ["A fine film.", "The plot drags on and on, and the ending makes no sense at all."]
    results = classifier(texts)
    assert len(results) == 2
    for text, result in zip(texts, results, strict=True):
        assert result["label"] in {"negative", "positive"}
        assert 0.0 < result["score"] <= 1.0
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
        assert result["label"] == config.id2label[int(logits.argmax())]
        assert result["score"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)
    both = classifier(texts[0], top_k=None)
    assert sorted(item["label"] for item in both) == ["negative", "positive"]
    assert sum(item["score"] for item in both) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 8. One real checkpoint: all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------------------------------

SENTENCES = [
    "A great movie.",
    "It was the worst film I have ever seen, and I have seen many bad ones over the years.",
    "Meh, fine I guess, nothing special.",
    "The acting is superb, the score is haunting, and the final act left the whole audience in stunned silence.",
]


@pytest.mark.slow
def test_real_minilm_parity(minilm_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)  # the classifier head is new
    stock = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    stock.save_pretrained(tmp_path)
    model = converted(tmp_path)
    assert model.config.backbone_type == "bert" and model.config.num_hidden_layers == 6
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == len(SENTENCES)  # really padded, every row differently
    with torch.no_grad():
        expected = stock(**batch).logits
        out = model(**batch)
    assert_close(out.logits, expected, what="all-MiniLM-L6-v2 logits")
    assert torch.equal(out.kept_tokens[:, 0], lengths)

    # Straight from the package folder (a bare encoder with no classifier): a new head, the encoder's real weights.
    torch.manual_seed(0)
    direct = MagicPyramidForSequenceClassification.from_backbone(minilm_path, num_labels=2).eval()
    assert direct.config.num_labels == 2
    with torch.no_grad():
        direct_logits = direct(**batch).logits
    assert direct_logits.shape == (len(SENTENCES), 2)
    assert_close(direct_logits, expected, what="from the package folder, same seed")
    direct_state = direct.base_encoder.state_dict()
    for name, value in stock.base_model.state_dict().items():
        assert torch.equal(direct_state[name], value), name


def test_config_takes_labels_from_a_fine_tuned_backbone_unless_given():
    backbone = tiny_config("bert", num_labels=3)
    backbone.id2label = {0: "neg", 1: "neu", 2: "pos"}
    backbone.label2id = {"neg": 0, "neu": 1, "pos": 2}
    assert MagicPyramidConfig(backbone_config=backbone).id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert MagicPyramidConfig(backbone_config=backbone, num_labels=5).num_labels == 5
