"""The training step's losses on hand-made tensors (no model, no Ray)."""

from __future__ import annotations

import numpy as np
import torch

from fetaliqa.training.step import LOSSES, seg_batch_dice_loss, seg_loss


def test_the_papers_seg_loss_is_one_dice_over_the_whole_batch():
    logits = torch.tensor([[[[4.0, -4.0], [0.0, 2.0]]], [[[-3.0, 1.0], [-1.0, -5.0]]]])  # (2, 1, 2, 2)
    mask = torch.tensor([[[1, 0], [1, 1]], [[0, 0], [0, 0]]], dtype=torch.uint8)  # frame 2 has no abdomen
    p = 1 / (1 + np.exp(-logits.numpy()[:, 0]))
    t = mask.numpy().astype(float)
    pooled = 1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
    losses = seg_batch_dice_loss(logits, {"mask": mask})
    assert losses.shape == (2,)
    np.testing.assert_allclose(losses.numpy(), [pooled, pooled], rtol=1e-6)
    per_frame = [1 - (2 * (p[i] * t[i]).sum() + 1e-5) / (p[i].sum() + t[i].sum() + 1e-5) for i in range(2)]
    assert abs(np.mean(per_frame) - pooled) > 0.1  # not the mean of per-frame Dice
    assert LOSSES["seg-batch-dice"] is seg_batch_dice_loss and LOSSES["seg"] is seg_loss


def test_the_papers_seg_loss_gives_every_frame_a_gradient_through_the_pooled_sums():
    logits = torch.zeros(3, 1, 4, 4, requires_grad=True)
    mask = torch.zeros(3, 4, 4, dtype=torch.uint8)
    mask[0, 1:3, 1:3] = 1
    seg_batch_dice_loss(logits, {"mask": mask}).mean().backward()
    assert (logits.grad[1:] > 0).all()  # empty frames: lowering their probabilities lowers the batch loss
    assert (logits.grad[0, 0, 1:3, 1:3] < 0).all()
