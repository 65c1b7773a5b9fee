"""Magic Pyramid on ONNX Runtime: one ONNX graph per piece, the same Python loop deciding exits and kept tokens.

At batch 1 a small encoder on CPU spends much of its time in framework overhead, not in FLOPs; ONNX Runtime's overhead
is far lower than eager PyTorch's. This module exports, with dynamic batch and sequence axes:

- `embed.onnx`: (input_ids, attention_mask[, token_type_ids]) → hidden (batch, seq_len, hidden);
- `layer_<i>.onnx`: (hidden, attention_mask, positions) → hidden, plus `scores` (batch, seq_len), the token importance
  the torch path captures (`pruning.AttentionCapture`: the [CLS] attention row rebuilt from the q/K projections, or the
  layer's probabilities), for every layer but the last when the model prunes tokens. Each layer builds its own mask and
  position information from `positions`, the original token positions (so relative / rotary positions stay right after
  pruning), exactly as the driver does after pruning;
- `exit_<L>.onnx`: (hidden, attention_mask) → logits, one per intermediate exit; `final.onnx`: the stock head.

`OnnxPyramid` then runs the loop of `modeling_magic_pyramid._run_encoder` and the classifier's `on_layer` between ONNX
Runtime sessions, with the model's own rules (`exits.exit_decision`, `modeling_magic_pyramid.prune_tokens`)
on torch tensors: finished samples leave the batch, pruned tokens leave the sequence. fp32 graphs
give the torch path's logits within 1e-4 (tests/test_onnx.py), batch = alone included. `quantize="int8"` runs
`onnxruntime.quantization.quantize_dynamic` on every graph (int8 weights; activations quantized per call, so like torch
int8 a sample's logits move slightly with its batch neighbours).

Export uses the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`, opset 17), which needs only `onnx`;
the dynamo exporter needs `onnxscript` and does not trace the per-call Python in the drivers (hooks, mask builders).
Families whose layers cannot be exported raise `OnnxExportError` naming the family and the cause.

Optional: `pip install 'hf-magicpyramid[onnx]'` (onnx, onnxruntime). Not custom code for the Hub (not in
REMOTE_CODE_FILES): an inference path beside the model.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .exits import PatienceState, exit_decision, exit_rule_can_fire, resolve_problem_type
from .modeling_magic_pyramid import MagicPyramidClassifierOutput, _resolve_speed, _Stream, prune_tokens, retire_exited
from .pruning import AttentionCapture

OPSET = 17
ONNX_METHODS = (None, "int8")
MANIFEST = "onnx_pyramid.json"


class OnnxExportError(RuntimeError):
    """A model (family) whose graphs could not be exported or checked."""


def onnx_missing() -> str | None:
    """Why the ONNX path cannot run here (a missing package), or None when it can."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'hf-magicpyramid[onnx]')"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The pieces, as modules with tensor-only inputs and outputs
# ---------------------------------------------------------------------------------------------------------------------


class _Embed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        model = self.model
        return model.driver.embed(model.base_encoder, input_ids, token_type_ids, None, None, attention_mask)


class _Layer(nn.Module):
    """Layer `index` as the loop runs it after pruning (positions given), with its importance scores when `score`."""

    def __init__(self, model, index: int, score: bool):
        super().__init__()
        self.model, self.index, self.score = model, index, score
        self.attn_implementation = model.backbone.config._attn_implementation or "eager"

    def forward(self, hidden, attention_mask, positions):
        model = self.model
        driver, base = model.driver, model.base_encoder
        layer = model.layers[self.index]
        ctx = driver.build_context(base, hidden, attention_mask, positions, True)
        if not self.score:
            return driver.run_layer(base, self.index, layer, hidden, ctx)[0]
        capture = AttentionCapture(driver, layer, model.config.token_importance, self.attn_implementation)
        hidden = capture.run_layer(base, self.index, hidden, ctx)
        return hidden, capture.scores(ctx)


class _Exit(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden, attention_mask):
        return self.head(hidden, attention_mask)


class _Final(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden, attention_mask):
        return self.model.final_logits(hidden, attention_mask)


def _example(model):
    """Example inputs: two samples, the second padded (so the traced graphs take the masked path, valid for every
    input), distinct real token ids."""
    config = model.config.backbone_config
    vocab = getattr(config, "vocab_size", 100)
    input_ids = torch.tensor([[2, 7, 8, 9, 10, 11], [2, 12, 13, 0, 0, 0]]) % vocab
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return input_ids, attention_mask, torch.zeros_like(input_ids)


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str], family: str) -> None:
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "token_type_ids": {0: "batch", 1: "sequence"}, "hidden": {0: "batch", 1: "sequence"}, "hidden_out": {0: "batch", 1: "sequence"},
            "positions": {0: "batch", 1: "sequence"}, "scores": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    module.eval()  # the exporter restores the wrapper's mode afterwards, recursively: an eval wrapper keeps the model in eval
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: every data-dependent branch takes the padded path here
            torch.onnx.export(
                module, args, str(path), input_names=input_names, output_names=output_names,
                dynamic_axes={name: axes[name] for name in input_names + output_names}, opset_version=OPSET, dynamo=False,
            )
    except Exception as error:  # noqa: BLE001 - any exporter failure becomes one clear error naming the family
        raise OnnxExportError(
            f"The {family} layers cannot be exported to ONNX ({path.name}): {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}. Use the torch path for {family}."
        ) from error


def _quantize_graph(source: Path, target: Path) -> None:
    """int8 dynamic quantization of one graph (int8 weights, activations quantized per call), without the
    "consider pre-processing" notice it logs for every graph (shape inference changes nothing for these graphs)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def export_pyramid(model, directory, quantize: str | None = None, log=print) -> Path:
    """Export `model` (a MagicPyramidForSequenceClassification, fp32) as ONNX graphs into `directory`; with
    `quantize="int8"` also write `<name>.int8.onnx` beside each. Returns `directory`. Raises `OnnxExportError`."""
    if quantize not in ONNX_METHODS:
        raise ValueError(f"quantize={quantize!r} is not supported for ONNX Runtime; use one of: none, int8.")
    reason = onnx_missing()
    if reason:
        raise ImportError(f"The ONNX Runtime loop needs {reason}.")
    if getattr(model, "quantization", None):
        raise ValueError("Export the fp32 model: ONNX Runtime quantizes the exported graphs itself (quantize='int8').")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    family = model.driver.model_type
    config = model.config
    num_layers = config.num_hidden_layers
    input_ids, attention_mask, token_type_ids = _example(model)
    with torch.no_grad():
        hidden = model.driver.embed(model.base_encoder, input_ids, token_type_ids, None, None, attention_mask)
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids).contiguous()
    scores_layers = [i < num_layers - 1 and config.token_pruning != "none" for i in range(num_layers)]
    names = ["embed"]
    _export(_Embed(model), (input_ids, attention_mask, token_type_ids), directory / "embed.onnx",
            ["input_ids", "attention_mask", "token_type_ids"], ["hidden"], family)
    for i in range(num_layers):
        outputs = ["hidden_out", "scores"] if scores_layers[i] else ["hidden_out"]
        _export(_Layer(model, i, scores_layers[i]), (hidden, attention_mask, positions), directory / f"layer_{i}.onnx",
                ["hidden", "attention_mask", "positions"], outputs, family)
        names.append(f"layer_{i}")
    for layer_number in model.exit_layers[:-1]:
        _export(_Exit(model.exits[str(layer_number)]), (hidden, attention_mask), directory / f"exit_{layer_number}.onnx",
                ["hidden", "attention_mask"], ["logits"], family)
        names.append(f"exit_{layer_number}")
    _export(_Final(model), (hidden, attention_mask), directory / "final.onnx", ["hidden", "attention_mask"], ["logits"], family)
    names.append("final")
    if quantize == "int8":
        for name in names:
            _quantize_graph(directory / f"{name}.onnx", directory / f"{name}.int8.onnx")
    manifest = {"family": family, "opset": OPSET, "num_layers": num_layers, "exit_layers": list(model.exit_layers),
                "scores_layers": scores_layers, "graphs": names, "int8": quantize == "int8"}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


class OnnxPyramid:
    """A Magic Pyramid classifier running on ONNX Runtime sessions; call it like the model (torch tensors in and out).

    `model` supplies the config, the speed and the pruning plan (its weights are not used after export). `quantize`:
    None (fp32 graphs) or "int8". `threads`: ONNX Runtime's intra-op threads (default: torch's).
    """

    def __init__(self, model, directory, quantize: str | None = None, threads: int | None = None, export: bool = True):
        import onnxruntime as ort

        if quantize not in ONNX_METHODS:
            raise ValueError(f"quantize={quantize!r} is not supported for ONNX Runtime; use one of: none, int8.")
        self.model = model
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        needs_export = not manifest_path.is_file() or (quantize == "int8" and not json.loads(manifest_path.read_text())["int8"])
        if export and needs_export:
            export_pyramid(model, self.directory, quantize=quantize)
        self.manifest = json.loads(manifest_path.read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # One session per graph, each with its own thread pool: threads that spin-wait after their run (ONNX Runtime's
        # default) would take the cores from the next session in the loop, and from torch.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        suffix = ".int8.onnx" if quantize == "int8" else ".onnx"
        self.sessions = {
            name: ort.InferenceSession(str(self.directory / f"{name}{suffix}"), options, providers=["CPUExecutionProvider"])
            for name in self.manifest["graphs"]
        }
        self.input_names = {name: [i.name for i in session.get_inputs()] for name, session in self.sessions.items()}
        self.quantization = quantize

    def _run(self, name: str, **inputs) -> list[torch.Tensor]:
        # The exporter drops inputs a graph does not use (BERT's layers ignore positions): feed what each one takes.
        feed = {k: inputs[k].numpy() for k in self.input_names[name]}
        return [torch.from_numpy(np.ascontiguousarray(out)) for out in self.sessions[name].run(None, feed)]

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, exit_threshold=None, patience=None,
                 keep_ratio_scale=None, prune_threshold_offset=None, **_ignored) -> MagicPyramidClassifierOutput:
        model, config = self.model, self.model.config
        speed = _resolve_speed(config, exit_threshold, patience, keep_ratio_scale, prune_threshold_offset)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        problem_type = resolve_problem_type(config, None)
        num_layers = config.num_hidden_layers
        batch = input_ids.shape[0]
        embed_feed = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        (hidden,) = self._run("embed", **embed_feed)
        stream = _Stream(model, hidden, attention_mask)
        kept_tokens = torch.zeros(batch, num_layers, dtype=torch.long)
        exit_layer = torch.full((batch,), num_layers, dtype=torch.long)
        plan = model._pruning_plan(speed.keep_ratio_scale, speed.prune_threshold_offset)
        can_fire = exit_rule_can_fire(config.exit_criterion, speed.exit_threshold, speed.patience, problem_type)
        patience_state = PatienceState(batch, "cpu")
        exit_layers = set(model.exit_layers)
        logits_out = None
        for i in range(num_layers):
            kept_tokens[stream.rows, i] = stream.attention_mask.sum(dim=1)
            next_step = plan[i + 1] if i + 1 < num_layers else None
            outputs = self._run(f"layer_{i}", hidden=stream.hidden, attention_mask=stream.attention_mask,
                                positions=stream.positions.contiguous())
            stream.hidden = outputs[0]
            stream.scores = outputs[1] if next_step is not None else None
            layer_number = i + 1
            if layer_number == num_layers:
                (logits,) = self._run("final", hidden=stream.hidden, attention_mask=stream.attention_mask)
                if logits_out is None:
                    logits_out = logits.new_zeros(batch, logits.shape[-1])
                logits_out = logits_out.index_put((stream.rows,), logits)
                break
            if layer_number in exit_layers and can_fire:
                (logits,) = self._run(f"exit_{layer_number}", hidden=stream.hidden, attention_mask=stream.attention_mask)
                if logits_out is None:
                    logits_out = logits.new_zeros(batch, logits.shape[-1])
                done = exit_decision(logits, config.exit_criterion, speed.exit_threshold, speed.patience, problem_type,
                                     patience_state, config.regression_tolerance)
                logits_out = retire_exited(stream, patience_state, done, logits, logits_out, exit_layer, layer_number)
            if stream.rows.numel() == 0:
                break
            if next_step is not None:
                prune_tokens(stream, *next_step, config.min_kept_tokens)
        return MagicPyramidClassifierOutput(logits=logits_out, exit_layer=exit_layer, kept_tokens=kept_tokens)


def weights_on_disk(directory, quantize: str | None = None) -> int:
    """Bytes of the graphs `OnnxPyramid` loads (fp32 or int8)."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    suffix = ".int8.onnx" if quantize == "int8" else ".onnx"
    return sum((directory / f"{name}{suffix}").stat().st_size for name in manifest["graphs"])


# ---------------------------------------------------------------------------------------------------------------------
# A stock classifier on ONNX Runtime (one graph), for the benchmark's baselines
# ---------------------------------------------------------------------------------------------------------------------


class OnnxStock:
    """A stock `AutoModelForSequenceClassification` exported whole (`stock.onnx`, optional `stock.int8.onnx`)."""

    def __init__(self, stock, directory, quantize: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        if quantize not in ONNX_METHODS:
            raise ValueError(f"quantize={quantize!r} is not supported for ONNX Runtime; use one of: none, int8.")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        fp32 = self.directory / "stock.onnx"
        if not fp32.is_file():
            input_ids = torch.tensor([[2, 7, 8, 9, 10, 11], [2, 12, 13, 0, 0, 0]]) % stock.config.vocab_size
            attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
            _export(_StockLogits(stock.eval()), (input_ids, attention_mask, torch.zeros_like(input_ids)), fp32,
                    ["input_ids", "attention_mask", "token_type_ids"], ["logits"], stock.config.model_type)
        path = fp32
        if quantize == "int8":
            path = self.directory / "stock.int8.onnx"
            if not path.is_file():
                _quantize_graph(fp32, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.quantization = quantize

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **_ignored):
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        (logits,) = self.session.run(None, {k: feed[k].numpy() for k in self.inputs})
        return MagicPyramidClassifierOutput(logits=torch.from_numpy(logits))


class _StockLogits(nn.Module):
    def __init__(self, stock):
        super().__init__()
        self.stock = stock

    def forward(self, input_ids, attention_mask, token_type_ids):
        kwargs = {"token_type_ids": token_type_ids} if "token_type_ids" in _forward_parameters(self.stock) else {}
        return self.stock(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def _forward_parameters(module) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


__all__ = ["OnnxExportError", "OnnxPyramid", "OnnxStock", "export_pyramid", "onnx_missing", "weights_on_disk"]
