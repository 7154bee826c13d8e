"""The paper's SEG decoder (donglihe-hub/FetalCLIP-IQA, `model.py`'s UNETR), block by block with its channel
counts, as fetaliqa's own code: depthwise-separable convolutions with BatchNorm and ReLU, depthwise
transposed-convolution upsampling, 32 base filters in the paper.

Shapes: images (N, 3, S, S) float32; patch tokens (N, D, g, g) of four encoder blocks, shallow to deep
(the paper's z3, z6, z9, z12: blocks 6, 8, 12 and 24 of FetalCLIP, `encoders.seg_block_indices`),
resampled to S / 16 per side as the paper's code does (16 -> 14 for 224 / 14).
"""

from __future__ import annotations

import torch
from torch import nn

from fetaliqa.models.heads import UPSAMPLINGS, resample_tokens

# The paper's `init_filters`.
PAPER_BASE_FILTERS = 32


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 convolution, BatchNorm, ReLU, then pointwise 1x1 convolution, BatchNorm, ReLU; both
    convolutions with bias (the paper's Conv2DBlock). (N, c_in, H, W) -> (N, c_out, H, W).
    Parameters: 12 c_in + c_in c_out + 3 c_out."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
            nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )


def depthwise_up(channels: int) -> nn.ConvTranspose2d:
    """2x2 stride-2 transposed convolution per channel (groups = channels), with bias: (N, c, H, W) ->
    (N, c, 2H, 2W); 5 c parameters (the paper's SingleDeconv2DBlock as its blocks use it)."""
    return nn.ConvTranspose2d(channels, channels, 2, stride=2, groups=channels)


class UpSeparable(nn.Sequential):
    """`depthwise_up` then `SeparableConv` (the paper's Deconv2DBlock). (N, c_in, H, W) -> (N, c_out, 2H, 2W).
    Parameters: 17 c_in + c_in c_out + 3 c_out."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(depthwise_up(c_in), SeparableConv(c_in, c_out))


class UpPointwise(nn.Sequential):
    """`depthwise_up` then a pointwise 1x1 convolution, no norm, no activation (the paper's
    SingleDWConv2DBlock). (N, c_in, H, W) -> (N, c_out, 2H, 2W). Parameters: 5 c_in + c_in c_out + c_out."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(depthwise_up(c_in), nn.Conv2d(c_in, c_out, 1))


class PaperUnetrDecoder(nn.Module):
    """The paper's UNETR decoder: the image and four blocks' tokens -> mask logits (N, 1, S, S).

    With base filters F, token width D and g = S / 16 (the paper's stage names in brackets):
      image      (S)  -> 2 SeparableConv                                (F, S)     [decoder0]
      tokens[0]  (g)  -> 3 UpSeparable: D -> 8F -> 4F -> 2F             (2F, 8g)   [decoder3]
      tokens[1]  (g)  -> 2 UpSeparable: D -> 8F -> 4F                   (4F, 4g)   [decoder6]
      tokens[2]  (g)  -> UpSeparable: D -> 8F                           (8F, 2g)   [decoder9]
      tokens[3]  (g)  -> UpPointwise: D -> 8F                           (8F, 2g)   [decoder12_upsampler]
      cat(tokens[2], tokens[3]) 16F -> 3 SeparableConv -> UpPointwise   (4F, 4g)   [decoder9_upsampler]
      cat with tokens[1]        8F  -> 2 SeparableConv -> UpPointwise   (2F, 8g)   [decoder6_upsampler]
      cat with tokens[0]        4F  -> 2 SeparableConv -> UpPointwise   (F, 16g)   [decoder3_upsampler]
      cat with the image        2F  -> 2 SeparableConv -> 1x1 conv      (1, S)     [decoder0_header]
    Each concatenation puts the skip first and the deeper path second, as the paper's does.
    """

    def __init__(self, token_dim: int, filters: int, image_size: int):
        super().__init__()
        if image_size % (2**UPSAMPLINGS):
            raise ValueError(f"SEG needs an image size divisible by {2**UPSAMPLINGS}, got {image_size}")
        self.grid = image_size // 2**UPSAMPLINGS
        f = filters
        self.image_skip = nn.Sequential(SeparableConv(3, f), SeparableConv(f, f))
        self.skip0 = nn.Sequential(UpSeparable(token_dim, 8 * f), UpSeparable(8 * f, 4 * f), UpSeparable(4 * f, 2 * f))
        self.skip1 = nn.Sequential(UpSeparable(token_dim, 8 * f), UpSeparable(8 * f, 4 * f))
        self.skip2 = UpSeparable(token_dim, 8 * f)
        self.deepest = UpPointwise(token_dim, 8 * f)
        self.merge2 = nn.Sequential(SeparableConv(16 * f, 8 * f), SeparableConv(8 * f, 8 * f),
                                    SeparableConv(8 * f, 8 * f), UpPointwise(8 * f, 4 * f))
        self.merge1 = nn.Sequential(SeparableConv(8 * f, 4 * f), SeparableConv(4 * f, 4 * f), UpPointwise(4 * f, 2 * f))
        self.merge0 = nn.Sequential(SeparableConv(4 * f, 2 * f), SeparableConv(2 * f, 2 * f), UpPointwise(2 * f, f))
        self.out = nn.Sequential(SeparableConv(2 * f, f), SeparableConv(f, f), nn.Conv2d(f, 1, 1))

    def forward(self, images: torch.Tensor, tokens: list[torch.Tensor]) -> torch.Tensor:
        """images (N, 3, S, S), tokens: 4 x (N, D, h, w) -> mask logits (N, 1, S, S), float."""
        t0, t1, t2, t3 = (resample_tokens(t, self.grid) for t in tokens)
        x = self.merge2(torch.cat([self.skip2(t2), self.deepest(t3)], dim=1))
        x = self.merge1(torch.cat([self.skip1(t1), x], dim=1))
        x = self.merge0(torch.cat([self.skip0(t0), x], dim=1))
        return self.out(torch.cat([self.image_skip(images), x], dim=1))
