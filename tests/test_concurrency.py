"""Concurrent forwards on one shared model give, bit for bit, what the same calls give one after the other.

A web server calls one model from many threads. Token importance is caught while a layer runs; that capture must
belong to the call, never to the shared modules, or one thread reads another's query/key tensors (a size-mismatch
crash, or silently wrong tokens and logits).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn


from tiny import padded_batch, sharpen_exits, tiny_pyramid  # noqa: E402

from hf_magicpyramid.pruning import _capture_hook  # noqa: E402

THREADS = 8
ROUNDS = 2  # each thread runs its calls this many times, so that calls of different shapes overlap

# (family, attention, pruning options): sdpa reads the first row from the hooked q/K projections, eager from the
# attention probabilities; deberta-v2 (eager only) returns them from its layer call.
CASES = [
    ("bert", "sdpa", dict(token_pruning="topk", keep_ratios=[1.0, 0.7, 0.5, 0.3])),
    ("bert", "eager", dict(token_pruning="threshold", prune_thresholds=[0.0, 0.08, 0.1, 0.12])),
    ("modernbert", "sdpa", dict(token_pruning="threshold", prune_thresholds=[0.0, 0.08, 0.1, 0.12])),
    ("modernbert", "eager", dict(token_pruning="topk", keep_ratios=[1.0, 0.8, 0.6, 0.4], token_importance="mean_attention")),
    ("deberta-v2", "eager", dict(token_pruning="topk", keep_ratios=[1.0, 0.7, 0.5, 0.3])),
]

# Batch shapes and lengths differ per call, so that a tensor caught from another call has the wrong size or content.
SHAPES = [(12, 9, 5, 11), (7,), (16, 3), (10, 10, 10), (4, 14, 8, 6, 12), (9,), (13, 2, 7), (5, 11)]


def _knobs(case_options: dict, call: int) -> dict:
    """Per-call speed settings, different for neighbouring calls."""
    knobs = {"exit_threshold": (None, 0.6, 0.9)[call % 3]}
    if case_options["token_pruning"] == "topk":
        knobs["keep_ratio_scale"] = (1.0, 0.5, 2.0, 0.0)[call % 4]
    else:
        knobs["prune_threshold_offset"] = (0.0, -0.05, 0.04, -1.0)[call % 4]
    return knobs


def _calls(case_options: dict, thread: int) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    calls = []
    for step in range(3):
        call = thread * 3 + step
        input_ids, attention_mask = padded_batch(SHAPES[call % len(SHAPES)], seed=call)
        calls.append((input_ids, attention_mask, _knobs(case_options, call)))
    return calls


def _run(model, input_ids, attention_mask, knobs):
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, **knobs)
    return out.logits, out.exit_layer, out.kept_tokens


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Tiny models gain nothing from torch's intra-op pool, and 8 callers on a loaded CPU would wait on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _yield_before_every_linear(model) -> None:
    """Let other threads run before each Linear, as a real model's long matmuls do: the calls then interleave inside
    every layer, between a layer's projections, instead of only where the tiny model happens to release the GIL."""

    def yield_thread(module, inputs):
        time.sleep(1e-4)

    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(yield_thread)


@pytest.mark.parametrize("family,attn,options", CASES, ids=[f"{f}-{a}-{o['token_pruning']}" for f, a, o in CASES])
def test_threads_sharing_one_model_equal_sequential_calls(family, attn, options):
    def build():
        return sharpen_exits(tiny_pyramid(family, attn_implementation=attn, exit_criterion="entropy", **options), std=3.0)

    # The sequential reference runs on an identical copy, so that the threads also race to install the capture hooks.
    reference, model = build(), build()
    work = {thread: _calls(options, thread) for thread in range(THREADS)}
    expected = {thread: [_run(reference, *call) for call in calls] for thread, calls in work.items()}
    _yield_before_every_linear(model)
    # The cases must really exercise pruning and exits, or the comparison proves little.
    kept = torch.cat([result[2][:, -1] for results in expected.values() for result in results])
    exits = torch.cat([result[1] for results in expected.values() for result in results])
    assert bool((kept < kept.max()).any()) and bool((exits < 4).any()) and bool((exits == 4).any())

    results: dict[int, list] = {thread: [] for thread in range(THREADS)}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(thread: int):
        try:
            start.wait()
            for _ in range(ROUNDS):
                results[thread].extend(_run(model, *call) for call in work[thread])
        except BaseException as error:  # re-raised below, in the test's own thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(thread,)) for thread in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for thread in range(THREADS):
        for index, got in enumerate(results[thread]):
            want = expected[thread][index % len(work[thread])]
            for name, a, b in zip(("logits", "exit_layer", "kept_tokens"), got, want):
                assert torch.equal(a, b), f"thread {thread}, call {index}: {name} differs from the sequential call"
    # Capture hooks are installed once per module however many threads reached it first (none where the layer call
    # itself returns the probabilities).
    installed = [sum(hook is _capture_hook for hook in module._forward_hooks.values()) for module in model.modules()]
    assert max(installed) == (0 if model.driver.returns_attention else 1)
