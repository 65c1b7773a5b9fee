"""The ONNX Runtime layer loop gives the torch loop's results, batch = alone, on every family that exports.

Tolerance: 1e-4 on logits for fp32 graphs (measured: at most 4e-6; ONNX Runtime fuses and reorders float sums), exact
exit layers and kept-token counts. int8 graphs: predictions and exits are checked to run, not to match (int8 noise).
Export is slow (about 1 s per graph): tiny 4-layer models, one export per family.
"""

from __future__ import annotations

import pytest
import torch

from tiny import FAMILIES, padded_batch, sharpen_exits, stock_and_pyramid

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from hf_magicpyramid.onnx_loop import OnnxExportError, OnnxPyramid, OnnxStock  # noqa: E402

LENGTHS = (9, 6, 3, 12, 7, 11)
NOT_EXPORTABLE = {"modernbert"}  # its sliding-window mask is built by a vmapped mask function the tracer cannot export
ATOL = 1e-4


def tiny_models(family: str, **options):
    # Mean-pooled sharp exit heads (samples exit at different layers), topk pruning on every layer after the first.
    stock, model = stock_and_pyramid(family, exit_criterion="entropy", exit_pooling="mean", token_pruning="topk",
                                     keep_ratios=[1.0, 0.6, 0.5, 0.3], **options)
    return stock, sharpen_exits(model, std=8.0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NOT_EXPORTABLE])
def test_onnx_loop_matches_the_torch_loop(family, tmp_path):
    _, model = tiny_models(family)
    runner = OnnxPyramid(model, tmp_path / "onnx")
    input_ids, attention_mask = padded_batch(LENGTHS, seed=1)
    with torch.no_grad():
        for threshold, scale in [(0.0, 0.0), (0.3, 1.0), (0.05, 2.0)]:  # exact model; exits + pruning; harder
            expected = model(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=threshold, keep_ratio_scale=scale)
            got = runner(input_ids, attention_mask, exit_threshold=threshold, keep_ratio_scale=scale)
            torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
            assert got.exit_layer.tolist() == expected.exit_layer.tolist()
            assert got.kept_tokens.tolist() == expected.kept_tokens.tolist()
        # batch = alone, at the model's own default speed set for this check
        model.set_speed(exit_threshold=0.3, keep_ratio_scale=1.0)
        batch = runner(input_ids, attention_mask)
        for row, length in enumerate(LENGTHS):
            alone = runner(input_ids[row : row + 1, :length])
            torch.testing.assert_close(alone.logits[0], batch.logits[row], atol=ATOL, rtol=0)
            assert alone.exit_layer.item() == batch.exit_layer[row].item()
            assert alone.kept_tokens[0].tolist() == batch.kept_tokens[row].tolist()
    assert (batch.exit_layer < 4).any(), "samples must exit early in the batch = alone check"


@pytest.mark.parametrize("family", sorted(NOT_EXPORTABLE))
def test_a_family_that_cannot_export_says_so(family, tmp_path):
    _, model = tiny_models(family)
    with pytest.raises(OnnxExportError, match=f"The {family} layers cannot be exported to ONNX"):
        OnnxPyramid(model, tmp_path / "onnx")


def test_int8_graphs_and_the_stock_graph(tmp_path):
    stock, model = tiny_models("bert")
    input_ids, attention_mask = padded_batch(LENGTHS, seed=1)
    int8 = OnnxPyramid(model, tmp_path / "onnx", quantize="int8")
    assert (tmp_path / "onnx" / "layer_0.int8.onnx").stat().st_size < (tmp_path / "onnx" / "layer_0.onnx").stat().st_size
    with torch.no_grad():
        never = int8(input_ids, attention_mask, exit_threshold=0.0, keep_ratio_scale=0.0)
        fp32_stock = stock(input_ids=input_ids, attention_mask=attention_mask).logits
    assert never.exit_layer.tolist() == [4] * len(LENGTHS)
    assert not torch.equal(never.logits, fp32_stock)
    torch.testing.assert_close(never.logits, fp32_stock, atol=0.1 * float(fp32_stock.abs().max()) + 1e-3, rtol=0)
    ort_stock = OnnxStock(stock, tmp_path / "stock")
    torch.testing.assert_close(ort_stock(input_ids, attention_mask).logits, fp32_stock, atol=ATOL, rtol=0)
    assert model.training is False and stock.training is False  # export leaves the models in eval mode


def test_quantized_torch_model_is_refused(tmp_path):
    from hf_magicpyramid.quantization import quantize_model

    _, model = tiny_models("bert")
    with pytest.raises(ValueError, match="Export the fp32 model"):
        OnnxPyramid(quantize_model(model), tmp_path / "onnx")
    with pytest.raises(ValueError, match="quantize='fp16'"):
        OnnxPyramid(model, tmp_path / "onnx", quantize="fp16")
