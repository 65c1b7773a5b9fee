"""int8 dynamic quantization: never-exit equals the quantized stock model, batch equals alone within int8 noise, and a
sweep of the int8 model stores its own speed without touching the fp32 default.

Tolerances. Never-exit vs the quantized stock model: 1e-5 (the same int8 kernels on the same tensors; measured 0.0).
Batch vs alone: dynamic quantization picks ONE activation scale per Linear call from the whole (batch, seq_len) tensor,
so even the stock int8 model gives a sample slightly different logits in a batch than alone (measured on these tiny
models: up to 4% of the largest logit). The test allows 5% of the largest logit and requires the same exit layer and
kept-token counts; a row mix-up or a wrong exit would move logits by their whole size.
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from tiny import FAMILIES, padded_batch, sharpen_exits, stock_and_pyramid, word_tokenizer

from hf_magicpyramid import MagicPyramidForSequenceClassification
from hf_magicpyramid.exits import normalized_entropy
from hf_magicpyramid.quantization import load_quantized, quantization_of, quantize_model

LENGTHS = (9, 6, 3, 12, 7, 11)
RELATIVE_INT8_NOISE = 0.05


def is_int8(module) -> bool:
    return "quantized" in type(module).__module__


@pytest.mark.parametrize("family", FAMILIES)
def test_never_exit_equals_the_quantized_stock_model(family):
    stock, model = stock_and_pyramid(family, token_pruning="topk", keep_ratios=[1.0, 0.6, 0.5, 0.3])
    sharpen_exits(model)
    quantized_stock, quantized = quantize_model(stock), quantize_model(model)
    assert quantization_of(quantized) == "int8" and quantization_of(model) is None
    assert is_int8(quantized.exits["1"].classifier) and not is_int8(model.exits["1"].classifier)  # the input is untouched
    input_ids, attention_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        expected = quantized_stock(input_ids=input_ids, attention_mask=attention_mask).logits
        out = quantized(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=0.0, keep_ratio_scale=0.0)
        fp32 = stock(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    assert out.exit_layer.tolist() == [4] * len(LENGTHS)
    assert not torch.equal(expected, fp32), "int8 must really change the computation"


@pytest.mark.parametrize("family", ["bert", "distilbert", "deberta-v2", "modernbert"])
def test_quantized_batch_equals_alone_with_exits_and_pruning(family):
    # Mean-pooled, sharp exit heads: confidences that differ between samples by more than int8 noise.
    _, model = stock_and_pyramid(family, exit_criterion="entropy", exit_pooling="mean", token_pruning="topk",
                                 keep_ratios=[1.0, 0.6, 0.5, 0.3])
    sharpen_exits(model, std=8.0)
    quantized = quantize_model(model)
    input_ids, attention_mask = padded_batch(LENGTHS, seed=1)
    with torch.no_grad():
        # Every exit's entropy, in the batch and alone: the threshold goes in the widest gap between them, so that int8
        # noise (which differs between batch and alone) cannot move a sample across it.
        values = [normalized_entropy(logits) for logits in quantized(input_ids=input_ids, attention_mask=attention_mask,
                                                                      output_all_exits=True).exit_logits[:-1]]
        for row, length in enumerate(LENGTHS):
            alone = quantized(input_ids=input_ids[row : row + 1, :length], output_all_exits=True).exit_logits[:-1]
            values += [normalized_entropy(logits) for logits in alone]
        entropy = torch.cat(values).sort().values
        midpoints, gaps = (entropy[1:] + entropy[:-1]) / 2, entropy[1:] - entropy[:-1]
        # Only thresholds that split the first exit, so that samples exit at different layers.
        splits = (values[0][:, None] < midpoints[None, :]).any(0) & (values[0][:, None] > midpoints[None, :]).any(0)
        quantized.set_speed(exit_threshold=float(midpoints[int(torch.where(splits, gaps, -1.0).argmax())]))
        batch = quantized(input_ids=input_ids, attention_mask=attention_mask)
        scale = batch.logits.abs().max()
        for row, length in enumerate(LENGTHS):
            alone = quantized(input_ids=input_ids[row : row + 1, :length])
            assert alone.exit_layer.item() == batch.exit_layer[row].item()
            assert alone.kept_tokens[0].tolist() == batch.kept_tokens[row].tolist()
            torch.testing.assert_close(alone.logits[0], batch.logits[row], atol=float(RELATIVE_INT8_NOISE * scale), rtol=0)
    assert len(set(batch.exit_layer.tolist())) >= 2, "the threshold must make samples exit at different layers"


def test_bad_method_and_double_quantization_are_clear_errors():
    _, model = stock_and_pyramid("bert")
    with pytest.raises(ValueError, match="'int4'.*int8"):
        quantize_model(model, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(quantize_model(model))


def test_sweep_of_the_int8_model_stores_its_own_speed(tmp_path, capsys):
    """`sweep --quantize int8` writes calibration_int8.json (and never calibration.json or config.json);
    load_quantized applies the int8 default, an fp32 load keeps the fp32 default."""
    from hf_magicpyramid.calibration import load_calibration, quantized_default
    from hf_magicpyramid.cli import main

    model_dir = tmp_path / "model"
    _, model = stock_and_pyramid("bert", num_labels=2, exit_criterion="entropy", token_pruning="topk")
    sharpen_exits(model)
    model.save_pretrained(model_dir)
    word_tokenizer(model_dir).save_pretrained(model_dir)
    config_before = (model_dir / "config.json").read_text()
    rows = [{"text": " ".join(f"w{(7 * i + j) % 90}" for j in range(3 + i % 9)), "label": f"LABEL_{i % 2}"} for i in range(24)]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "dev.csv"))
    code = main(["sweep", "--model", str(model_dir), "--validation_file", str(tmp_path / "dev.csv"), "--quantize", "int8",
                 "--max_drop", "100", "--batch_size", "8", "--batch1_samples", "0"])
    assert code == 0, capsys.readouterr()
    assert "calibration_int8.json" in capsys.readouterr().out
    assert (model_dir / "config.json").read_text() == config_before
    assert load_calibration(model_dir) is None and (model_dir / "calibration_int8.png").is_file()
    data = load_calibration(model_dir, "int8")
    assert data["quantization"] == "int8" and data["budget_met"] is True
    setting = quantized_default(model_dir, "int8")
    assert setting == data["chosen"]["setting"] and setting["exit_threshold"] is not None

    loaded = load_quantized(model_dir)
    assert quantization_of(loaded) == "int8"
    assert loaded.config.exit_threshold == setting["exit_threshold"]
    assert loaded.config.keep_ratio_scale == setting["keep_ratio_scale"]
    fp32 = MagicPyramidForSequenceClassification.from_pretrained(model_dir)
    assert fp32.config.exit_threshold == json.loads(config_before).get("exit_threshold")


def test_sweep_refuses_an_unknown_quantization(capsys):
    from hf_magicpyramid.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", "--model", "x", "--dataset", "rotten_tomatoes", "--quantize", "fp8"])
    assert "quantize='fp8'" in capsys.readouterr().err
