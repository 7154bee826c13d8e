"""One pass of training or validation and the losses: plain torch, no Ray, so that `training.loop` runs it in
Ray Train workers and `benchmarks/gpu_throughput.py` times the same step on a bare GPU machine.

Batches: `image` (B, S, S) uint8, `label` (B,) uint8 and, for SEG, `mask` (B, S, S) uint8 {0, 1}. The model
keeps float32 weights; the forward pass runs under bf16 autocast on CUDA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fetaliqa.models.normalize import normalize_frames


def run_epoch(model: torch.nn.Module, loss_fn, batches, preprocess, device: torch.device,
              optimizer: torch.optim.Optimizer | None = None) -> float:
    """One pass over `batches`; a training step per batch when `optimizer` is given.

    Returns the mean per-frame loss over every worker's frames (an all-reduce of sums and counts); NaN when
    no worker saw a frame. bf16 autocast on CUDA; the loss itself is computed in float32.
    """
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, frames)
    for batch in batches:
        images = normalize_frames(batch["image"], preprocess.mean, preprocess.std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            output = model(images)
        losses = loss_fn(output.float(), batch)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()  # DDP averages the gradients of equal-sized per-worker batches
            optimizer.step()
        total[0] += losses.detach().double().sum()
        total[1] += len(losses)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def cls_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """BCE with logits per frame: logits (B,) float32, batch["label"] (B,) -> (B,) float32."""
    return F.binary_cross_entropy_with_logits(logits, batch["label"].float(), reduction="none")


def seg_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss plus pixel BCE, per frame: logits (B, 1, S, S) float32, batch["mask"] (B, S, S) -> (B,).

    Dice is computed per frame (not over the batch) so that the mean over a global batch is the mean of the
    workers' means, as DDP assumes. Per-frame Dice barely penalises a few false-positive pixels on a frame
    without an abdomen (its gradient there is ~1 / (area + 1)^2); the BCE term does, and most frames have
    none. `smooth` makes an empty target with an empty prediction a loss of 0.
    """
    logits = logits.squeeze(1)
    target = batch["mask"].float()
    prob = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    dice = 1 - (2 * (prob * flat).sum(1) + smooth) / (prob.sum(1) + flat.sum(1) + smooth)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    return dice + bce


def paper_dice_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], eps: float = 1e-7) -> torch.Tensor:
    """The paper recipe's SEG loss: segmentation_models_pytorch's DiceLoss(mode="multilabel", from_logits=True),
    the paper's, re-implemented. Per mask class (one here): ONE soft Dice over every pixel of every frame of
    the batch, no smoothing, its denominator clamped at `eps`; loss 1 - Dice, except 0 for a class without a
    positive pixel in the batch (Dice is undefined there, and smp masks it out, so such a batch gives no
    gradient at all); then the mean over classes. No BCE.

    logits (B, 1, S, S) float32, batch["mask"] (B, S, S) -> (B,): the batch loss repeated per frame, so that
    `run_epoch` (which averages per-frame losses) steps on it unchanged and reports the frame-weighted mean.
    Under DDP each worker's Dice pools its own share of the global batch only: on one worker it is the
    paper's loss exactly, on W workers the mean of W smaller batches' losses.
    """
    n, classes = logits.shape[:2]
    prob = F.logsigmoid(logits).exp().reshape(n, classes, -1)  # smp's sigmoid: through log-sigmoid, as it does
    target = batch["mask"].reshape(n, classes, -1).to(prob.dtype)
    intersection = (prob * target).sum((0, 2))
    cardinality = (prob + target).sum((0, 2))
    dice = 2 * intersection / cardinality.clamp_min(eps)
    has_positive = target.sum((0, 2)) > 0
    loss = ((1 - dice) * has_positive.to(dice.dtype)).mean()
    return loss.expand(n)


# By name: "cls" and "seg" are the fetaliqa recipe's losses of each task, "seg-paper-dice" the paper's SEG loss.
LOSSES = {"cls": cls_loss, "seg": seg_loss, "seg-paper-dice": paper_dice_loss}
