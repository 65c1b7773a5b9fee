"""Sharing on the Hub: model card, push (the model and nothing else), loading back with and without the plugin,
failures, the remote-code file set, and presets.

Pushes go to `LocalHub` (tests/hub_server.py), a local server speaking the Hub API, through the real `huggingface_hub`
client. The remote-code loads run in a fresh Python process where `hf_magicpyramid` cannot be imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace


import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import HfApi, ModelCard, hf_hub_download  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline  # noqa: E402

import hf_magicpyramid  # noqa: E402
from hf_magicpyramid import MagicPyramidConfig, MagicPyramidForSequenceClassification  # noqa: E402
from hf_magicpyramid.adapters import check_supported  # noqa: E402
from hf_magicpyramid.exits import normalized_entropy  # noqa: E402
from hf_magicpyramid.modeling_magic_pyramid import REMOTE_CODE_FILES  # noqa: E402
from hf_magicpyramid.calibration import load_calibration, save_calibration, validate_calibration  # noqa: E402
from hf_magicpyramid.hub import (  # noqa: E402
    CARD_MARKER,
    HubAuthenticationError,
    HubConnectionError,
    HubPushError,
    check_model_folder,
    push_to_hub,
    render_model_card,
    scrub_local_paths,
    write_model_card,
)
from hf_magicpyramid.presets import (  # noqa: E402
    available_presets,
    config_from_preset,
    load_preset,
    preset_dirs,
    pyramid_options,
)
from hub_server import LocalHub, hub_environment  # noqa: E402
from tiny import padded_batch, tiny_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "A gripping, beautifully shot film.",
    "Dull.",
    "The plot wanders, the jokes fall flat, and the two leads never seem to share the same movie.",
    "An instant classic that rewards a second viewing.",
    "Not bad, not good, simply there.",
    "Loud and hollow.",
]
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)
EXPECTED_CODE = set(REMOTE_CODE_FILES)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(autouse=True)
def no_retry_sleeps(monkeypatch):
    """huggingface_hub retries a refused connection with 1-8 s sleeps: keep the retries, skip the sleeps."""
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=lambda seconds: None, time=hf_http.time.time))


def tiny_bert_config(num_labels: int):
    # The real tokenizer's vocabulary (30522) with a tiny body, so that tokenized text runs through it.
    return tiny_config("bert", num_labels=num_labels, vocab_size=30522, max_position_embeddings=128)


def run_model(model, tokenizer):
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return {"input_ids": inputs["input_ids"], "logits": out.logits, "exit_layer": out.exit_layer}


def split_threshold(scores: torch.Tensor) -> float:
    """A threshold between two sorted scores (largest gap), so some samples are below it and some above."""
    ordered = scores.sort().values
    gaps = ordered[1:] - ordered[:-1]
    k = int(gaps.argmax())
    return float((ordered[k] + ordered[k + 1]) / 2)


def build_trained_pyramid(tokenizer) -> MagicPyramidForSequenceClassification:
    """Tiny bert → exits after layers 1-3 + top-k pruning, one optimizer step, speed set so that some samples exit at 1."""
    torch.manual_seed(0)
    stock = AutoModelForSequenceClassification.from_config(tiny_bert_config(2))
    model = MagicPyramidForSequenceClassification.from_backbone(
        stock, exit_layers=[1, 2, 3], token_pruning="topk", keep_ratios=[1.0, 0.8, 0.6, 0.5]
    )
    initial_exit = model.exits["1"].classifier.weight.detach().clone()
    batch = tokenizer(TEXTS + ["Great.", "Awful, just awful."], padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 0, 1, 0, 0, 1, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(**batch, labels=labels).loss.backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(model.exits["1"].classifier.weight, initial_exit)
    with torch.no_grad():
        inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
        first_exit = model(**inputs, output_all_exits=True).exit_logits[0]
    model.set_speed(exit_threshold=split_threshold(normalized_entropy(first_exit)))
    return model


def build_slender(tokenizer) -> MagicPyramidForSequenceClassification:
    torch.manual_seed(1)
    config = MagicPyramidConfig(
        backbone_config=tiny_bert_config(3),
        heads_per_layer=[4, 2, 1, 3],
        ffn_per_layer=[37, 20, 8, 16],
        exit_layers=[2, 3],
        exit_criterion="confidence",
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    model = MagicPyramidForSequenceClassification(config).eval()
    assert model.layer_widths() == [(4, 37), (2, 20), (1, 8), (3, 16)]
    with torch.no_grad():
        inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
        second_exit = model(**inputs, output_all_exits=True).exit_logits[0]
    model.set_speed(exit_threshold=split_threshold(second_exit.softmax(-1).max(-1).values))
    return model


REMOTE_LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPlugin(importlib.abc.MetaPathFinder):
        # This machine "does not have" hf-magicpyramid: any import of it fails, as if it were not installed.
        def find_spec(self, name, path=None, target=None):
            if name == "hf_magicpyramid" or name.startswith("hf_magicpyramid."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, BlockPlugin())
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = json.load(open(sys.argv[1]))
    results = {}
    for key, item in spec["loads"].items():
        model = AutoModelForSequenceClassification.from_pretrained(
            item["repo"], revision=item.get("revision"), trust_remote_code=True
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(item["repo"], revision=item.get("revision"))
        inputs = tokenizer(spec["texts"], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
        results[key] = {
            "input_ids": inputs["input_ids"].tolist(),
            "logits": out.logits.tolist(),
            "exit_layer": out.exit_layer.tolist(),
            "class": type(model).__module__ + "." + type(model).__name__,
        }
    from transformers import pipeline

    classifier = pipeline("text-classification", model=spec["pipeline_repo"], trust_remote_code=True)
    results["pipeline"] = classifier(spec["texts"][:2])
    try:
        import hf_magicpyramid  # noqa: F401
        results["plugin"] = "importable"
    except ModuleNotFoundError:
        results["plugin"] = "blocked"
    results["plugin_modules"] = sorted(m for m in sys.modules if m.startswith("hf_magicpyramid"))
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def load_remotely(loads: dict, workdir: Path) -> dict:
    """Load each {key: {"repo", "revision"}} with trust_remote_code=True in a fresh process without the plugin."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "loader.py").write_text(REMOTE_LOADER)
    spec = {"loads": loads, "texts": TEXTS, "pipeline_repo": next(iter(loads.values()))["repo"]}
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    fresh = workdir / "fresh_hf_home"  # a machine that has never seen these repos
    env.update(HF_HOME=str(fresh), HF_HUB_CACHE=str(fresh / "hub"), HUGGINGFACE_HUB_CACHE=str(fresh / "hub"),
               HF_MODULES_CACHE=str(fresh / "modules"), HF_TOKEN_PATH=str(fresh / "token"))
    proc = subprocess.run(
        [sys.executable, "-I", str(workdir / "loader.py"), str(workdir / "spec.json"), str(workdir / "out.json")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((workdir / "out.json").read_text())


def assert_same_outputs(remote: dict, expected: dict):
    assert remote["input_ids"] == expected["input_ids"].tolist()
    assert remote["exit_layer"] == expected["exit_layer"].tolist()
    torch.testing.assert_close(torch.tensor(remote["logits"]), expected["logits"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Publish once: (a) a trained-ish pyramid with a tokenizer and a calibration, twice; (b) a slender one through the CLI
# with the user's own README; (c) a folder that lost its code files. Then load all of them in a fresh process.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(tmp_path_factory, minilm_path):
    import huggingface_hub.utils._http as hf_http

    root = tmp_path_factory.mktemp("published")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)  # the real tokenizer shipped with all-MiniLM-L6-v2
    hub = LocalHub().start()
    mp = pytest.MonkeyPatch()
    mp.setattr(hf_http, "time", SimpleNamespace(sleep=lambda seconds: None, time=hf_http.time.time))
    try:
        with hub_environment(hub, root / "client"):
            # (a) v1, with a calibration result and plot
            model_a = build_trained_pyramid(tokenizer)
            dir_a = root / "model_a"
            model_a.save_pretrained(dir_a)
            tokenizer.save_pretrained(dir_a)
            threshold = model_a.config.exit_threshold
            save_calibration(
                dir_a,
                [
                    {"setting": {"exit_threshold": None, "keep_ratio_scale": 1.0}, "accuracy": 50.0, "mean_exit_layer": 4.0,
                     "kept_token_fraction": 0.8, "flops_ratio": 0.85, "measured_speedup": 1.1},
                    {"setting": {"exit_threshold": threshold, "keep_ratio_scale": 1.0}, "accuracy": 50.0,
                     "mean_exit_layer": 2.5, "kept_token_fraction": 0.6, "flops_ratio": 0.55},
                ],
                dataset="six test sentences", num_samples=len(TEXTS), batch_size=6, device="cpu",
                stock={"accuracy": 50.0},
            )
            (dir_a / "calibration.png").write_bytes(TINY_PNG)
            expected_a1 = run_model(model_a, tokenizer)
            hashes_a1 = folder_hashes(dir_a)
            commit_a1 = push_to_hub(dir_a, "alice/tiny-pyramid", token=hub.token)
            files_a1 = set(HfApi(endpoint=hub.endpoint).list_repo_files("alice/tiny-pyramid"))
            assert folder_hashes(dir_a) == hashes_a1  # nothing written into the user's folder

            # (c) the same folder without its code files and auto_map (e.g. saved before the classes were registered)
            dir_c = root / "model_c"
            shutil.copytree(dir_a, dir_c)
            code_files = {path.name for path in dir_a.glob("*.py")}
            assert code_files == EXPECTED_CODE  # save_pretrained wrote exactly the declared custom code
            for name in code_files:
                (dir_c / name).unlink()
            config_c = json.loads((dir_c / "config.json").read_text())
            del config_c["auto_map"]
            (dir_c / "config.json").write_text(json.dumps(config_c, indent=2))
            hashes_c = folder_hashes(dir_c)
            commit_c = push_to_hub(dir_c, "alice/restored-code", token=hub.token)
            assert folder_hashes(dir_c) == hashes_c

            # (b) slender, with a README the user wrote
            model_b = build_slender(tokenizer)
            dir_b = root / "model_b"
            model_b.save_pretrained(dir_b)
            tokenizer.save_pretrained(dir_b)
            (dir_b / "README.md").write_text("# My slender model\n\nWritten by hand.\n")
            expected_b = run_model(model_b, tokenizer)
            commit_b = push_to_hub(dir_b, "alice/slender", token=hub.token, commit_message="slender v1")
            assert str(commit_b) == commit_b.commit_url and commit_b.oid in commit_b.commit_url  # a str: the commit URL

            # (a) v2: a changed model, re-saved and pushed again
            with torch.no_grad():
                model_a.exits["1"].classifier.bias.add_(torch.tensor([2.0, -2.0]))
                model_a.backbone.classifier.weight.mul_(-1.0)
            model_a.save_pretrained(dir_a)
            expected_a2 = run_model(model_a, tokenizer)
            commit_a2 = push_to_hub(dir_a, "alice/tiny-pyramid", token=hub.token, commit_message="v2")

            remote = load_remotely(
                {
                    "a_v1": {"repo": "alice/tiny-pyramid", "revision": commit_a1.oid},
                    "a_main": {"repo": "alice/tiny-pyramid"},
                    "b": {"repo": "alice/slender"},
                    "c": {"repo": "alice/restored-code"},
                },
                root / "remote",
            )
        yield SimpleNamespace(
            hub=hub, root=root, tokenizer=tokenizer, dir_a=dir_a, dir_b=dir_b, dir_c=dir_c, model_b=model_b,
            expected_a1=expected_a1, expected_a2=expected_a2, expected_b=expected_b, commit_a1=commit_a1,
            commit_a2=commit_a2, commit_c=commit_c, files_a1=files_a1, code_files=code_files, remote=remote, threshold=threshold,
        )
    finally:
        mp.undo()
        hub.stop()


def test_push_uploads_a_complete_repo(published):
    assert published.files_a1 == {".gitattributes", "config.json", "model.safetensors", "README.md", "tokenizer.json",
                                  "tokenizer_config.json", "calibration.json", "calibration.png"} | published.code_files
    assert not any(name.startswith("README") for name in os.listdir(published.dir_a))  # the card was never written locally
    assert published.commit_a2.oid != published.commit_a1.oid
    assert published.hub.unhandled == []


def test_trained_model_exits_early_and_loads_without_the_plugin(published):
    remote = published.remote
    assert remote["plugin"] == "blocked" and remote["plugin_modules"] == []
    assert remote["a_v1"]["class"].startswith("transformers_modules.")
    exits = published.expected_a1["exit_layer"]
    assert (exits == 1).any() and (exits > 1).any()  # the speed set makes some samples leave at the first exit
    assert_same_outputs(remote["a_v1"], published.expected_a1)
    assert_same_outputs(remote["a_main"], published.expected_a2)
    assert not torch.equal(published.expected_a1["logits"], published.expected_a2["logits"])
    assert [set(row) for row in remote["pipeline"]] == [{"label", "score"}] * 2  # the pipeline works on remote code too


def test_slender_model_loads_without_the_plugin(published):
    assert_same_outputs(published.remote["b"], published.expected_b)


def test_missing_code_files_are_restored_in_the_upload(published, tmp_path):
    assert_same_outputs(published.remote["c"], published.expected_a1)
    assert not any(name.endswith(".py") for name in os.listdir(published.dir_c))  # the user's folder was left alone
    with hub_environment(published.hub, tmp_path):
        config = json.loads(Path(hf_hub_download("alice/restored-code", "config.json")).read_text())
        files = set(HfApi().list_repo_files("alice/restored-code"))
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}
    assert published.code_files <= files


def test_loads_with_the_plugin_and_no_remote_code(published, tmp_path):
    with hub_environment(published.hub, tmp_path):
        old = AutoModelForSequenceClassification.from_pretrained("alice/tiny-pyramid", revision=published.commit_a1.oid)
        new = AutoModelForSequenceClassification.from_pretrained("alice/tiny-pyramid")
        slender = AutoModelForSequenceClassification.from_pretrained("alice/slender")
        classifier = pipeline("text-classification", model="alice/slender")
        assert {row["label"] for row in classifier(TEXTS)} <= {"negative", "neutral", "positive"}
    assert type(old) is MagicPyramidForSequenceClassification  # the installed class, not the repo's code
    for model, expected in ((old, published.expected_a1), (new, published.expected_a2), (slender, published.expected_b)):
        got = run_model(model.eval(), published.tokenizer)
        assert torch.equal(got["exit_layer"], expected["exit_layer"])
        torch.testing.assert_close(got["logits"], expected["logits"], rtol=0, atol=1e-6)


def test_generated_model_card(published, tmp_path):
    with hub_environment(published.hub, tmp_path):
        card = ModelCard.load("alice/tiny-pyramid")
        user_card = Path(hf_hub_download("alice/slender", "README.md")).read_text()
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
    assert data["license"] == "apache-2.0"
    assert {"magic-pyramid", "early-exit", "token-pruning", "bert"} <= set(data["tags"])
    assert "base_model" not in data  # the tiny backbone came from no Hub checkpoint
    text = card.text
    assert CARD_MARKER in text
    assert "import hf_magicpyramid" in text and 'pipeline("text-classification", model="alice/tiny-pyramid")' in text
    assert 'from_pretrained("alice/tiny-pyramid").eval()' in text
    assert 'from_pretrained("alice/tiny-pyramid", trust_remote_code=True' in text
    assert "Remote code and security" in text and "revision=" in text
    assert "exits after layers 1, 2, 3, 4" in text and "keep_ratios" in text and "1, 0.8, 0.6, 0.5" in text
    assert f"`exit_threshold = {published.threshold:g}`" in text
    assert "Full width" in text
    assert "![Accuracy against speed at each setting](calibration.png)" in text
    assert "| never | 1 | 50.00% | 4.00 | 80% | 85% | 1.10x |  |" in text and "| 50.00% | 2.50 | 60% | 55% | - | **default** |" in text
    assert "six test sentences" in text and "| stock model |" in text
    assert user_card == "# My slender model\n\nWritten by hand.\n"  # the user's own card is kept


def test_slender_card_shows_the_widths(published, tmp_path):
    card = write_model_card(published.dir_b, tmp_path, repo_id="alice/slender").read_text()
    assert "| 2 | 2 | 20 |" in card and "| 3 | 1 | 8 |" in card and "slenderized" in card
    assert "largest probability is above `exit_threshold`" in card
    assert "Off: every layer runs on every token." in card
    assert "2: positive" in card


# ---------------------------------------------------------------------------------------------------------------------
# Failures: clear errors, nothing lost locally
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_folder(published, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(published.dir_b, folder)
    (folder / "README.md").unlink()
    return folder


def test_server_down_before_push(small_folder, tmp_path):
    hub = LocalHub().start()
    with hub_environment(hub, tmp_path / "client"):
        endpoint = hub.endpoint
        before = folder_hashes(small_folder)
        hub.stop()
        with pytest.raises(HubConnectionError, match="Could not reach the Hub at " + endpoint) as error:
            push_to_hub(small_folder, "alice/down", token=hub.token)
    assert "Nothing was changed in the local folder" in str(error.value)
    assert folder_hashes(small_folder) == before


def test_server_down_mid_push(small_folder, tmp_path, monkeypatch):
    hub = LocalHub().start()
    original = HfApi.create_repo

    def create_then_die(self, *args, **kwargs):
        url = original(self, *args, **kwargs)
        hub.stop()  # the repo exists, then the server goes away before the upload
        return url

    monkeypatch.setattr(HfApi, "create_repo", create_then_die)
    with hub_environment(hub, tmp_path / "client"):
        endpoint = hub.endpoint
        before = folder_hashes(small_folder)
        with pytest.raises(HubConnectionError, match=endpoint):
            push_to_hub(small_folder, "alice/midway", token=hub.token)
    assert folder_hashes(small_folder) == before
    repo = hub.repos[("model", "alice/midway")]
    assert len(repo.commits) == 1  # only the initial commit: no partial upload


def test_server_error_mid_push(small_folder, tmp_path, monkeypatch):
    import hub_server

    def failing_commit(self, *args, **kwargs):
        raise hub_server.HubError(500, "storage backend unavailable")

    monkeypatch.setattr(hub_server._HubHandler, "_commit", failing_commit)
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client"):
        before = folder_hashes(small_folder)
        with pytest.raises(HubConnectionError, match=r"failed \(HTTP 500\)") as error:
            push_to_hub(small_folder, "alice/broken", token=hub.token)
        assert hub.endpoint in str(error.value)
    assert folder_hashes(small_folder) == before


@pytest.mark.parametrize("bad", ["alice/bad name", "alice/x/y", "alice/a--b", "alice/model.git", "-alice/model", ""])
def test_invalid_repo_id_fails_before_any_request(small_folder, tmp_path, bad):
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client"):
        with pytest.raises(ValueError, match="Invalid Hub repo id") as error:
            push_to_hub(small_folder, bad, token=hub.token)
        assert hub.requests == []
    assert repr(bad) in str(error.value) and "namespace/name" in str(error.value)


def test_repo_id_refused_by_the_server(small_folder, tmp_path):
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client"):
        with pytest.raises(ValueError, match="refused the repo id 'alice/_underscore'"):
            push_to_hub(small_folder, "alice/_underscore", token=hub.token)


def test_missing_or_wrong_token(small_folder, tmp_path):
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client", login=False):
        before = folder_hashes(small_folder)
        with pytest.raises(HubAuthenticationError) as error:
            push_to_hub(small_folder, "alice/no-token")
        message = str(error.value)
        assert "--token" in message and "HF_TOKEN" in message and "hf auth login" in message
        with pytest.raises(HubAuthenticationError, match="refused the token"):
            push_to_hub(small_folder, "alice/no-token", token="hf_wrong")
        assert hub.repos == {}
    assert folder_hashes(small_folder) == before


def test_token_from_the_environment(small_folder, tmp_path):
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client", login=True):
        commit = push_to_hub(small_folder, "alice/env-token", revision="dev", private=True)
        api = HfApi()
        assert api.model_info("alice/env-token").private is True
        assert api.model_info("alice/env-token", revision="dev").sha == commit.oid
        assert "README.md" not in api.list_repo_files("alice/env-token")  # main untouched: the push went to "dev"
        assert "README.md" in api.list_repo_files("alice/env-token", revision="dev")


def test_folder_problems_fail_before_any_request(published, stock_dir, tmp_path):
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client"):
        with pytest.raises(ValueError, match="not a Magic Pyramid model"):
            push_to_hub(stock_dir("bert"), "alice/stock", token=hub.token)
        with pytest.raises(FileNotFoundError, match="does not exist"):
            push_to_hub(tmp_path / "nowhere", "alice/nowhere", token=hub.token)
        no_tokenizer = tmp_path / "no_tokenizer"
        shutil.copytree(published.dir_b, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
        with pytest.raises(ValueError, match="No tokenizer"):
            push_to_hub(no_tokenizer, "alice/no-tokenizer", token=hub.token)
        no_weights = tmp_path / "no_weights"
        shutil.copytree(published.dir_b, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
        (no_weights / "pytorch_model.bin").write_bytes(b"pickle")
        with pytest.raises(ValueError, match="No model.safetensors .*pytorch_model.bin"):
            push_to_hub(no_weights, "alice/no-weights", token=hub.token)
        assert hub.requests == []
        # Without a tokenizer, on request.
        commit = push_to_hub(no_tokenizer, "alice/no-tokenizer", token=hub.token, require_tokenizer=False)
        assert commit.oid


# ---------------------------------------------------------------------------------------------------------------------
# What a push uploads: the model and nothing else, no local path, the folder untouched
# ---------------------------------------------------------------------------------------------------------------------

MODEL_ALLOWLIST = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "calibration.json",
                   "calibration.png", "README.md"} | EXPECTED_CODE


def make_train_output(published, folder: Path) -> Path:
    """A folder shaped like `hf-magicpyramid train` output: the final model at the root, stage folders with model copies
    and Trainer checkpoints, a training summary full of absolute paths, a stray pickled state dict, and configs that
    name the local folders the models were loaded from (as training leaves them)."""
    shutil.copytree(published.dir_a, folder)
    root = str(folder.resolve())
    for stage in ("stage1_finetune", "stage4_exits"):
        shutil.copytree(published.dir_a, folder / stage / "model", ignore=shutil.ignore_patterns("*.py", "calibration*", "tokenizer*"))
        (folder / stage / "stage.json").write_text(json.dumps({"stage": stage, "model_dir": f"{root}/{stage}/model"}))
        checkpoint = folder / stage / "checkpoints" / "checkpoint-10"
        checkpoint.mkdir(parents=True)
        (checkpoint / "optimizer.pt").write_bytes(b"\x80\x04pickle")
        (checkpoint / "trainer_state.json").write_text(json.dumps({"best_model_checkpoint": str(checkpoint)}))
    (folder / "training_summary.json").write_text(json.dumps({
        "output_dir": root,
        "backbone": "/home/someone/models/MiniLM",
        "train_file": f"{root}/../data/train.csv",
        "stages": {"stage4_exits": {"model_dir": f"{root}/stage4_exits/model",
                                    "log": f"resumed from {root}/stage4_exits/checkpoints/checkpoint-10"}},
    }, indent=2))
    torch.save({"weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickle")
    config = json.loads((folder / "config.json").read_text())
    config["backbone_config"]["_name_or_path"] = f"{root}/stage3_pruned_finetune/model"
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["name_or_path"] = str(published.dir_a.resolve())  # what older transformers versions saved
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    calibration = json.loads((folder / "calibration.json").read_text())
    calibration["dataset"] = f"{root}/data/test.csv"
    (folder / "calibration.json").write_text(json.dumps(calibration, indent=2))
    # What `sweep --quantize int8` writes beside it (`load_quantized` reads it): part of the model too.
    (folder / "calibration_int8.json").write_text(json.dumps({**calibration, "quantization": "int8"}, indent=2))
    return folder


def test_push_of_a_train_output_folder_uploads_the_model_only(published, tmp_path):
    folder = make_train_output(published, tmp_path / "train_out")
    before = folder_hashes(folder)
    with hub_environment(published.hub, tmp_path / "client"):
        commit = push_to_hub(folder, "alice/from-train", token=published.hub.token)
        files = set(HfApi().list_repo_files("alice/from-train", revision=commit.oid))
        uploaded = {name: Path(hf_hub_download("alice/from-train", name, revision=commit.oid)).read_bytes()
                    for name in files - {".gitattributes"}}
        reloaded = AutoModelForSequenceClassification.from_pretrained("alice/from-train", revision=commit.oid).eval()
    # no stage copies, summary, checkpoints or pickles; the int8 calibration goes with the model
    assert files == MODEL_ALLOWLIST | {".gitattributes", "calibration_int8.json"}
    assert folder_hashes(folder) == before  # the user's folder is byte-identical
    local_paths = {str(folder), str(folder.resolve()), str(tmp_path.resolve()), str(published.root.resolve()), "/home/someone"}
    for name, data in uploaded.items():
        assert not [path for path in local_paths if path.encode() in data], name
    # Only the paths changed: the rest of each file is as saved, and the card reads the scrubbed calibration.
    config = json.loads(uploaded["config.json"])
    saved = json.loads((folder / "config.json").read_text())
    saved["backbone_config"]["_name_or_path"] = ""
    assert config == saved
    tokenizer_config = json.loads(uploaded["tokenizer_config.json"])
    assert tokenizer_config == {**json.loads((folder / "tokenizer_config.json").read_text()), "name_or_path": ""}
    assert json.loads(uploaded["calibration.json"])["dataset"] == "test.csv"
    assert json.loads(uploaded["calibration_int8.json"])["dataset"] == "test.csv"
    assert "(on test.csv; samples: 6" in uploaded["README.md"].decode()
    for name in ("model.safetensors", "tokenizer.json", "calibration.png", *EXPECTED_CODE):
        assert uploaded[name] == (folder / name).read_bytes()
    local = MagicPyramidForSequenceClassification.from_pretrained(folder).eval()
    assert type(reloaded) is MagicPyramidForSequenceClassification
    expected, got = run_model(local, published.tokenizer), run_model(reloaded, published.tokenizer)
    assert torch.equal(got["logits"], expected["logits"]) and torch.equal(got["exit_layer"], expected["exit_layer"])


def test_include_adds_named_files_and_never_pickles(published, tmp_path):
    folder = make_train_output(published, tmp_path / "train_out")
    (folder / "LICENSE").write_text("Apache-2.0\n")
    before = folder_hashes(folder)
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client"):
        for include, message in [
            (["*.bin"], r"matches pickled files \(pytorch_model.bin, training_args.bin\)"),
            (["stage4_exits"], r"matches pickled files \(stage4_exits/checkpoints/checkpoint-10/optimizer.pt\)"),
            ("pytorch_model.bin", "never pushed"),
            (["LICENCE"], "'LICENCE' matches no file"),
        ]:
            with pytest.raises(ValueError, match=message):
                push_to_hub(folder, "alice/included", token=hub.token, include=include)
        assert hub.requests == []  # refused before any request
        push_to_hub(folder, "alice/included", token=hub.token,
                    include=["LICENSE", "training_summary.json", "stage4_exits/model/*"])
        files = set(HfApi().list_repo_files("alice/included"))
        summary = json.loads(Path(hf_hub_download("alice/included", "training_summary.json")).read_text())
        stage_config = Path(hf_hub_download("alice/included", "stage4_exits/model/config.json")).read_text()
    assert files == MODEL_ALLOWLIST | {".gitattributes", "calibration_int8.json", "LICENSE", "training_summary.json",
                                       "stage4_exits/model/config.json", "stage4_exits/model/model.safetensors"}
    assert summary == {"output_dir": "train_out", "backbone": "MiniLM", "train_file": "train.csv",
                       "stages": {"stage4_exits": {"model_dir": "model", "log": "resumed from checkpoint-10"}}}
    assert str(tmp_path.resolve()) not in stage_config
    assert folder_hashes(folder) == before


def test_plan_of_a_saved_folder_uploads_the_users_files_by_path(published, tmp_path):
    plan = check_model_folder(published.dir_b)
    contents = plan.contents("alice/slender")
    assert set(contents) == {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"} | EXPECTED_CODE
    assert contents == {name: published.dir_b / name for name in contents}  # nothing to generate, nothing copied
    assert plan.card is None  # the user's README.md goes as it is
    # A folder that lost its code files and auto_map: the code comes from the package as bytes, the config completed.
    plan = check_model_folder(published.dir_c)
    generated = {name for name, source in plan.contents("alice/x").items() if isinstance(source, bytes)}
    assert generated == EXPECTED_CODE | {"config.json", "README.md"}


def test_parameter_count_from_the_safetensors_headers(published, tmp_path):
    count = MagicPyramidForSequenceClassification.from_pretrained(published.dir_a).num_parameters()
    assert check_model_folder(published.dir_a).card["num_parameters"] == count
    assert f"{count / 1e6:.1f}M parameters" in write_model_card(published.dir_a, tmp_path / "card").read_text()
    broken = tmp_path / "broken"
    shutil.copytree(published.dir_b, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client"):
        with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
            push_to_hub(broken, "alice/broken", token=hub.token)
        assert hub.requests == []


def test_a_card_this_package_wrote_is_regenerated_at_push(small_folder, tmp_path):
    write_model_card(small_folder, small_folder)  # no repo id yet: placeholders
    assert "<username>/<model-name>" in (small_folder / "README.md").read_text()
    before = folder_hashes(small_folder)
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client"):
        push_to_hub(small_folder, "alice/regenerated", token=hub.token)
        card = Path(hf_hub_download("alice/regenerated", "README.md")).read_text()
    assert CARD_MARKER in card and 'from_pretrained("alice/regenerated")' in card and "<username>" not in card
    assert folder_hashes(small_folder) == before


def test_exist_ok_false_refuses_an_existing_repo(small_folder, tmp_path):
    with LocalHub() as hub, hub_environment(hub, tmp_path / "client"):
        push_to_hub(small_folder, "alice/once", token=hub.token, exist_ok=False)
        with pytest.raises(HubPushError, match="'alice/once' already exists .*exist_ok=True"):
            push_to_hub(small_folder, "alice/once", token=hub.token, exist_ok=False)


def test_scrub_local_paths():
    roots = ["/home/alice/work"]
    data = {
        "_name_or_path": "/home/alice/work/stage3/model",
        "backbone_config": {"_name_or_path": "google-bert/bert-base-uncased"},
        "dataset": "C:\\Users\\alice\\data\\test.csv",
        "note": "saved in /home/alice/work/out/model, then evaluated",
        "home": "~/models/minilm",
        "tokens": ["</s>", "/", "a/b", "1/2", "[/INST]"],
        "url": "https://example.com/a/b",
        "count": 3,
    }
    assert scrub_local_paths(data, roots) == {
        **data,
        "_name_or_path": "",
        "dataset": "test.csv",
        "note": "saved in model, then evaluated",
        "home": "minilm",
    }
    assert scrub_local_paths({"name_or_path": "out/model"}, roots) == {"name_or_path": "out/model"}  # not on this machine

# ---------------------------------------------------------------------------------------------------------------------
# Model card and calibration, offline
# ---------------------------------------------------------------------------------------------------------------------


def test_card_names_the_base_model_from_the_hub_only(tmp_path):
    config = MagicPyramidConfig(backbone_config=tiny_config("bert"), token_pruning="threshold", exit_criterion="patience", patience=2)
    config.backbone_config._name_or_path = "google-bert/bert-base-uncased"
    card = render_model_card(config, license="mit")
    assert "base_model: google-bert/bert-base-uncased" in card and "license: mit" in card
    assert "`patience = 2`" in card and "prune_threshold_offset" in card
    config.backbone_config._name_or_path = str(tmp_path)  # a local folder is not a Hub id
    assert "base_model" not in render_model_card(config)


def test_write_model_card_keeps_a_card_written_by_hand(published, tmp_path):
    (tmp_path / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_model_card(published.dir_b, tmp_path)
    assert (tmp_path / "README.md").read_text() == "mine"
    write_model_card(published.dir_b, tmp_path, overwrite=True)
    write_model_card(published.model_b, tmp_path)  # its own card is replaced without asking
    assert CARD_MARKER in (tmp_path / "README.md").read_text()


def test_calibration_format(published, tmp_path):
    data = load_calibration(published.dir_a)
    assert data["format"] == "hf-magicpyramid-calibration" and len(data["points"]) == 2
    assert data["points"][1]["measured_speedup"] is None
    assert load_calibration(tmp_path) is None
    header = {"format": "hf-magicpyramid-calibration", "version": 1}
    good = {"setting": {"exit_threshold": 0.2}, "accuracy": 90.0, "mean_exit_layer": 2.0, "kept_token_fraction": 1.0,
            "flops_ratio": 0.5, "measured_speedup": 2.0}
    flat = {"exit_threshold": 0.2, "keep_ratio_scale": 1.5, "accuracy": 90.0, "mean_exit_layer": 2.0,
            "kept_token_fraction": 0.7, "flops_ratio": 0.4, "speedup": 2.5}
    normalized = validate_calibration({**header, "points": [good, flat]})["points"]
    assert normalized[1]["setting"] == {"exit_threshold": 0.2, "keep_ratio_scale": 1.5}
    assert normalized[1]["measured_speedup"] == 2.5
    for bad, message in [
        ({**header, "points": []}, "non-empty"),
        ({**header, "points": [{**good, "accuracy": 190}]}, "accuracy"),
        ({**header, "points": [{k: v for k, v in good.items() if k != "flops_ratio"}]}, "flops_ratio"),
        ({**header, "points": [{k: v for k, v in good.items() if k != "setting"}]}, "no speed knob"),
        ({**header, "points": [{**good, "setting": {"exit_threshold": 0.2, "patience": 2}}]}, "two knobs"),
        ({**header, "points": [{**good, "setting": {"speed": 2}}]}, "unknown knobs"),
        ({"format": "hf-magicpyramid-calibration", "version": 2, "points": [good]}, "not supported"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate_calibration(bad)


def test_card_table_shows_the_frontier_of_many_points():
    config = MagicPyramidConfig(backbone_config=tiny_config("bert"), token_pruning="topk", exit_threshold=0.3)
    points = [
        {"setting": {"exit_threshold": t, "keep_ratio_scale": s}, "accuracy": 90.0 - 10 * t - s, "mean_exit_layer": 4 - 5 * t,
         "kept_token_fraction": 0.9 / s, "flops_ratio": (1 - t) / s}
        for t in (0.1, 0.2, 0.3, 0.4, 0.5) for s in (1.0, 2.0, 3.0)
    ]
    calibration = validate_calibration({"format": "hf-magicpyramid-calibration", "version": 1, "points": points})
    card = render_model_card(config, calibration=calibration)
    rows = [line for line in card.splitlines() if line.startswith("| ") and "%" in line]
    assert "15 settings were measured" in card and 1 <= len(rows) < 15
    assert sum("**default**" in row for row in rows) == 1  # the saved speed (0.3, scale 1.0) is always shown


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

PRESETS = {  # name: (family, depth, checkpoint)
    "bert-base-uncased": ("bert", 12, "google-bert/bert-base-uncased"),
    "roberta-base": ("roberta", 12, "FacebookAI/roberta-base"),
    "distilbert-base-uncased": ("distilbert", 6, "distilbert/distilbert-base-uncased"),
    "all-MiniLM-L6-v2": ("bert", 6, "sentence-transformers/all-MiniLM-L6-v2"),
    "electra-base": ("electra", 12, "google/electra-base-discriminator"),
    "deberta-v3-base": ("deberta-v2", 12, "microsoft/deberta-v3-base"),
    "mpnet-base": ("mpnet", 12, "microsoft/mpnet-base"),
    "ModernBERT-base": ("modernbert", 22, "answerdotai/ModernBERT-base"),
    "xlm-roberta-base": ("xlm-roberta", 12, "FacebookAI/xlm-roberta-base"),
}


def test_presets_live_in_hub_configs():
    assert preset_dirs()[0] == REPO_ROOT / "hub_configs"
    assert sorted(available_presets()) == sorted(PRESETS)
    assert sorted(p.stem for p in (REPO_ROOT / "hub_configs").glob("*.json")) == sorted(PRESETS)


def depth_overrides(family: str, depth: int) -> dict:
    return {"n_layers": depth} if family == "distilbert" else {"num_hidden_layers": depth}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_a_model_of_its_family(name):
    family, depth, checkpoint = PRESETS[name]
    preset = load_preset(name)
    assert preset["backbone"] == {**preset["backbone"], "checkpoint": checkpoint, "model_type": family, "num_hidden_layers": depth}
    assert preset["description"] and preset["training"]["learning_rate"] > 0
    adapter = check_supported(preset["backbone"]["model_type"])
    backbone = tiny_config(family, **depth_overrides(family, depth))
    config = config_from_preset(name, backbone_config=backbone, num_labels=3)
    assert config.num_hidden_layers == depth and config.exit_layers == preset["exit_layers"]
    assert config.distillation_temperature == preset["training"]["distillation_temperature"]
    if config.token_pruning == "topk":
        assert config.keep_ratios == preset["keep_ratios"]
    if not adapter.sdpa or family == "deberta-v2":
        assert config.token_pruning != "threshold"  # soft threshold learning needs a float attention mask
    torch.manual_seed(0)
    model = MagicPyramidForSequenceClassification(config).eval()
    input_ids, attention_mask = padded_batch(lengths=(12, 7, 3, 9))
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, exit_threshold=0.9999)
    assert out.logits.shape == (4, 3) and torch.isfinite(out.logits).all()
    assert (out.kept_tokens[:, -1] <= out.kept_tokens[:, 0]).all()


def test_preset_choices_follow_the_brief():
    assert load_preset("all-MiniLM-L6-v2")["exit_pooling"] == "mean"
    assert load_preset("deberta-v3-base")["token_pruning"] == "topk"
    assert load_preset("ModernBERT-base")["backbone"]["num_hidden_layers"] == 22
    # Lookup by checkpoint id, its last part, or any case.
    assert load_preset("google/electra-base-discriminator")["name"] == "electra-base"
    assert load_preset("modernbert-base")["name"] == "ModernBERT-base"
    assert pyramid_options("bert-base-uncased")["pruning_penalty"] == 0.1


def test_preset_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown preset 'gpt2'.*bert-base-uncased"):
        load_preset("gpt2")
    with pytest.raises(FileNotFoundError):
        load_preset(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="for 'roberta' backbones"):
        config_from_preset("roberta-base", backbone_config=tiny_config("bert", num_hidden_layers=12))
    with pytest.raises(ValueError, match="written for 12 layers, but this backbone has 4: pass exit_layers=, keep_ratios="):
        config_from_preset("bert-base-uncased", backbone_config=tiny_config("bert"))
    config = config_from_preset("bert-base-uncased", backbone_config=tiny_config("bert"), exit_layers=None, keep_ratios=None)
    assert config.num_hidden_layers == 4 and config.token_pruning == "topk"
    with pytest.raises(OSError, match="Pass backbone_config="):
        config_from_preset("bert-base-uncased")  # offline: the checkpoint's config cannot be read

    preset = load_preset("bert-base-uncased")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({**preset, "keep_ratios": preset["keep_ratios"][:-1]}))
    with pytest.raises(ValueError, match="keep_ratios has 11 entries"):
        load_preset(path)
    path.write_text(json.dumps({**preset, "exit_treshold": 0.2}))
    with pytest.raises(ValueError, match="unknown preset keys \\['exit_treshold'\\]"):
        load_preset(path)
    path.write_text(json.dumps({**preset, "name": "mine", "exit_pooling": "mean"}))
    assert load_preset(path)["exit_pooling"] == "mean"


def test_remote_code_files_are_what_save_pretrained_copies(tmp_path):
    """REMOTE_CODE_FILES is exactly the set of .py files transformers copies on save_pretrained (the modeling file and
    its relative imports, indented ones included); presets, CLI, training and Hub code never travel."""
    package = Path(hf_magicpyramid.__file__).parent
    MagicPyramidForSequenceClassification(MagicPyramidConfig(backbone_config=tiny_config("bert"))).save_pretrained(tmp_path)
    saved = sorted(path.name for path in tmp_path.glob("*.py"))
    assert saved == sorted(REMOTE_CODE_FILES) and len(set(REMOTE_CODE_FILES)) == len(REMOTE_CODE_FILES)
    for name in saved:  # plain copies of the installed modules
        assert (tmp_path / name).read_bytes() == (package / name).read_bytes()
    staying = {"presets.py", "cli.py", "arguments.py", "training.py", "data.py", "hub.py", "calibration.py", "__init__.py"}
    assert not staying & set(REMOTE_CODE_FILES)
    for name in REMOTE_CODE_FILES:
        text = (package / name).read_text()
        assert "from .hub" not in text and "import hub" not in text and "from .presets" not in text


def test_preset_labels_agree_with_the_backbone(tmp_path):
    backbone = tiny_config("bert", num_hidden_layers=6)  # 3 labels
    config = config_from_preset("all-MiniLM-L6-v2", backbone_config=backbone, num_labels=2)
    assert config.num_labels == config.backbone_config.num_labels == 2
    MagicPyramidForSequenceClassification(config).save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.config.num_labels == 2 and reloaded.backbone.classifier.out_features == 2
    inherited = config_from_preset("all-MiniLM-L6-v2", backbone_config=backbone)
    assert inherited.num_labels == 3  # from the backbone config when not given, as from_backbone does


def test_config_from_preset_with_overrides():
    # A function of presets.py, not a config classmethod: the config file travels to the Hub, the presets do not.
    assert not hasattr(MagicPyramidConfig, "from_preset")
    backbone = tiny_config("deberta-v2", num_hidden_layers=12)
    config = config_from_preset("deberta-v3-base", backbone_config=backbone, exit_threshold=0.2)
    assert isinstance(config, MagicPyramidConfig) and config.token_pruning == "topk" and config.exit_threshold == 0.2
