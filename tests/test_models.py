"""The model factory: LoRA placement and gradients, CLS and SEG heads, weights loading, parameter counts.

Everything runs on `fetalclip-tiny` except the counts, which build (never run) the full `fetalclip`.
"""

from __future__ import annotations

import os

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from conftest import damage_state_dict

from fetaliqa.errors import WeightsError
from fetaliqa.models import (
    DEFAULT_THRESHOLD,
    MODEL_NAMES,
    IQAModel,
    LoraSpec,
    PreprocessSpec,
    build_model,
    model_info,
    paper_lora,
    save_checkpoint,
    seg_block_indices,
    torch_seed,
)

TINY = "fetalclip-tiny"
KINDS = ("qkv", "out", "c_fc", "c_proj")


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    """(n, 3, 224, 224) float32 standard-normal images, as after CLIP normalisation."""
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def lora_kind(name: str) -> str | None:
    """Which adapter a parameter belongs to: q/k/v (MHA in_proj), MHA out_proj, c_fc, c_proj."""
    if ".lora_" not in name:
        return None
    if "out_proj.lora_" in name:
        return "out"
    if "attn.lora_" in name:
        return "qkv"
    return "c_fc" if "c_fc.lora_" in name else "c_proj" if "c_proj.lora_" in name else "unknown"


def lora_params(model: IQAModel, kind: str | None = None, matrix: str = "B") -> list[torch.nn.Parameter]:
    return [p for n, p in model.encoder.named_parameters()
            if lora_kind(n) and (kind is None or lora_kind(n) == kind) and f"lora_{matrix}." in n]


def set_lora_b(model: IQAModel, kind: str | None, std: float = 0.05, seed: int = 1) -> None:
    """Give the B matrices of one adapter kind (all kinds for None) random values; zero the others."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_params(model, None, "B"):
            p.zero_()
        for p in lora_params(model, kind, "B"):
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------------------------------------------
# LoRA


def test_lora_sits_on_every_block_and_kind():
    model, _ = build_model(TINY)
    depth = len(model.encoder.transformer.resblocks)
    for kind in KINDS:
        assert len(lora_params(model, kind, "A")) == depth
        assert len(lora_params(model, kind, "B")) == depth
    assert all(p.abs().sum() == 0 for p in lora_params(model, None, "B"))  # peft's init: B = 0


def test_zero_b_equals_the_unadapted_encoder():
    adapted, _ = build_model(TINY, seed=3)
    plain, _ = build_model(TINY, seed=3, lora=None)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(adapted.eval().encoder(x), plain.eval().encoder(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_each_adapter_kind_changes_the_output(kind):
    model, _ = build_model(TINY)
    model.eval()
    x = images()
    with torch.no_grad():
        before = model.encoder(x)
        set_lora_b(model, kind)
        after = model.encoder(x)
    assert (after - before).abs().max() > 1e-3, f"the {kind} adapter does not change the output"


def test_backward_reaches_every_adapter_and_no_frozen_weight():
    model, _ = build_model(TINY)
    set_lora_b(model, None)  # A's gradient is B^T (...): zero while B is zero
    model.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images(4)), torch.tensor([0.0, 1, 0, 1]))
    loss.backward()
    seen = set()
    for name, param in model.named_parameters():
        kind = lora_kind(name)
        if kind:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
            seen.add(kind)
        elif name.startswith("head."):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert seen == set(KINDS)


def test_linear_probe_trains_only_the_head():
    model, _ = build_model(TINY, lora=None)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    model(images()).sum().backward()
    assert model.head.weight.grad is not None


def test_full_fine_tuning_trains_every_encoder_weight():
    model, _ = build_model(TINY, trainable="full")
    assert model.spec.trainable == "full" and model.spec.lora is None
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert len(model.trainable_parameters()) == len(list(model.parameters()))
    model(images()).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.merge_adapters() is model and not model.merged  # no adapters: a no-op, still savable


def test_training_modes_resolve_as_before():
    assert build_model(TINY)[0].spec.trainable == "lora"  # the paper's recipe for a transformer
    assert build_model(TINY, lora=None)[0].spec.trainable == "linear"  # lora=None: the linear probe
    linear, _ = build_model(TINY, trainable="linear")
    assert linear.spec.lora is None and len(linear.trainable_parameters()) == 2
    with pytest.raises(ValueError, match="trainable must be one of"):
        build_model(TINY, trainable="partial")


def test_build_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, _ = build_model(TINY, "seg", seed=5)
    b, _ = build_model(TINY, "seg", seed=5)
    c, _ = build_model(TINY, "seg", seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), key
    assert not torch.equal(a.encoder.conv1.weight, c.encoder.conv1.weight)


def test_inference_mode_then_training_step():
    # peft's MultiheadAttention LoRA re-registers the frozen weights on every forward; a forward under
    # inference_mode (scoring, validation) must not break the next training step.
    model, _ = build_model(TINY)
    set_lora_b(model, None)
    with torch.inference_mode():
        model.eval()(images())
    model.train()(images()).sum().backward()
    assert all(p.grad is not None for p in lora_params(model, None, "A"))


def test_merge_adapters_keeps_predictions():
    model, preprocess = build_model(TINY, "seg")
    set_lora_b(model, None)
    model.eval()
    x = images()
    with torch.no_grad():
        before = model(x)
        model.merge_adapters()
        after = model(x)
        again = model(x)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, again)
    with pytest.raises(ValueError, match="merged"):
        save_checkpoint(model, "memory://never", threshold=0.01, preprocess=preprocess)


# ---------------------------------------------------------------------------------------------------
# Heads


def test_cls_output_and_scores():
    model, preprocess = build_model(TINY, "cls")
    model.eval()
    with torch.no_grad():
        logits = model(images(3))
    assert logits.shape == (3,) and logits.dtype == torch.float32
    scores = model.frame_scores(logits)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.all((scores >= 0) & (scores <= 1))
    torch.testing.assert_close(scores, torch.sigmoid(logits))
    assert DEFAULT_THRESHOLD == {"cls": 0.5, "seg": 0.01}
    assert preprocess == PreprocessSpec(224, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert PreprocessSpec.from_dict(preprocess.to_dict()) == preprocess


def test_seg_output_shape():
    model, _ = build_model(TINY, "seg")
    model.eval()
    with torch.no_grad():
        out = model(images(2))
    assert out.shape == (2, 1, 224, 224) and out.dtype == torch.float32
    scores = model.frame_scores(out)
    assert scores.shape == (2,) and torch.all((scores >= 0) & (scores <= 1))


def test_seg_score_is_mask_area_fraction():
    model, _ = build_model(TINY, "seg")
    out = torch.full((2, 1, 224, 224), -3.0)
    out.view(2, -1)[0, :502] = 2.0  # 502 px > 1% of 50176
    out.view(2, -1)[1, :501] = 2.0  # 501 px < 1%
    scores = model.frame_scores(out)
    torch.testing.assert_close(scores, torch.tensor([502 / 50176, 501 / 50176]))
    assert (scores >= DEFAULT_THRESHOLD["seg"]).tolist() == [True, False]


def test_seg_block_indices():
    assert seg_block_indices(24) == [6, 8, 12, 24]
    assert seg_block_indices(12) == [3, 4, 6, 12]
    assert seg_block_indices(4) == [1, 1, 2, 4]
    assert seg_block_indices(1) == [1, 1, 1, 1]
    model, _ = build_model(TINY, "seg")
    assert model.seg_blocks == seg_block_indices(len(model.encoder.transformer.resblocks))


def test_seg_decoder_sees_the_tokens_of_its_blocks():
    model, _ = build_model(TINY, "seg")
    model.eval()
    x = images()
    with torch.no_grad():
        got = model._block_tokens(x)
        h = model.encoder._embeds(x)
        by_block = {}
        for i, block in enumerate(model.encoder.transformer.resblocks, start=1):
            h = block(h)
            by_block[i] = h[:, 1:].reshape(2, 16, 16, -1).permute(0, 3, 1, 2)  # drop the class token
    assert len(got) == 4
    for block, tokens in zip(model.seg_blocks, got):
        assert tokens.shape == (2, 128, 16, 16)
        torch.testing.assert_close(tokens, by_block[block])


def test_seg_loss_trains_lora_and_decoder():
    model, _ = build_model(TINY, "seg")
    model.train()
    target = torch.zeros(2, 1, 224, 224)
    target[:, :, 80:140, 60:170] = 1
    logits = model(images())
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    dice.backward()
    for p_b in lora_params(model, None, "B"):  # fresh adapters: B gets gradient first
        assert p_b.grad is not None and p_b.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("head."))


def test_full_fine_tuning_seg_trains_only_what_gets_gradient():
    """SEG reads block tokens, never the pooled output: its LayerNorm and projection stay frozen, since DDP
    fails on a trainable parameter without a gradient. Everything else trains."""
    model, _ = build_model(TINY, "seg", trainable="full")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.proj", "encoder.ln_post.weight", "encoder.ln_post.bias"}
    model.train()
    model(images()).sum().backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


def test_unknown_model_and_task():
    with pytest.raises(ValueError, match="fetalclip-tiny"):
        build_model("fetalclip-huge")
    with pytest.raises(ValueError, match="task"):
        build_model(TINY, "det")
    assert {"fetalclip", "fetalclip-tiny"} <= set(MODEL_NAMES)  # and any config added under model_configs/


# ---------------------------------------------------------------------------------------------------
# Pretrained weights


@pytest.fixture
def clip_state() -> dict[str, torch.Tensor]:
    """A full tiny CLIP state dict (image and text towers), initialised differently from build_model's."""
    torch.manual_seed(1234)
    return open_clip.create_model(TINY).state_dict()


def test_weights_from_full_clip_state_dict(tmp_path, clip_state):
    path = tmp_path / "FetalCLIP_weights.pt"
    torch.save(clip_state, path)
    model, _ = build_model(TINY, weights=str(path))
    state = model.encoder.state_dict()
    torch.testing.assert_close(state["conv1.weight"], clip_state["visual.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["transformer.resblocks.0.attn.base_layer.in_proj_weight"],
                               clip_state["visual.transformer.resblocks.0.attn.in_proj_weight"], rtol=0, atol=0)
    assert model.spec.weights == str(path)


def test_weights_visual_only_safetensors_and_memory_url(tmp_path, clip_state):
    import fsspec

    visual = {k[len("visual."):]: v.contiguous() for k, v in clip_state.items() if k.startswith("visual.")}
    save_file(visual, tmp_path / "visual.safetensors")
    model, _ = build_model(TINY, weights=str(tmp_path / "visual.safetensors"))
    assert torch.equal(model.encoder.proj, visual["proj"])
    url = "memory://fetaliqa-test-weights/visual.pt"
    with fsspec.open(url, "wb") as f:
        torch.save(visual, f)
    try:
        model, _ = build_model(TINY, weights=url)
        assert torch.equal(model.encoder.positional_embedding, visual["positional_embedding"])
    finally:
        fsspec.filesystem("memory").rm("/fetaliqa-test-weights", recursive=True)


def test_weights_wrapped_or_legacy_format(tmp_path, clip_state):
    # {"state_dict": ...} with DDP's "module." prefix (as open_clip accepts), and torch's pre-1.6 format.
    wrapped, legacy = tmp_path / "wrapped.pt", tmp_path / "legacy.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in clip_state.items()}, "epoch": 3}, wrapped)
    torch.save(clip_state, legacy, _use_new_zipfile_serialization=False)
    for path in (wrapped, legacy):
        model, _ = build_model(TINY, weights=str(path))
        assert torch.equal(model.encoder.conv1.weight, clip_state["visual.conv1.weight"]), path


@pytest.mark.parametrize("damage, named", [
    ("remove", "visual.ln_post.weight"),
    ("rename", "visual.ln_post.weight"),
    ("reshape", "visual.positional_embedding"),
])
def test_weights_that_do_not_fit_name_the_key_and_file(tmp_path, clip_state, damage, named):
    key = named
    path = tmp_path / "bad.pt"
    torch.save(damage_state_dict(clip_state, key, damage), path)
    with pytest.raises(WeightsError) as err:
        build_model(TINY, weights=str(path))
    message = str(err.value)
    assert str(path) in message and key[len("visual."):] in message and "\n" not in message
    if damage == "rename":
        assert "ln_post.weights" in message


def test_unreadable_weights_name_the_file(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    for path in (text, tmp_path / "missing.pt"):
        with pytest.raises(WeightsError, match=str(path)):
            build_model(TINY, weights=str(path))


class Planted:
    """An arbitrary object whose unpickling would create a directory: it must never be unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_weights_are_loaded_with_weights_only(tmp_path, clip_state):
    marker = tmp_path / "code-ran"
    clip_state["visual.extra"] = Planted(str(marker))
    path = tmp_path / "planted.pt"
    torch.save(clip_state, path)
    with pytest.raises(WeightsError, match=str(path)):
        build_model(TINY, weights=str(path))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Parameter counts of the full model (built on CPU, never run)

VIT_L14_TOWER = (
    3 * 14 * 14 * 1024          # conv1 (no bias)
    + 1024 + 257 * 1024         # class and positional embeddings
    + 2 * 1024                  # ln_pre
    + 24 * (2 * 1024 + 3 * 1024 * 1024 + 3 * 1024 + 1024 * 1024 + 1024   # ln_1, in_proj, out_proj
            + 2 * 1024 + 1024 * 4096 + 4096 + 4096 * 1024 + 1024)        # ln_2, c_fc, c_proj
    + 2 * 1024 + 1024 * 768     # ln_post, proj
)


@pytest.fixture(scope="module")
def fetalclip_cls_info():
    return model_info("fetalclip", "cls")


def test_fetalclip_cls_counts(fetalclip_cls_info):
    info = fetalclip_cls_info
    assert VIT_L14_TOWER == 303_966_208
    assert info["image_tower_parameters"] == VIT_L14_TOWER
    per_block = {"qkv": 8 * 1024 + 3072 * 8, "out": 8 * 1024 * 2, "c_fc": 8 * 1024 + 4096 * 8,
                 "c_proj": 8 * 4096 + 1024 * 8}
    assert info["lora_parameters"] == 24 * sum(per_block.values()) == 3_145_728
    # The paper's 2,359,296 = c_fc + c_proj + an out_proj-only adapter (393,216, dead: MHA never calls
    # out_proj's forward); ours adds in_proj (q, k, v) and makes out_proj live.
    assert 2_359_296 == 24 * (per_block["c_fc"] + per_block["c_proj"] + per_block["out"])
    assert 393_216 == 24 * per_block["out"]
    assert info["lora_parameters"] - 2_359_296 == 24 * per_block["qkv"] == 786_432
    assert info["head_parameters"] == 769
    assert info["trainable_parameters"] == 3_145_728 + 769
    assert info["parameters"] == VIT_L14_TOWER + 3_145_728 + 769
    assert info["config"]["open_clip"]["vision_cfg"] == {"image_size": 224, "layers": 24, "width": 1024,
                                                         "patch_size": 14}
    assert info["config"]["open_clip"]["text_cfg"]["context_length"] == 117
    assert info["config"]["lora"] == LoraSpec().to_dict() and info["config"]["trainable"] == "lora"
    assert info["trainable_parameters_by_mode"] == {"lora": 3_145_728 + 769, "linear": 769,
                                                    "full": VIT_L14_TOWER + 769}


def test_fetalclip_seg_counts():
    info = model_info("fetalclip", "seg")
    print({k: v for k, v in info.items() if k != "config"})
    assert info["image_tower_parameters"] == VIT_L14_TOWER
    assert info["lora_parameters"] == 3_145_728
    assert info["trainable_parameters"] == info["lora_parameters"] + info["head_parameters"]
    assert info["config"]["seg_blocks"] == [6, 8, 12, 24]
    assert 1_000_000 < info["head_parameters"] < 3_000_000  # paper: 4.0M trainable in all


def test_paper_lora_on_fetalclip_counts_2_360_065_and_its_out_proj_adapters_change_nothing():
    # The full ViT-L/14 is built on CPU for counting only (~5 s here).
    info = model_info("fetalclip", "cls", lora=paper_lora("fetalclip"))
    assert info["lora_parameters"] == 24 * 8 * (2 * (1024 + 4096) + 2 * 1024) == 2_359_296
    assert info["trainable_parameters"] == 2_360_065 and info["head_parameters"] == 769
    assert info["config"]["lora"]["targets"] == ["c_fc", "c_proj", "out_proj"]
    model, _ = build_model(TINY, lora=paper_lora(TINY))
    model.eval()
    assert {lora_kind(n) for n, _ in model.encoder.named_parameters() if lora_kind(n)} == {"out", "c_fc", "c_proj"}
    x = images()
    with torch.no_grad():
        before = model(x)
        set_lora_b(model, "out")
        assert torch.equal(model(x), before)  # dead, as in the paper's code
        set_lora_b(model, "c_fc")
        assert not torch.allclose(model(x), before)


def test_seeds_beyond_int64_reach_torch_reduced_modulo_2_63():
    paper_seed = 9872398152123123767126
    assert torch_seed(paper_seed) == paper_seed % 2**63 and torch_seed(5) == 5
    a, _ = build_model(TINY, seed=paper_seed + 1)
    b, _ = build_model(TINY, seed=(paper_seed + 1) % 2**63)
    c, _ = build_model(TINY, seed=paper_seed + 2)
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)


def test_seg_token_resampling_keeps_the_values_of_nchw_bilinear():
    # The decoder resamples 16 x 16 tokens to its 14 x 14 grid in channels-last (on CUDA the NCHW kernel
    # was 75% of SEG's time): the layout changes, the values must not.
    decoder = build_model(TINY, "seg")[0].head
    tokens = torch.randn(2, 48, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(tokens, size=(decoder.grid, decoder.grid), mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(decoder._resample(tokens), expected, rtol=0, atol=1e-6)
