"""The two training recipes, `--recipe fetaliqa|paper`: what each does where they differ.

"fetaliqa" (the default) is fetaliqa's own protocol: a split of the sorted ids (seed 0), every train frame
augmented afresh every epoch at 224 px, LoRA on the whole attention (q, k, v, out) and the MLP, SEG trained
with per-frame soft Dice + BCE, positives at score >= threshold. "paper" follows the paper's code
(donglihe-hub/FetalCLIP-IQA) where it changes numbers: its split of the csv's uuids with its seed, its
offline augmentation (a plain and an augmented copy of each train frame, made once at native size, labels
recomputed), cv2 resizing, its LoRA targets (`models.paper_lora`), for SEG its decoder (the encoder under
no_grad, so its LoRA never trains) and its loss (smp's multilabel Dice over the batch), and p > 0.5 for CLS.
"""

from __future__ import annotations

from dataclasses import dataclass

from fetaliqa.models import LoraSpec, paper_lora
from fetaliqa.training.protocol import PAPER_SEED


@dataclass(frozen=True)
class Recipe:
    """name; seed: the default --seed (split, copies, first trial); paper_copies: train frames materialised
    once as a plain and an augmented copy (else augmented every epoch); seg_loss: key of `step.LOSSES`;
    decoder: the SEG decoder, one of `models.DECODERS`;
    strict: positive when score > the default threshold (else >=); resize: how frames become 224 px, a key of
    `preprocess.RESIZES`, recorded in the checkpoint so that scoring resizes alike."""

    name: str
    seed: int
    paper_copies: bool
    seg_loss: str
    decoder: str
    strict: bool
    resize: str

    def lora(self, model: str) -> LoraSpec:
        """The LoRA placement of `model` in this recipe."""
        return paper_lora(model) if self.name == "paper" else LoraSpec()


RECIPES = {
    "fetaliqa": Recipe("fetaliqa", seed=0, paper_copies=False, seg_loss="seg", decoder="fetaliqa", strict=False,
                       resize="bicubic"),
    "paper": Recipe("paper", seed=PAPER_SEED, paper_copies=True, seg_loss="seg-paper-dice", decoder="paper",
                    strict=True, resize="cv2-cubic"),
}
