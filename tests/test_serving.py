"""Serving: options checked by name, strict loading, the inputs stock models accept, the speed read once per call
(thread-safe `set_speed`), the loss in evaluation (a plain `Trainer` works), per-call knobs through `pipeline`, and the
untrained-exits warning."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.testing_utils import CaptureLogger


from tiny import padded_batch, tiny_config, tiny_stock  # noqa: E402

from hf_magicpyramid import MagicPyramidConfig, MagicPyramidForSequenceClassification, MagicPyramidModel  # noqa: E402
from hf_magicpyramid import modeling_magic_pyramid  # noqa: E402
from hf_magicpyramid.pipelines import MagicPyramidTextClassificationPipeline  # noqa: E402

LENGTHS = (9, 6, 3, 12, 7, 11)


def converted(family="bert", seed=0, attn_implementation=None, **options):
    stock = tiny_stock(family, seed=seed, attn_implementation=attn_implementation)
    return stock, MagicPyramidForSequenceClassification.from_backbone(stock, **options).eval()


def sharpen_exits(model, std=2.0, seed=0):
    """Random but confident exit heads, so that a threshold makes samples leave at different layers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.exits.values():
            head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=generator) * std)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Unknown options are errors naming the close match
# ---------------------------------------------------------------------------------------------------------------------


def test_forward_typo_names_the_close_match():
    _, model = converted()
    input_ids, attention_mask = padded_batch()
    with pytest.raises(TypeError, match=r"^forward\(\) got an unexpected keyword argument 'exit_treshold'; did you mean 'exit_threshold'\?$"):
        model(input_ids=input_ids, attention_mask=attention_mask, exit_treshold=0.1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'output_all_exit'; did you mean 'output_all_exits'\?"):
        model(input_ids=input_ids, attention_mask=attention_mask, output_all_exit=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zzz'; allowed: attention_mask, .*exit_threshold"):
        model(input_ids=input_ids, attention_mask=attention_mask, zzz=1)
    encoder = MagicPyramidModel(MagicPyramidConfig(backbone_config=tiny_config("bert"), token_pruning="topk")).eval()
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'keep_ratio_scal'; did you mean 'keep_ratio_scale'\?"):
        encoder(input_ids=input_ids, attention_mask=attention_mask, keep_ratio_scal=2.0)


def test_config_typo_names_the_close_match(tmp_path):
    # PreTrainedConfig keeps unknown names as attributes: without this check, exit_treshold would do nothing.
    with pytest.raises(TypeError, match=r"^MagicPyramidConfig\(\) got an unexpected keyword argument 'exit_treshold'; did you mean 'exit_threshold'\?$"):
        MagicPyramidConfig(backbone_config=tiny_config("bert"), exit_treshold=0.5)
    with pytest.raises(TypeError, match=r"'keep_ratio'; did you mean 'keep_ratios'\?$"):
        MagicPyramidConfig(backbone_config=tiny_config("bert"), token_pruning="topk", keep_ratio=[1.0, 0.5])
    # The same check guards an edited config.json; the generic config options and a saved config still load.
    config = MagicPyramidConfig(backbone_config=tiny_config("bert"), exit_threshold=0.5, num_labels=3, problem_type=None)
    config.save_pretrained(tmp_path)
    assert MagicPyramidConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "exit_pooling_": "mean"}))
    with pytest.raises(TypeError, match=r"'exit_pooling_'; did you mean 'exit_pooling'\?$"):
        MagicPyramidConfig.from_pretrained(tmp_path)


def test_forward_takes_what_generic_callers_pass():
    _, model = converted()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask)
        extra = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            num_items_in_batch=torch.tensor(4),
            output_attentions=False,
            output_hidden_states=None,
        )
        as_tuple = model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
    assert torch.equal(plain.logits, extra.logits)
    # return_dict=False gives the non-None fields as a tuple, as the stock models do.
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.logits) and len(as_tuple) == len(plain.to_tuple())
    with pytest.raises(ValueError, match=r"^output_hidden_states=True is not supported: a Magic Pyramid forward removes samples"):
        model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    with pytest.raises(ValueError, match=r"^output_attentions=True is not supported"):
        model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)


def test_from_backbone_typo_names_the_close_match(stock_dir):
    with pytest.raises(TypeError, match=r"^from_backbone\(\) got an unexpected keyword argument 'exit_poolin'; did you mean 'exit_pooling'\?$"):
        MagicPyramidForSequenceClassification.from_backbone(tiny_stock("bert"), exit_poolin="mean")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'token_prunning'; did you mean 'token_pruning'\?"):
        MagicPyramidForSequenceClassification.from_backbone(stock_dir("bert"), token_prunning="topk")
    # Real fields and the download options are taken.
    model = MagicPyramidForSequenceClassification.from_backbone(stock_dir("bert"), exit_pooling="mean", local_files_only=True)
    assert model.config.exit_pooling == "mean"


# ---------------------------------------------------------------------------------------------------------------------
# 2. Edited or damaged checkpoints are one-line errors, never fresh weights
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_pyramid(tmp_path_factory):
    path = tmp_path_factory.mktemp("pyramid")
    converted(exit_layers=[2])[1].save_pretrained(path)
    return path


def _edited(saved: Path, tmp_path: Path, edit) -> Path:
    target = tmp_path / "edited"
    shutil.copytree(saved, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _set_labels(config):
    config["id2label"], config["label2id"] = {"0": "a", "1": "b"}, {"a": 0, "b": 1}


EDITS = {
    "backbone type": (
        lambda c: c["backbone_config"].update(model_type="roberta"),
        r"missing \d+ tensors .*unexpected \d+ tensors .*the weights are for a bert backbone, but config.json says "
        r"backbone_config.model_type='roberta'\. Restore the config.json",
    ),
    "fewer layers": (
        lambda c: c["backbone_config"].update(num_hidden_layers=3),
        r"unexpected 16 tensors \(e.g. backbone.bert.encoder.layer.3.*the weights hold 4 layers, but config.json says num_hidden_layers=3",
    ),
    "more layers": (
        lambda c: c["backbone_config"].update(num_hidden_layers=5),
        r"missing 16 tensors \(e.g. backbone.bert.encoder.layer.4.*the weights hold 4 layers, but config.json says num_hidden_layers=5",
    ),
    "hidden size": (
        lambda c: c["backbone_config"].update(hidden_size=48),
        r"config.json says hidden_size=48 but the weights are 32 wide \(e.g. .*\)\. Restore hidden_size=32 in backbone_config\.$",
    ),
    "label count": (
        _set_labels,
        r"the heads were saved with 3 labels but config.json has num_labels=2 .*backbone.classifier.bias \(3,\) in the file vs "
        r"\(2,\) from config.json.*ignore_mismatched_sizes=True",
    ),
    "exit layers": (
        lambda c: c.update(exit_layers=[1, 2]),
        r"missing 6 tensors \(e.g. exits.1.*exit_layers=\[1, 2\] do not match the saved exit heads .*in the config but not in the file: \[1\]",
    ),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_edited_config_is_an_error_not_fresh_weights(saved_pyramid, tmp_path, case):
    edit, message = EDITS[case]
    path = _edited(saved_pyramid, tmp_path, edit)
    with pytest.raises(ValueError, match=rf"^The checkpoint in {path} does not fit its config.json.*" + message):
        AutoModelForSequenceClassification.from_pretrained(path)


@pytest.mark.parametrize("layer", [0, 3])
def test_a_file_missing_one_tensor_is_named_as_damaged(saved_pyramid, tmp_path, layer):
    # One tensor gone (of the first layer, or of the last, which must not read as "the weights hold 3 layers").
    from safetensors.torch import load_file, save_file

    target = tmp_path / "damaged"
    shutil.copytree(saved_pyramid, target)
    tensors = load_file(target / "model.safetensors")
    key = f"backbone.bert.encoder.layer.{layer}.output.dense.bias"
    del tensors[key]
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing 1 tensors \(e.g. {re.escape(key)}\)\): the file lacks tensors of layer\(s\) "
                       rf"\[{layer}\] that config.json's shapes need: the file is incomplete or was edited\. Save the model "
                       r"again with save_pretrained, or restore the original file\.$"):
        AutoModelForSequenceClassification.from_pretrained(target)


def test_encoder_from_an_edited_classifier_checkpoint_is_an_error(saved_pyramid, tmp_path):
    path = _edited(saved_pyramid, tmp_path, lambda c: c["backbone_config"].update(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"the weights hold 4 layers, but config.json says num_hidden_layers=3"):
        MagicPyramidModel.from_pretrained(path)
    # The untouched checkpoint loads into the encoder (its heads are simply not used).
    assert isinstance(MagicPyramidModel.from_pretrained(saved_pyramid), MagicPyramidModel)


def test_new_labels_on_purpose_keep_the_stock_meaning(saved_pyramid, tmp_path):
    path = _edited(saved_pyramid, tmp_path, _set_labels)
    model, info = MagicPyramidForSequenceClassification.from_pretrained(path, ignore_mismatched_sizes=True, output_loading_info=True)
    assert model.config.num_labels == 2 and model.backbone.classifier.out_features == 2
    assert {key for key, _, _ in info["mismatched_keys"]} >= {"backbone.classifier.weight", "exits.2.classifier.weight"}


def test_missing_config_json(saved_pyramid, tmp_path):
    target = tmp_path / "no-config"
    shutil.copytree(saved_pyramid, target)
    (target / "config.json").unlink()
    with pytest.raises(ValueError, match=rf"^{target} has no config.json: a Magic Pyramid checkpoint needs the config.json it was saved with"):
        MagicPyramidForSequenceClassification.from_pretrained(target)


@pytest.mark.parametrize("keep", [5000, -100], ids=["header-cut", "data-cut"])
def test_truncated_weights_file(saved_pyramid, tmp_path, keep):
    target = tmp_path / "truncated"
    shutil.copytree(saved_pyramid, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(ValueError, match=rf"^The weights file in {target} is truncated or damaged \(.*\); copy or download it again\.$"):
        AutoModelForSequenceClassification.from_pretrained(target)


def test_from_backbone_on_a_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=rf"^from_backbone: {missing} does not exist; give a saved model folder, a Hub model id"):
        MagicPyramidForSequenceClassification.from_backbone(missing)
    with pytest.raises(ValueError, match=rf"^from_backbone: {tmp_path} has no config.json"):
        MagicPyramidForSequenceClassification.from_backbone(tmp_path)
    with pytest.raises(ValueError, match=r"^from_backbone: cannot load 'no-such-model-xyz': it is not a local folder, and as a Hub model id it failed: [^\n]*$"):
        MagicPyramidForSequenceClassification.from_backbone("no-such-model-xyz")


# ---------------------------------------------------------------------------------------------------------------------
# 3. Inputs the stock models accept: all-padding batches, float and bool masks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,attn", [("bert", "eager"), ("bert", "sdpa"), ("distilbert", "sdpa"), ("deberta-v2", "eager"), ("modernbert", "sdpa")]
)
def test_all_padding_batch_gives_the_stock_logits(family, attn):
    stock, model = converted(family, attn_implementation=attn)
    input_ids, attention_mask = padded_batch((5, 3))
    padding_only = torch.zeros_like(attention_mask)
    with torch.no_grad():
        expected = stock(input_ids=input_ids, attention_mask=padding_only).logits
        out = model(input_ids=input_ids, attention_mask=padding_only)
    # Whatever stock returns (ModernBERT: NaN, as its masked softmax has no real key) we return too.
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5, equal_nan=True)
    assert out.exit_layer.tolist() == [4, 4] and out.kept_tokens.sum() == 0


def test_all_padding_batch_with_exits_and_pruning_runs():
    _, model = converted(token_pruning="topk")
    sharpen_exits(model)
    input_ids, attention_mask = padded_batch((5, 3))
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.zeros_like(attention_mask), exit_threshold=0.5, keep_ratio_scale=2.0)
    assert out.logits.shape == (2, 3) and bool(torch.isfinite(out.logits).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool, torch.int32])
def test_float_and_bool_masks_give_the_long_mask_logits(dtype):
    stock, model = converted()
    input_ids, attention_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask)
        out = model(input_ids=input_ids, attention_mask=attention_mask.to(dtype))
        torch.testing.assert_close(out.logits, stock(input_ids=input_ids, attention_mask=attention_mask.to(dtype)).logits, rtol=0, atol=1e-5)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.kept_tokens, expected.kept_tokens)


def test_mask_values_other_than_0_and_1_are_refused():
    _, model = converted()
    input_ids, attention_mask = padded_batch()
    soft = attention_mask.float()
    soft[0, 1] = 0.5
    with pytest.raises(ValueError, match=r"^attention_mask holds 0.5: it must hold only 0 \(padding\) and 1 \(real token\), as long, int, bool or float"):
        model(input_ids=input_ids, attention_mask=soft)
    with pytest.raises(ValueError, match=r"^attention_mask holds 2: it must hold only 0"):
        model(input_ids=input_ids, attention_mask=(attention_mask * 2).int())


# ---------------------------------------------------------------------------------------------------------------------
# 4. Inputs are checked once per call
# ---------------------------------------------------------------------------------------------------------------------


def test_inputs_are_checked_once_per_forward():
    _, model = converted()
    encoder = MagicPyramidModel(MagicPyramidConfig(backbone_config=tiny_config("bert"))).eval()
    input_ids, attention_mask = padded_batch()
    for module in (model, encoder):
        calls = []
        check = module._check_inputs
        module._check_inputs = lambda *args, check=check: calls.append(1) or check(*args)
        with torch.no_grad():
            module(input_ids=input_ids, attention_mask=attention_mask)
        assert len(calls) == 1, type(module).__name__


# ---------------------------------------------------------------------------------------------------------------------
# 5. set_speed from another thread takes effect between calls, never inside one
# ---------------------------------------------------------------------------------------------------------------------

SPEED_A = dict(exit_threshold=0.6, keep_ratio_scale=2.0)
SPEED_B = dict(exit_threshold=None, keep_ratio_scale=0.0)


def _result(out):
    return (out.logits, out.exit_layer, out.kept_tokens, out.flops)


def _same(left, right) -> bool:
    return all(torch.equal(a, b) for a, b in zip(left, right, strict=True))


def test_set_speed_from_another_thread_applies_between_calls():
    # mpnet reads importance from the probabilities its layer returns: no hooks, so only the speed is under test here.
    _, model = converted("mpnet", token_pruning="topk", keep_ratios=[1.0, 0.7, 0.5, 0.3])
    sharpen_exits(model)
    inputs = [padded_batch(LENGTHS, seed=seed) for seed in range(3)]
    expected = {}
    with torch.no_grad():
        for name, speed in (("A", SPEED_A), ("B", SPEED_B)):
            model.set_speed(**speed)
            expected[name] = [_result(model(input_ids=i, attention_mask=m, output_flops=True)) for i, m in inputs]
    # The two speeds really differ in every output the speed drives.
    for a, b in zip(expected["A"], expected["B"], strict=True):
        assert not torch.equal(a[1], b[1]) and not torch.equal(a[2], b[2]) and not torch.equal(a[3], b[3])

    stop = threading.Event()
    seen = {"A": 0, "B": 0}
    failures = []

    def flip():
        while not stop.is_set():
            model.set_speed(**SPEED_A)
            model.set_speed(**SPEED_B)

    def serve(worker):
        with torch.no_grad():
            for step in range(12):
                index = (worker + step) % len(inputs)
                input_ids, attention_mask = inputs[index]
                got = _result(model(input_ids=input_ids, attention_mask=attention_mask, output_flops=True))
                matches = [name for name in ("A", "B") if _same(got, expected[name][index])]
                if not matches:
                    failures.append((worker, step, got[1].tolist(), got[2].tolist()))
                for name in matches:
                    seen[name] += 1

    flipper = threading.Thread(target=flip)
    workers = [threading.Thread(target=serve, args=(w,)) for w in range(4)]
    flipper.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    flipper.join()
    assert failures == []
    assert seen["A"] + seen["B"] == 48


# ---------------------------------------------------------------------------------------------------------------------
# 6. The loss in evaluation: a plain Trainer trains and evaluates
# ---------------------------------------------------------------------------------------------------------------------


def test_eval_loss_is_the_loss_of_the_returned_logits():
    stock, model = converted()
    input_ids, attention_mask = padded_batch(LENGTHS)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        # No sample exits early: exactly the stock model's loss.
        torch.testing.assert_close(out.loss, stock(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss, rtol=0, atol=1e-6)
        sharpen_exits(model)
        early = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, exit_threshold=0.6)
        assert bool((early.exit_layer < 4).any())
        # Samples that left early are scored with the logits they left with.
        assert torch.equal(early.loss, torch.nn.functional.cross_entropy(early.logits, labels))
        # output_all_exits=True keeps the training objective over every exit.
        every = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_all_exits=True)
        assert not torch.equal(every.loss, out.loss)


class _Examples(torch.utils.data.Dataset):
    """Fixed-length examples whose label is a function of the first real token, so accuracy can move."""

    def __init__(self, count, seed):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(5, 99, (count, 8), generator=generator)
        self.labels = self.input_ids[:, 1] % 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[index]}


def test_plain_trainer_trains_and_evaluates_with_compute_metrics(tmp_path):
    _, model = converted()
    model.train()
    seen_predictions = []

    def compute_metrics(prediction):
        seen_predictions.append(prediction.predictions)
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        eval_strategy="steps",
        eval_steps=2,
        max_steps=4,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=6,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    eval_set = _Examples(10, seed=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Examples(32, seed=0), eval_dataset=eval_set, compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    assert len(seen_predictions) == 3  # steps 2 and 4, then evaluate()
    assert seen_predictions[-1].shape == (10, 3)  # logits only, as with a stock classifier
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=eval_set.input_ids, attention_mask=torch.ones_like(eval_set.input_ids)).logits
    expected_loss = float(torch.nn.functional.cross_entropy(logits, eval_set.labels))
    # The Trainer averages the per-batch losses (6 + 4 samples).
    first, second = (torch.nn.functional.cross_entropy(logits[s], eval_set.labels[s]) for s in (slice(0, 6), slice(6, 10)))
    assert metrics["eval_loss"] == pytest.approx(float(first * 6 + second * 4) / 10, abs=1e-5)
    assert metrics["eval_loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx(float((logits.argmax(-1) == eval_set.labels).float().mean()))
    assert model.config.exits_trained is True  # the joint objective trained the exit heads


# ---------------------------------------------------------------------------------------------------------------------
# 7. Per-call knobs through pipeline
# ---------------------------------------------------------------------------------------------------------------------

TEXTS = ["A fine film.", "The plot drags on and on, and the ending makes no sense at all.", "Meh.", "Great cast, weak script, long middle."]


def _pipeline_model(tokenizer):
    config = MagicPyramidConfig(
        backbone_config=tiny_config("bert", vocab_size=len(tokenizer), max_position_embeddings=128),
        token_pruning="topk",
        keep_ratios=[1.0, 0.6, 0.4, 0.3],
    )
    torch.manual_seed(0)
    model = MagicPyramidForSequenceClassification(config).eval()
    sharpen_exits(model, std=4.0)
    return model


def test_pipeline_per_call_knobs_change_the_result(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = _pipeline_model(tokenizer)
    # The plain call: `import hf_magicpyramid` made our subclass the task's implementation.
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    assert isinstance(pipe, MagicPyramidTextClassificationPipeline)
    default = pipe(TEXTS)
    fast = pipe(TEXTS, exit_threshold=0.9, keep_ratio_scale=3.0)
    assert fast != default
    for text, result in zip(TEXTS, fast, strict=True):
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt"), exit_threshold=0.9, keep_ratio_scale=3.0).logits[0]
        scores = {item["label"]: item["score"] for item in result}
        expected = logits.softmax(-1)
        assert [scores[model.config.id2label[i]] for i in range(3)] == pytest.approx(expected.tolist(), abs=1e-6)
    # Per call only: the next call runs at the model's own speed again.
    assert pipe(TEXTS) == default
    # The exact model (no exit, no pruning) through the knobs equals the stock-style default of a model that never exits.
    exact = pipe(TEXTS, keep_ratio_scale=0.0)
    with torch.no_grad():
        full = model(**tokenizer(TEXTS[1], return_tensors="pt"), keep_ratio_scale=0.0).logits[0].softmax(-1)
    assert sorted(item["score"] for item in exact[1]) == pytest.approx(sorted(full.tolist()), abs=1e-6)


def test_pipeline_refuses_misspelt_or_foreign_knobs(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    pipe = transformers.pipeline("text-classification", model=_pipeline_model(tokenizer), tokenizer=tokenizer)
    with pytest.raises(TypeError, match=r"^The pipeline got an unexpected keyword argument 'exit_treshold'; did you mean 'exit_threshold'\?$"):
        pipe(TEXTS, exit_treshold=0.5)
    torch.manual_seed(0)
    stock = AutoModelForSequenceClassification.from_config(tiny_config("bert", vocab_size=len(tokenizer), max_position_embeddings=128)).eval()
    stock_pipe = transformers.pipeline("text-classification", model=stock, tokenizer=tokenizer, top_k=None)
    with pytest.raises(ValueError, match=r"^exit_threshold is a Magic Pyramid speed knob, but BertForSequenceClassification does not take it"):
        stock_pipe(TEXTS, exit_threshold=0.5)
    # Without knobs it is the stock pipeline: the same scores as transformers' own class.
    plain = transformers.TextClassificationPipeline(model=stock, tokenizer=tokenizer, top_k=None)
    assert stock_pipe(TEXTS) == plain(TEXTS)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Warning when untrained exits would let samples leave early
# ---------------------------------------------------------------------------------------------------------------------


def _warnings_of(action) -> str:
    logger = transformers.utils.logging.get_logger(modeling_magic_pyramid.__name__)
    logging.Logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        action()
    return captured.out


def test_untrained_exits_warn_once_when_samples_can_leave(tmp_path):
    _, model = converted()
    assert model.config.exits_trained is False
    input_ids, attention_mask = padded_batch(LENGTHS)

    def run(**speed):
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, **speed)

    message = r"The exit heads of this Magic Pyramid model were never trained \(converted with from_backbone\), yet the speed lets samples leave early"
    assert _warnings_of(lambda: run()) == ""  # no threshold: nobody leaves early, nothing to warn about
    assert _warnings_of(lambda: run(exit_threshold=0.0)) == ""  # a threshold that can never fire
    twice = _warnings_of(lambda: (run(exit_threshold=0.5), model.set_speed(exit_threshold=0.5), run()))
    assert len(__import__("re").findall(message, twice)) == 1

    # One training step through the exits marks them trained; the flag saves and loads.
    model.train()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.zeros(6, dtype=torch.long))
    out.loss.backward()
    assert model.config.exits_trained is True
    model.save_pretrained(tmp_path)
    loaded = MagicPyramidForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.exits_trained is True
    with torch.no_grad():
        assert _warnings_of(lambda: loaded(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=0.5)) == ""


def test_evaluation_and_frozen_exits_do_not_mark_exits_trained():
    _, model = converted()
    input_ids, attention_mask = padded_batch(LENGTHS)
    labels = torch.zeros(6, dtype=torch.long)
    model.train()
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert model.config.exits_trained is False
    for parameter in model.exits.parameters():
        parameter.requires_grad_(False)
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert model.config.exits_trained is False
