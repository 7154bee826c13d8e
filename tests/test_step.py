"""The training step's losses on hand-made tensors (no model, no Ray)."""

from __future__ import annotations

import numpy as np
import torch

from fetaliqa.training.recipes import RECIPES
from fetaliqa.training.step import LOSSES, paper_dice_loss, seg_loss


def test_the_papers_seg_loss_is_one_dice_over_the_whole_batch():
    # All logits 0: every p = 1/2. 3 positive pixels in 2 frames of 2 x 2: intersection 3/2, cardinality
    # 8 * 1/2 + 3 = 7, Dice 3/7, loss 4/7 (smp: smooth 0, no BCE), repeated for each frame.
    mask = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 1]]], dtype=torch.uint8)
    losses = paper_dice_loss(torch.zeros(2, 1, 2, 2), {"mask": mask})
    assert losses.shape == (2,)
    torch.testing.assert_close(losses, torch.full((2,), 4 / 7), rtol=0, atol=1e-7)

    logits = torch.tensor([[[[4.0, -4.0], [0.0, 2.0]]], [[[-3.0, 1.0], [-1.0, -5.0]]]])  # (2, 1, 2, 2)
    mask = torch.tensor([[[1, 0], [1, 1]], [[0, 0], [0, 0]]], dtype=torch.uint8)  # frame 2 has no abdomen
    p = 1 / (1 + np.exp(-logits.numpy()[:, 0].astype(np.float64)))
    t = mask.numpy().astype(float)
    pooled = 1 - 2 * (p * t).sum() / (p + t).sum()
    np.testing.assert_allclose(paper_dice_loss(logits, {"mask": mask}).numpy(), [pooled, pooled], rtol=1e-6)
    per_frame = [1 - 2 * (p[i] * t[i]).sum() / (p[i] + t[i]).sum() for i in range(2)]  # frame 2's: 1
    per_frame_mean = np.mean(per_frame)
    assert abs(per_frame_mean - pooled) > 0.1  # not the mean of per-frame Dice
    assert LOSSES["seg-paper-dice"] is paper_dice_loss and LOSSES["seg"] is seg_loss
    assert RECIPES["paper"].seg_loss == "seg-paper-dice" and RECIPES["fetaliqa"].seg_loss == "seg"


def test_the_papers_seg_loss_is_zero_without_a_gradient_on_a_batch_without_positive_pixels():
    # smp's multilabel DiceLoss masks out a class with no positive pixel in the batch: loss 0 whatever the
    # prediction (here confidently wrong), and no gradient at all.
    logits = torch.full((3, 1, 4, 4), 5.0, requires_grad=True)
    losses = paper_dice_loss(logits, {"mask": torch.zeros(3, 4, 4, dtype=torch.uint8)})
    assert losses.tolist() == [0.0, 0.0, 0.0]
    losses.mean().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_the_papers_seg_loss_of_a_perfect_prediction_is_zero():
    mask = torch.zeros(2, 4, 4, dtype=torch.uint8)
    mask[0, 1:3, 1:3] = 1
    logits = (mask.float() * 100 - 50).unsqueeze(1)  # +50 inside, -50 outside: p is 1 or ~2e-22
    torch.testing.assert_close(paper_dice_loss(logits, {"mask": mask}), torch.zeros(2), rtol=0, atol=1e-6)
    # Everything wrong instead: intersection ~0, loss ~1.
    torch.testing.assert_close(paper_dice_loss(-logits, {"mask": mask}), torch.ones(2), rtol=0, atol=1e-6)


def test_the_papers_seg_loss_gives_every_frame_a_gradient_through_the_pooled_sums():
    logits = torch.zeros(3, 1, 4, 4, requires_grad=True)
    mask = torch.zeros(3, 4, 4, dtype=torch.uint8)
    mask[0, 1:3, 1:3] = 1
    paper_dice_loss(logits, {"mask": mask}).mean().backward()
    assert (logits.grad[1:] > 0).all()  # empty frames: lowering their probabilities lowers the batch loss
    assert (logits.grad[0, 0, 1:3, 1:3] < 0).all()
