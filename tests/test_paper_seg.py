"""`--recipe paper` SEG as the paper's code builds it: its UNETR decoder block by block, the tokens of its
encoder blocks read under no_grad (its LoRA built, never trained), its checkpoint, and what `info` says.

The model runs on `fetalclip-tiny` (4 blocks, width 128) with few filters; the counts are worked out by hand
from the paper's architecture, and checked against the full `fetalclip` (built, never run).
"""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fetaliqa.errors import CheckpointError
from fetaliqa.models import build_model, load_checkpoint, load_trained_tensors, paper_lora, save_checkpoint
from fetaliqa.models.paper_unetr import PaperUnetrDecoder
from fetaliqa.training.recipes import RECIPES
from fetaliqa.training.step import paper_dice_loss
from jobs import info as info_job
from jobs import train as train_job

TINY = "fetalclip-tiny"


def separable_conv(c_in: int, c_out: int) -> int:
    """The paper's Conv2DBlock: depthwise 3x3 conv with bias, BatchNorm, pointwise 1x1 conv with bias, BatchNorm."""
    return (9 * c_in + c_in) + 2 * c_in + (c_in * c_out + c_out) + 2 * c_out


def depthwise_up(c: int) -> int:
    """2x2 transposed conv per channel, with bias."""
    return 4 * c + c


def up_separable(c_in: int, c_out: int) -> int:  # the paper's Deconv2DBlock
    return depthwise_up(c_in) + separable_conv(c_in, c_out)


def up_pointwise(c_in: int, c_out: int) -> int:  # the paper's SingleDWConv2DBlock
    return depthwise_up(c_in) + c_in * c_out + c_out


def paper_decoder_parameters(d: int, f: int) -> int:
    """The paper's UNETR(transformer_width=d, output_dim=1, input_dim=3, init_filters=f), stage by stage."""
    return (separable_conv(3, f) + separable_conv(f, f)                                              # decoder0
            + up_separable(d, 8 * f) + up_separable(8 * f, 4 * f) + up_separable(4 * f, 2 * f)        # decoder3
            + up_separable(d, 8 * f) + up_separable(8 * f, 4 * f)                                     # decoder6
            + up_separable(d, 8 * f)                                                                  # decoder9
            + up_pointwise(d, 8 * f)                                                                  # decoder12_upsampler
            + separable_conv(16 * f, 8 * f) + 2 * separable_conv(8 * f, 8 * f) + up_pointwise(8 * f, 4 * f)
            + separable_conv(8 * f, 4 * f) + separable_conv(4 * f, 4 * f) + up_pointwise(4 * f, 2 * f)
            + separable_conv(4 * f, 2 * f) + separable_conv(2 * f, 2 * f) + up_pointwise(2 * f, f)
            + separable_conv(2 * f, f) + separable_conv(f, f) + (f * 1 + 1))                         # decoder0_header


def paper_model(filters: int = 4, seed: int = 0, **kwargs):
    return build_model(TINY, "seg", lora=paper_lora(TINY), decoder="paper", decoder_channels=filters, seed=seed,
                       **kwargs)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def mask_batch(n: int = 2) -> dict[str, torch.Tensor]:
    mask = torch.zeros(n, 224, 224, dtype=torch.uint8)
    mask[0, 80:150, 60:170] = 1
    return {"mask": mask}


# ---------------------------------------------------------------------------------------------------
# The decoder


def test_paper_decoder_stages_have_the_papers_channels_and_resolutions():
    f = 4
    model, _ = paper_model(f)
    decoder = model.head
    assert isinstance(decoder, PaperUnetrDecoder) and model.spec.decoder == "paper"
    # (in, out, groups) of every convolution of each stage, in order: depthwise, then pointwise.
    def sep(i, o):
        return [(i, i, i), (i, o, 1)]

    def up_sep(i, o):
        return [(i, i, i), *sep(i, o)]

    def up_pw(i, o):
        return [(i, i, i), (i, o, 1)]

    d = 128
    expected = {
        "image_skip": sep(3, f) + sep(f, f),
        "skip0": up_sep(d, 8 * f) + up_sep(8 * f, 4 * f) + up_sep(4 * f, 2 * f),
        "skip1": up_sep(d, 8 * f) + up_sep(8 * f, 4 * f),
        "skip2": up_sep(d, 8 * f),
        "deepest": up_pw(d, 8 * f),
        "merge2": sep(16 * f, 8 * f) + sep(8 * f, 8 * f) + sep(8 * f, 8 * f) + up_pw(8 * f, 4 * f),
        "merge1": sep(8 * f, 4 * f) + sep(4 * f, 4 * f) + up_pw(4 * f, 2 * f),
        "merge0": sep(4 * f, 2 * f) + sep(2 * f, 2 * f) + up_pw(2 * f, f),
        "out": sep(2 * f, f) + sep(f, f) + [(f, 1, 1)],
    }
    for stage, convs in expected.items():
        got = [(m.in_channels, m.out_channels, m.groups) for m in getattr(decoder, stage).modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        assert got == convs, stage
    # Every 3x3 conv is padded to keep its size, every transposed conv doubles it; each conv carries a bias
    # and is followed by BatchNorm and ReLU, except the upsamplers' pointwise convs and the last one.
    kinds = [type(m).__name__ for m in decoder.merge0.modules() if not isinstance(m, torch.nn.Sequential)]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["ConvTranspose2d", "Conv2d"]
    assert all(m.bias is not None for m in decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))

    shapes = {}
    hooks = [getattr(decoder, s).register_forward_hook(lambda m, a, out, s=s: shapes.__setitem__(s, tuple(out.shape)))
             for s in expected]
    with torch.no_grad():
        assert model(images()).shape == (2, 1, 224, 224)
    for h in hooks:
        h.remove()
    assert shapes == {"image_skip": (2, f, 224, 224), "skip0": (2, 2 * f, 112, 112), "skip1": (2, 4 * f, 56, 56),
                      "skip2": (2, 8 * f, 28, 28), "deepest": (2, 8 * f, 28, 28), "merge2": (2, 4 * f, 56, 56),
                      "merge1": (2, 2 * f, 112, 112), "merge0": (2, f, 224, 224), "out": (2, 1, 224, 224)}


def test_paper_decoder_trainable_count_worked_out_by_hand():
    model, _ = paper_model(4)
    assert sum(p.numel() for p in model.trainable_parameters()) == paper_decoder_parameters(128, 4)
    assert [p for p in model.trainable_parameters()] == list(model.head.parameters())
    # The paper's defaults on FetalCLIP (width 1024, 32 filters): 1,591,941, which with its 2,359,296 LoRA
    # parameters makes the paper's "4.0M trainable".
    assert paper_decoder_parameters(1024, 32) == 1_591_941
    assert 1_591_941 + 2_359_296 == 3_951_237


def test_paper_decoder_reads_the_tokens_of_the_papers_blocks():
    # The paper hooks blocks n // k - 1 (0-based) for k = 1..4, drops the CLS token and lays the rest out on
    # the patch grid row by row: blocks 6, 8, 12, 24 of 24 (z3, z6, z9, z12), 1, 1, 2, 4 of fetalclip-tiny's 4.
    model, _ = paper_model()
    depth = len(model.encoder.transformer.resblocks)
    assert model.seg_blocks == sorted(depth // k for k in (1, 2, 3, 4)) == [1, 1, 2, 4]
    outputs, seen = {}, {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
             for i, block in enumerate(model.encoder.transformer.resblocks, start=1)]
    hooks.append(model.head.register_forward_pre_hook(lambda m, args: seen.__setitem__("tokens", args[1])))
    model.eval()
    with torch.no_grad():
        model(images())
    for h in hooks:
        h.remove()
    for block, tokens in zip(model.seg_blocks, seen["tokens"]):
        out = outputs[block]  # (N, 1 + 16 * 16, 128), batch first
        papers = out[:, 1:].permute(0, 2, 1).reshape(2, 128, 16, 16)
        torch.testing.assert_close(tokens, papers, rtol=0, atol=0)


def test_paper_seg_trains_the_decoder_alone_and_its_lora_never_gets_a_gradient():
    model, _ = paper_model()
    lora = [p for n, p in model.encoder.named_parameters() if ".lora_" in n]
    assert lora and not any(p.requires_grad for p in model.encoder.parameters())  # built, then frozen
    paper_dice_loss(model(images()), mask_batch()).mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    # Even with its LoRA made trainable, nothing reaches it: the encoder runs under no_grad, as the paper's does.
    for p in lora:
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    paper_dice_loss(model(images()), mask_batch()).mean().backward()
    assert all(p.grad is None for p in lora)


def test_paper_seg_steps_under_ddp_without_looking_for_unused_parameters():
    # DDP (find_unused_parameters=False, what `jobs.train` passes for SEG) fails on the second step if a
    # trainable parameter got no gradient in the first: the paper's SEG model has none such.
    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        try:
            model, _ = paper_model(2)
            wrapped = DistributedDataParallel(model, find_unused_parameters=False)
            optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
            for step in range(2):
                optimizer.zero_grad(set_to_none=True)
                paper_dice_loss(wrapped(images(seed=step)), mask_batch()).mean().backward()
                optimizer.step()
        finally:
            dist.destroy_process_group()


def test_train_builds_the_paper_recipes_seg_model():
    args = train_job.build_parser().parse_args(["--data", "d", "--task", "seg", "--model", TINY, "--output", "o",
                                                "--recipe", "paper"])
    kwargs = train_job.model_kwargs(args, RECIPES["paper"], TINY, "w.pt", seed=1)
    assert kwargs["decoder"] == "paper" and kwargs["lora"] == paper_lora(TINY)
    assert RECIPES["paper"].seg_loss == "seg-paper-dice" and RECIPES["fetaliqa"].decoder == "fetaliqa"
    args.task = "cls"
    assert train_job.model_kwargs(args, RECIPES["paper"], TINY, "w.pt", seed=1)["decoder"] is None


def test_decoder_choice_is_checked():
    with pytest.raises(ValueError, match="decoder must be one of"):
        build_model(TINY, "seg", decoder="monai")
    with pytest.raises(ValueError, match="only SEG has a decoder"):
        build_model(TINY, "cls", decoder="paper")
    assert build_model(TINY, "seg")[0].spec.decoder == "fetaliqa"


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def test_paper_seg_checkpoint_round_trips_as_the_same_model(tmp_path):
    model, preprocess = paper_model(seed=3)
    with torch.no_grad():  # running statistics and weights that differ from a fresh build
        model(images(4, seed=1))
        for p in model.head.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    url = str(tmp_path / "ckpt")
    save_checkpoint(model, url, threshold=0.01, preprocess=preprocess)
    meta = json.loads((tmp_path / "ckpt" / "fetaliqa.json").read_text())
    assert meta["decoder"] == "paper" and meta["decoder_channels"] == 4 and meta["trainable"] == "lora"
    loaded, _ = load_checkpoint(url)
    assert loaded.spec == model.spec and isinstance(loaded.head, PaperUnetrDecoder)
    assert not any(p.requires_grad for p in loaded.encoder.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), model(images()), rtol=0, atol=0)

    fetaliqa_seg, _ = build_model(TINY, "seg", lora=paper_lora(TINY), decoder_channels=4, seed=3)
    with pytest.raises(CheckpointError, match="with the paper decoder, not the fetaliqa one"):
        load_trained_tensors(fetaliqa_seg, url)


def test_a_seg_checkpoint_without_a_decoder_key_loads_as_fetaliqas(tmp_path):
    model, preprocess = build_model(TINY, "seg", decoder_channels=2)
    url = str(tmp_path / "old")
    save_checkpoint(model, url, threshold=0.01, preprocess=preprocess)
    path = tmp_path / "old" / "fetaliqa.json"
    meta = json.loads(path.read_text())
    assert meta.pop("decoder") == "fetaliqa"
    path.write_text(json.dumps(meta))  # as written before the field existed
    loaded, _ = load_checkpoint(url)
    assert loaded.spec.decoder == "fetaliqa" and type(loaded.head).__name__ == "UnetrDecoder"
    path.write_text(json.dumps(meta | {"decoder": "monai"}))
    with pytest.raises(CheckpointError, match="unknown decoder 'monai'"):
        load_checkpoint(url)


# ---------------------------------------------------------------------------------------------------
# info


def test_info_reports_the_papers_seg_decoder_and_what_it_counted_but_never_trained(capsys):
    # The full FetalCLIP is built on CPU for counting only.
    assert info_job.main(["--model", "fetalclip", "--task", "seg", "--recipe", "paper"]) == 0
    info = json.loads(capsys.readouterr().out)
    decoder = paper_decoder_parameters(1024, 32)
    paper_lora_count = 24 * 8 * (2 * (1024 + 4096) + 2 * 1024)  # c_fc, c_proj, out_proj: A (r x in) + B (out x r)
    assert info["head_parameters"] == info["trainable_parameters"] == decoder == 1_591_941
    assert info["lora_parameters"] == info["counted_trainable_never_trained"] == paper_lora_count == 2_359_296
    assert "never received a gradient" in info["note"] and "2,359,296" in info["note"]
    assert info["trainable_parameters_by_mode"] == {"lora": decoder, "linear": decoder, "full": decoder}
    assert info["config"]["decoder"] == "paper" and info["config"]["decoder_channels"] == 32
    assert info["config"]["seg_blocks"] == [6, 8, 12, 24]

    assert info_job.main(["--model", TINY, "--task", "seg", "--recipe", "paper", "--trainable", "full"]) == 0
    full = json.loads(capsys.readouterr().out)  # the paper's code with freeze_encoder=False: still no_grad
    assert full["trainable_parameters"] == paper_decoder_parameters(128, 32)
    assert full["counted_trainable_never_trained"] == full["image_tower_parameters"]
    assert info_job.main(["--model", TINY, "--task", "seg"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["config"]["decoder"] == "fetaliqa" and "counted_trainable_never_trained" not in ours
    assert ours["trainable_parameters"] == ours["lora_parameters"] + ours["head_parameters"]
