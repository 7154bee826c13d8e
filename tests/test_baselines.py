"""timm baselines: names, training modes (LoRA, linear, full), LoRA placement, weights, checkpoints, counts.

Runs on timm's tiny test architectures (`test_vit`: 6 blocks of width 64 at 160 px; `test_efficientnet`);
the paper's six full-size baselines are only counted, built on the meta device (no memory, no init).
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from conftest import damage_state_dict

from fetaliqa.errors import WeightsError
from fetaliqa.models import (
    PAPER_BASELINES,
    LoraSpec,
    PreprocessSpec,
    build_model,
    is_known_model,
    load_checkpoint,
    model_info,
    paper_lora,
    save_checkpoint,
)

VIT = "timm:test_vit"
CNN = "timm:test_efficientnet"
KINDS = ("qkv", "proj", "fc1", "fc2")


def images(n: int = 2, size: int = 160, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def lora_kind(name: str) -> str | None:
    return next((k for k in KINDS if f".{k}.lora_" in name), None)


def lora_params(model, kind: str | None, matrix: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.encoder.named_parameters()
            if lora_kind(n) and kind in (None, lora_kind(n)) and f".lora_{matrix}." in n]


def set_lora_b(model, kind: str | None, std: float = 0.05) -> None:
    """Random B for one adapter kind (all for None), zero for the others."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_params(model, None, "B"):
            p.zero_()
        for p in lora_params(model, kind, "B"):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------
# Names


def test_known_model_names():
    for name in ("fetalclip", "fetalclip-tiny", VIT, CNN, *PAPER_BASELINES):
        assert is_known_model(name), name
    for name in ("fetalclip-huge", "densenet121", "timm:nope", "timm:densenet121.bogus", "timm:"):
        assert not is_known_model(name), name
    with pytest.raises(ValueError, match="timm:<arch>") as err:
        build_model("timm:nope")
    assert "fetalclip-tiny" in str(err.value) and "timm:densenet121" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# LoRA on a timm ViT


def test_vit_lora_placement_and_preprocessing():
    model, preprocess = build_model(VIT)
    assert model.spec.trainable == "lora" and model.spec.lora.targets == KINDS  # open_clip names translated
    depth = len(model.encoder.blocks)
    for kind in KINDS:
        assert len(lora_params(model, kind, "A")) == len(lora_params(model, kind, "B")) == depth
    assert not any("patch_embed" in n for n in trainable_names(model))  # a Conv2d named proj: not adapted
    assert all(lora_kind(n) or n.startswith("head.") for n in trainable_names(model))
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == model.encoder.num_features
    cfg = timm.data.resolve_data_config({}, model=model.encoder)
    # timm's own interpolation is not used: fetaliqa resizes every model's frames alike (its recipe's resize)
    assert preprocess == PreprocessSpec(160, cfg["mean"], cfg["std"], "bicubic")


@pytest.mark.parametrize("kind", KINDS)
def test_each_vit_lora_kind_changes_the_output_and_gets_a_gradient(kind):
    model, _ = build_model(VIT)
    model.eval()
    x = images()
    with torch.no_grad():
        before = model(x)
    set_lora_b(model, kind)
    after = model(x)
    assert (after - before).abs().max() > 1e-4, f"the {kind} adapter does not change the output"
    after.sum().backward()
    for p in lora_params(model, kind, "A") + lora_params(model, kind, "B"):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.encoder.named_parameters() if not lora_kind(n))


def test_vit_merge_keeps_predictions():
    model, _ = build_model(VIT)
    set_lora_b(model, None)
    model.eval()
    x = images()
    with torch.no_grad():
        before = model(x)
        after = model.merge_adapters()(x)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_vit_seg_decodes_patch_tokens_and_trains_lora():
    model, _ = build_model(VIT, "seg", decoder_channels=4)
    assert model.seg_blocks == [2, 2, 3, 6]  # 6 blocks: [6, 8, 12, 24] scaled
    out = model(images())
    assert out.shape == (2, 1, 160, 160)
    out.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(model, None, "B"))
    with pytest.raises(ValueError, match="SEG needs a ViT encoder with patch tokens: timm:test_efficientnet"):
        build_model(CNN, "seg")


# ---------------------------------------------------------------------------------------------------
# Training modes


def test_cnn_is_fully_fine_tuned_by_default():
    model, preprocess = build_model(CNN)
    assert model.spec.trainable == "full" and model.spec.lora is None
    assert len(model.trainable_parameters()) == len(list(model.parameters()))
    assert preprocess.image_size == 160
    model.train()
    torch.nn.functional.binary_cross_entropy_with_logits(model(images(4)), torch.tensor([0.0, 1, 0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.merge_adapters() is model and not model.merged  # nothing to merge: still savable


def test_vit_full_mode():
    model, _ = build_model(VIT, trainable="full")
    assert model.spec.lora is None and not any(".lora_" in n for n in trainable_names(model))
    assert len(model.trainable_parameters()) == len(list(model.parameters()))
    model(images()).sum().backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("name", [VIT, CNN])
def test_linear_mode_trains_only_the_head(name):
    for model, _ in (build_model(name, trainable="linear"), build_model(name, lora=None)):
        assert model.spec.trainable == "linear" and trainable_names(model) == ["head.weight", "head.bias"]
        frozen = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        model.train()(images()).sum().backward()  # frozen BatchNorm keeps its running statistics
        assert model.head.weight.grad is not None
        for key, value in model.encoder.state_dict().items():
            assert torch.equal(value, frozen[key]), key


def test_contradictory_modes():
    with pytest.raises(ValueError, match="trainable='full'"):
        build_model(CNN, trainable="lora")  # no qkv / proj / fc1 / fc2 Linear layers in a CNN
    with pytest.raises(ValueError, match="needs a LoraSpec"):
        build_model(VIT, trainable="lora", lora=None)
    with pytest.raises(ValueError, match="contradicts"):
        build_model(VIT, trainable="full", lora=LoraSpec(r=4))
    with pytest.raises(ValueError, match="trainable must be one of"):
        build_model(VIT, trainable="most")


# ---------------------------------------------------------------------------------------------------
# Weights


def timm_weights(tmp_path, name: str, suffix: str) -> tuple[str, dict[str, torch.Tensor]]:
    """A timm state dict of `name` with a 3-class classifier (dropped on load), seeded unlike build_model."""
    torch.manual_seed(77)
    state = timm.create_model(name[len("timm:"):], pretrained=False, num_classes=3).state_dict()
    path = str(tmp_path / f"weights{suffix}")
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path, state


@pytest.mark.parametrize("name, suffix", [(VIT, ".pt"), (CNN, ".safetensors")])
def test_weights_from_a_timm_state_dict(tmp_path, name, suffix):
    path, state = timm_weights(tmp_path, name, suffix)
    model, _ = build_model(name, weights=path, trainable="linear")
    loaded = model.encoder.state_dict()
    assert set(state) - set(loaded) == {k for k in state if k.startswith(("head.", "classifier."))}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("damage", ["rename", "remove", "reshape"])
def test_weights_that_do_not_fit_name_the_key(tmp_path, damage):
    torch.manual_seed(0)
    state = timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict()
    key = "blocks.0.attn.qkv.weight"
    path = tmp_path / "bad.pt"
    torch.save(damage_state_dict(state, key, damage), path)
    with pytest.raises(WeightsError) as err:
        build_model(VIT, weights=str(path))
    message = str(err.value)
    assert str(path) in message and key in message and "test_vit" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def perturbed(model) -> None:
    """Stand in for training: change every trainable tensor (and BatchNorm statistics if the encoder trains)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
        if model.spec.trainable == "full":
            for name, buf in model.encoder.named_buffers():
                if name.endswith("running_mean"):
                    buf.add_(0.1)


@pytest.mark.parametrize("name, trainable, suffix", [
    (VIT, "lora", ".pt"), (CNN, "full", ".safetensors"), (CNN, "linear", ".pt"),
])
def test_checkpoint_round_trip(tmp_path, name, trainable, suffix):
    weights, _ = timm_weights(tmp_path, name, suffix)
    model, preprocess = build_model(name, "cls", weights=weights, trainable=trainable, seed=3)
    perturbed(model)
    url = str(tmp_path / "checkpoint")
    save_checkpoint(model, url, threshold=0.5, preprocess=preprocess)
    meta = json.loads((tmp_path / "checkpoint" / "fetaliqa.json").read_text())
    stored = load_safetensors((tmp_path / "checkpoint" / "weights.safetensors").read_bytes())
    assert meta["trainable"] == trainable and meta["model"] == name and meta["base_weights"] == weights
    assert meta["includes_encoder"] is (trainable == "full")
    assert meta["lora"] == ({"r": 8, "alpha": 16, "dropout": 0.1, "targets": list(KINDS)} if trainable == "lora"
                            else None)
    if trainable == "full":
        assert set(stored) == set(model.state_dict())
    else:
        assert stored and all(".lora_" in k or k.startswith("head.") for k in stored)
    loaded, meta = load_checkpoint(url)
    assert loaded.spec.trainable == trainable and meta["preprocess"] == preprocess.to_dict()
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# The paper's six baselines: trainable parameters in the paper's mode (counted on the meta device)

PAPER_TRAINABLE = {"timm:densenet121": 7.0e6, "timm:efficientnet_b0": 4.0e6, "timm:vgg16": 134e6,
                   "timm:swin_large_patch4_window7_224": 1.7e6, "timm:deit3_large_patch16_224": 2.4e6,
                   "timm:vit_large_patch14_clip_224.laion2b": 2.4e6}
SWIN_L_WIDTHS = 2 * 192 + 2 * 384 + 18 * 768 + 2 * 1536  # sum of block widths: depths (2, 2, 18, 2)
VIT_L_WIDTHS = 24 * 1024


def lora_count(widths: int, kinds: tuple[str, ...]) -> int:
    """r * (in + out) per adapted Linear, summed over blocks: qkv C->3C, proj C->C, fc1 C->4C, fc2 4C->C."""
    per_width = {"qkv": 4, "proj": 2, "fc1": 5, "fc2": 5}
    return 8 * widths * sum(per_width[k] for k in kinds)


def test_paper_baseline_counts():
    rows = {name: model_info(name, "cls") for name in PAPER_BASELINES}
    print(f"\n{'model':42} {'mode':5} {'trainable':>12} {'paper':>8}")
    for name, info in rows.items():
        print(f"{name:42} {info['config']['trainable']:5} {info['trainable_parameters']:>12,} "
              f"{PAPER_TRAINABLE[name] / 1e6:>7.1f}M")
        assert info["config"]["trainable"] == PAPER_BASELINES[name]
    # CNNs, fully fine-tuned: the paper's counts, to its rounding.
    for name in ("timm:densenet121", "timm:efficientnet_b0", "timm:vgg16"):
        got = rows[name]["trainable_parameters"]
        assert round(got / 1e6, 1 if got < 1e8 else 0) == PAPER_TRAINABLE[name] / 1e6, name
        assert got == rows[name]["image_tower_parameters"] + rows[name]["head_parameters"]
    assert rows["timm:vgg16"]["head_parameters"] == 4096 + 1  # on fc7's 4096 features
    # Transformers: LoRA on qkv, proj, fc1, fc2 of every block, + Linear(features, 1).
    assert rows["timm:swin_large_patch4_window7_224"]["lora_parameters"] == lora_count(SWIN_L_WIDTHS, KINDS)
    for name in ("timm:deit3_large_patch16_224", "timm:vit_large_patch14_clip_224.laion2b"):
        assert rows[name]["lora_parameters"] == lora_count(VIT_L_WIDTHS, KINDS) == 3_145_728
        assert rows[name]["trainable_parameters"] == 3_145_728 + 1025
    # The paper's 1.7M and 2.4M are what LoRA gives without qkv (proj, fc1, fc2 only).
    no_qkv = LoraSpec(targets=("proj", "fc1", "fc2"))
    swin = model_info("timm:swin_large_patch4_window7_224", lora=no_qkv)["lora_parameters"]
    deit = model_info("timm:deit3_large_patch16_224", lora=no_qkv)["lora_parameters"]
    assert swin == lora_count(SWIN_L_WIDTHS, ("proj", "fc1", "fc2")) == 1_732_608
    assert deit == lora_count(VIT_L_WIDTHS, ("proj", "fc1", "fc2")) == 2_359_296
    # The pretrained tag picks timm's preprocessing for those weights (LAION CLIP: mean = std = 0.5).
    clip = rows["timm:vit_large_patch14_clip_224.laion2b"]["config"]
    assert clip["preprocess"]["mean"] == [0.5] * 3 and clip["timm"]["tag"] == "laion2b"
    assert rows["timm:vgg16"]["config"]["preprocess"]["interpolation"] == "bicubic"  # timm's says bilinear


def test_model_info_per_mode_and_meta_counts_match_a_real_build():
    info = model_info("timm:densenet121", "cls")
    model, _ = build_model("timm:densenet121")  # 0.1 s on CPU: the meta-device count is the real one
    assert info["trainable_parameters"] == sum(p.numel() for p in model.trainable_parameters())
    head, tower = info["head_parameters"], info["image_tower_parameters"]
    assert info["trainable_parameters_by_mode"] == {"lora": None, "linear": head, "full": tower + head}
    assert json.loads(json.dumps(info)) == info
    vit = model_info(VIT, trainable="linear")
    assert vit["trainable_parameters"] == vit["head_parameters"] and vit["config"]["lora"] is None
    assert vit["trainable_parameters_by_mode"]["lora"] == model_info(VIT)["trainable_parameters"]


def test_paper_lora_on_timm_transformers_matches_peft_suffixes_conv_included():
    # The paper's code: proj, fc1, fc2 by peft's suffix match, so the patch embedding's Conv2d `proj` too:
    # LoRA A is a conv with the patch kernel (3 -> 8 channels), B a 1x1 conv (8 -> width).
    conv = {"timm:deit3_large_patch16_224": 3 * 8 * 16 * 16 + 8 * 1024,
            "timm:vit_large_patch14_clip_224.laion2b": 3 * 8 * 14 * 14 + 8 * 1024,
            "timm:swin_large_patch4_window7_224": 3 * 8 * 4 * 4 + 8 * 192}
    widths = {"timm:deit3_large_patch16_224": VIT_L_WIDTHS, "timm:vit_large_patch14_clip_224.laion2b": VIT_L_WIDTHS,
              "timm:swin_large_patch4_window7_224": SWIN_L_WIDTHS}
    for name, extra in conv.items():
        info = model_info(name, "cls", lora=paper_lora(name))
        assert info["lora_parameters"] == lora_count(widths[name], ("proj", "fc1", "fc2")) + extra, name
        assert info["config"]["lora"] == {"r": 8, "alpha": 16, "dropout": 0.1, "targets": ["proj", "fc1", "fc2"],
                                          "linear_only": False}
    # The paper's table: 1.7M (Swin-L) and 2.4M (DeiT-III-L, CLIP ViT-L), to its rounding.
    assert round(model_info("timm:swin_large_patch4_window7_224", lora=paper_lora("timm:x"))["trainable_parameters"] / 1e6, 1) == 1.7
    model, _ = build_model(VIT, lora=paper_lora(VIT))
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.encoder.named_parameters() if ".lora_" in n}
    assert "patch_embed.proj" in adapted and not any(n.endswith("qkv") for n in adapted)
    assert isinstance(model.encoder.get_submodule("patch_embed.proj").base_layer, torch.nn.Conv2d)
