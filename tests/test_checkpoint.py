"""Checkpoints: round trips to a local folder and to memory://, and every way a checkpoint can be bad."""

from __future__ import annotations

import hashlib
import json
import uuid

import fsspec
import open_clip
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fetaliqa.errors import CheckpointError
from fetaliqa.models import (
    DEFAULT_THRESHOLD,
    FORMAT_VERSION,
    LoraSpec,
    build_model,
    load_checkpoint,
    load_trained_tensors,
    save_checkpoint,
)

TINY = "fetalclip-tiny"


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def trained(model) -> None:
    """Stand in for training: random LoRA B and head, so a load that skipped them would show."""
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or name.startswith("head."):
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path):
    """An empty checkpoint URL: a local folder path or a memory:// folder (removed afterwards)."""
    if request.param == "local":
        yield str(tmp_path / "checkpoint")
        return
    name = f"fetaliqa-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}/checkpoint"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_round_trip(folder, task):
    model, preprocess = build_model(TINY, task, seed=7)
    trained(model)
    save_checkpoint(model, folder, threshold=DEFAULT_THRESHOLD[task], preprocess=preprocess,
                    metrics={"val_f1": torch.tensor(0.75), "epoch": 3})
    loaded, meta = load_checkpoint(folder)
    assert not loaded.training and loaded.name == TINY and loaded.task == task
    model.eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for key, value in {"format_version": FORMAT_VERSION, "model": TINY, "task": task, "seed": 7,
                       "threshold": DEFAULT_THRESHOLD[task], "preprocess": preprocess.to_dict(),
                       "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "targets": ["attn", "c_fc", "c_proj"]},
                       "base_weights": None, "includes_encoder": True, "trainable": "lora"}.items():
        assert meta[key] == value, key
    assert meta["metrics"] == {"val_f1": pytest.approx(0.75), "epoch": 3}
    assert len(meta["checkpoint_id"]) == 16 and int(meta["checkpoint_id"], 16) >= 0
    assert meta["fetaliqa_version"] and (task == "cls") == (meta["decoder_channels"] is None)


def test_adapter_only_checkpoint_over_pretrained_weights(tmp_path):
    torch.manual_seed(99)
    weights = tmp_path / "FetalCLIP_weights.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), weights)
    model, preprocess = build_model(TINY, "seg", weights=str(weights))
    trained(model)
    url = str(tmp_path / "checkpoint")
    save_checkpoint(model, url, threshold=0.02, preprocess=preprocess)

    stored = load_safetensors((tmp_path / "checkpoint" / "weights.safetensors").read_bytes())
    assert stored and all(".lora_" in k or k.startswith("head.") for k in stored)
    assert any(k.startswith("head.") for k in stored) and any("attn.lora_A" in k for k in stored)
    meta = json.loads((tmp_path / "checkpoint" / "fetaliqa.json").read_text())
    assert meta["includes_encoder"] is False and meta["base_weights"] == str(weights)

    model.eval()
    x = images(2)
    loaded, meta = load_checkpoint(url)  # base weights from the checkpoint's record
    moved = tmp_path / "elsewhere.pt"
    weights.rename(moved)
    again, _ = load_checkpoint(url, base_weights=str(moved))  # or from the caller
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(again(x), expected, rtol=0, atol=0)


def test_full_fine_tuned_checkpoint_includes_the_encoder(tmp_path):
    torch.manual_seed(98)
    weights = tmp_path / "FetalCLIP_weights.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), weights)
    model, preprocess = build_model(TINY, "cls", weights=str(weights), trainable="full")
    with torch.no_grad():
        model.encoder.conv1.weight.add_(0.01)  # a trained encoder differs from its base weights
        model.head.weight.add_(0.1)
    url = str(tmp_path / "checkpoint")
    save_checkpoint(model, url, threshold=0.5, preprocess=preprocess)
    weights.unlink()  # not needed to load: the checkpoint holds the encoder
    loaded, meta = load_checkpoint(url)
    assert meta["includes_encoder"] is True and meta["trainable"] == "full" and meta["lora"] is None
    assert loaded.spec.trainable == "full"
    stored = load_safetensors((tmp_path / "checkpoint" / "weights.safetensors").read_bytes())
    assert set(stored) == set(model.state_dict())
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("lora", [True, False])
def test_checkpoint_without_trainable_loads_as_before(tmp_path, lora):
    # Checkpoints written before training modes have no "trainable": lora set -> LoRA, lora null -> linear.
    model, preprocess = build_model(TINY, "cls", seed=2, lora=LoraSpec() if lora else None)
    trained(model)
    url = str(tmp_path / "checkpoint")
    save_checkpoint(model, url, threshold=0.5, preprocess=preprocess)
    meta_path = tmp_path / "checkpoint" / "fetaliqa.json"
    meta = json.loads(meta_path.read_text())
    del meta["trainable"]
    meta_path.write_text(json.dumps(meta))
    loaded, _ = load_checkpoint(url)
    assert loaded.spec.trainable == ("lora" if lora else "linear")
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_same_model_same_checkpoint_id(tmp_path):
    model, preprocess = build_model(TINY, seed=1)
    for name in ("a", "b"):
        save_checkpoint(model, str(tmp_path / name), threshold=0.5, preprocess=preprocess)
    ids = [json.loads((tmp_path / n / "fetaliqa.json").read_text())["checkpoint_id"] for n in ("a", "b")]
    assert ids[0] == ids[1]


# ---------------------------------------------------------------------------------------------------
# Bad checkpoints: each raises CheckpointError, on one line, naming the URL


@pytest.fixture
def saved(tmp_path):
    """(url, fs, path) of a valid tiny CLS checkpoint in memory://, removed afterwards."""
    name = f"fetaliqa-test-{uuid.uuid4().hex[:8]}"
    url = f"memory://{name}/ckpt"
    model, preprocess = build_model(TINY, "cls", seed=3)
    save_checkpoint(model, url, threshold=0.5, preprocess=preprocess)
    fs = fsspec.filesystem("memory")
    yield url, fs, f"/{name}/ckpt"
    fs.rm(f"/{name}", recursive=True)


def edit_meta(fs, path: str, **changes) -> None:
    meta = json.loads(fs.cat_file(f"{path}/fetaliqa.json"))
    meta.update(changes)
    fs.pipe_file(f"{path}/fetaliqa.json", json.dumps(meta).encode())


def replace_tensors(fs, path: str, edit) -> None:
    """Rewrite weights.safetensors through `edit(tensors)` and re-sign it, so only the content is wrong."""
    tensors = dict(load_safetensors(fs.cat_file(f"{path}/weights.safetensors")))
    edit(tensors)
    data = save_safetensors(tensors)
    fs.pipe_file(f"{path}/weights.safetensors", data)
    edit_meta(fs, path, checkpoint_id=hashlib.sha256(data).hexdigest()[:16])


def expect_error(url: str, match: str) -> None:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(url)
    message = str(err.value)
    assert url in message and "\n" not in message, message
    assert match in message, message


def test_missing_folder(tmp_path):
    expect_error(str(tmp_path / "nothing-here"), "no fetaliqa.json")
    expect_error("memory://fetaliqa-test-absent/ckpt", "no fetaliqa.json")


def test_missing_files(saved):
    url, fs, path = saved
    fs.rm(f"{path}/weights.safetensors")
    expect_error(url, "no weights.safetensors")
    fs.rm(f"{path}/fetaliqa.json")
    expect_error(url, "no fetaliqa.json")


def test_corrupt_json(saved):
    url, fs, path = saved
    fs.pipe_file(f"{path}/fetaliqa.json", b'{"format_version": 1, "model": ')
    expect_error(url, "not valid JSON")
    fs.pipe_file(f"{path}/fetaliqa.json", b"[1, 2]")
    expect_error(url, "not a JSON object")


def test_wrong_format_version(saved):
    url, fs, path = saved
    edit_meta(fs, path, format_version=2)
    expect_error(url, "format_version 2")


def test_meta_missing_a_field(saved):
    url, fs, path = saved
    meta = json.loads(fs.cat_file(f"{path}/fetaliqa.json"))
    del meta["task"]
    fs.pipe_file(f"{path}/fetaliqa.json", json.dumps(meta).encode())
    expect_error(url, "lacks task")


def test_unknown_model_name(saved):
    url, fs, path = saved
    edit_meta(fs, path, model="fetalclip-huge")
    expect_error(url, "fetalclip-huge")


def test_truncated_weights(saved):
    url, fs, path = saved
    data = fs.cat_file(f"{path}/weights.safetensors")
    fs.pipe_file(f"{path}/weights.safetensors", data[: len(data) // 2])
    expect_error(url, "does not match checkpoint_id")


def test_weights_not_safetensors(saved):
    url, fs, path = saved
    garbage = b"\x80\x04not safetensors at all"
    fs.pipe_file(f"{path}/weights.safetensors", garbage)
    edit_meta(fs, path, checkpoint_id=hashlib.sha256(garbage).hexdigest()[:16])
    expect_error(url, "not a valid safetensors file")


def test_missing_tensor(saved):
    url, fs, path = saved
    replace_tensors(fs, path, lambda t: t.pop("head.bias"))
    expect_error(url, "missing tensors: head.bias")


def test_unexpected_tensor(saved):
    url, fs, path = saved
    replace_tensors(fs, path, lambda t: t.update({"head.extra": torch.zeros(2)}))
    expect_error(url, "unexpected tensors: head.extra")


def test_wrong_shape(saved):
    url, fs, path = saved
    replace_tensors(fs, path, lambda t: t.update({"head.weight": torch.zeros(1, 64)}))
    expect_error(url, "wrong shapes: head.weight")


def test_meta_names_another_lora_or_task(saved):
    url, fs, path = saved
    edit_meta(fs, path, lora={"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["attn", "c_fc", "c_proj"]})
    expect_error(url, "wrong shapes")
    edit_meta(fs, path, lora={"r": 8, "alpha": 16, "dropout": 0.1, "targets": ["attn", "c_fc", "c_proj"]},
              task="seg")
    expect_error(url, "missing tensors: head.")


def test_meta_names_another_model(saved):
    # A fetalclip-tiny checkpoint whose fetaliqa.json says fetalclip: builds ViT-L/14 (seconds), never runs it.
    url, fs, path = saved
    edit_meta(fs, path, model="fetalclip")
    expect_error(url, "does not fit model 'fetalclip'")


def test_meta_names_a_bad_training_mode(saved):
    url, fs, path = saved
    edit_meta(fs, path, trainable="most")
    expect_error(url, "unknown trainable 'most'")
    edit_meta(fs, path, trainable="full", includes_encoder=False)
    expect_error(url, "must include its encoder")


def test_meta_names_an_unknown_resize(saved):
    url, fs, path = saved
    meta = json.loads(fs.cat_file(f"{path}/fetaliqa.json"))
    edit_meta(fs, path, preprocess=meta["preprocess"] | {"interpolation": "lanczos"})
    expect_error(url, "unknown resize 'lanczos'")


def test_adapters_without_base_weights(saved):
    url, fs, path = saved
    edit_meta(fs, path, includes_encoder=False, base_weights=None)
    expect_error(url, "base_weights")


def test_unserialisable_metrics_write_nothing(tmp_path):
    model, preprocess = build_model(TINY)
    with pytest.raises(TypeError, match="metrics"):
        save_checkpoint(model, str(tmp_path / "ckpt"), threshold=0.5, preprocess=preprocess,
                        metrics={"confusion": object()})
    assert not (tmp_path / "ckpt").exists()


def test_resume_reads_the_checkpoint_into_a_built_model_with_the_same_checks(saved, tmp_path):
    # What `training.loop.restore` does: the checkpoint's tensors into a model built from the same arguments.
    model, preprocess = build_model(TINY, "cls", seed=3)
    trained(model)
    url = str(tmp_path / "epoch")
    save_checkpoint(model, url, threshold=0.5, preprocess=preprocess)
    fresh, _ = build_model(TINY, "cls", seed=3)
    assert load_trained_tensors(fresh, url)["model"] == TINY
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    seg, _ = build_model(TINY, "seg", seed=3)
    with pytest.raises(CheckpointError, match="not fetalclip-tiny seg"):
        load_trained_tensors(seg, url)
    bad_url, fs, path = saved
    replace_tensors(fs, path, lambda t: t.pop("head.bias"))
    with pytest.raises(CheckpointError, match="missing tensors: head.bias"):
        load_trained_tensors(build_model(TINY, "cls", seed=3)[0], bad_url)
