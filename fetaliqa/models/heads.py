"""Heads on the image tower: a linear classifier (CLS) and fetaliqa's UNETR-style mask decoder (SEG); the
paper's own decoder is `paper_unetr.PaperUnetrDecoder`.

Shapes: images (N, 3, S, S) float32 (bf16 or float16 when scoring on CUDA, channels_last: `FrameModel`); patch
tokens (N, D, g, g) with g = S / patch (16 for 224 / 14).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UPSAMPLINGS = 4  # four 2x up-convolutions take the token grid to the image: the grid is resampled to S / 16


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each with instance norm and LeakyReLU (MONAI's UnetBasicBlock).
    (N, c_in, H, W) -> (N, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.InstanceNorm2d(c_out, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.InstanceNorm2d(c_out, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class TokenUpBlock(nn.Sequential):
    """Patch tokens to a finer skip feature map (UNETR's PrUp block): one up-convolution, then
    `extra` times (up-convolution + ConvBlock). (N, D, g, g) -> (N, c_out, g * 2**(extra+1), ...)."""

    def __init__(self, c_in: int, c_out: int, extra: int):
        layers: list[nn.Module] = [nn.ConvTranspose2d(c_in, c_out, 2, stride=2)]
        for _ in range(extra):
            layers += [nn.ConvTranspose2d(c_out, c_out, 2, stride=2), ConvBlock(c_out, c_out)]
        super().__init__(*layers)


class DecoderUpBlock(nn.Module):
    """Up-convolve the deeper map, concatenate the skip, mix with a ConvBlock (UNETR's Up block).
    x (N, c_in, h, w), skip (N, c_out, 2h, 2w) -> (N, c_out, 2h, 2w)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.conv = ConvBlock(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UnetrDecoder(nn.Module):
    """UNETR-style decoder: the image and the tokens of four encoder blocks (shallow to deep) -> mask logits.

    With base width C, token width D and g = S / 16 (14 for S = 224; tokens are resampled to it):
      image            -> ConvBlock                 -> (C, S)      skip 1
      tokens[0] (g)    -> 3 up-convs                -> (2C, S/2)   skip 2
      tokens[1] (g)    -> 2 up-convs                -> (4C, S/4)   skip 3
      tokens[2] (g)    -> 1 up-conv                 -> (8C, S/8)   skip 4
      tokens[3] (g)    -> up + skip 4 -> up + skip 3 -> up + skip 2 -> up + skip 1 -> 1x1 conv -> (1, S)
    The deepest tokens pass through the whole decoder; shallower ones enter at finer resolutions.
    """

    def __init__(self, token_dim: int, channels: int, image_size: int):
        super().__init__()
        if image_size % (2**UPSAMPLINGS):
            raise ValueError(f"SEG needs an image size divisible by {2**UPSAMPLINGS}, got {image_size}")
        self.grid = image_size // 2**UPSAMPLINGS
        c = channels
        self.skip1 = ConvBlock(3, c)
        self.skip2 = TokenUpBlock(token_dim, 2 * c, extra=2)
        self.skip3 = TokenUpBlock(token_dim, 4 * c, extra=1)
        self.skip4 = TokenUpBlock(token_dim, 8 * c, extra=0)
        self.up4 = DecoderUpBlock(token_dim, 8 * c)
        self.up3 = DecoderUpBlock(8 * c, 4 * c)
        self.up2 = DecoderUpBlock(4 * c, 2 * c)
        self.up1 = DecoderUpBlock(2 * c, c)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, images: torch.Tensor, tokens: list[torch.Tensor]) -> torch.Tensor:
        """images (N, 3, S, S), tokens: 4 x (N, D, h, w) -> mask logits (N, 1, S, S), float."""
        t1, t2, t3, t4 = (self._resample(t) for t in tokens)
        x = self.up4(t4, self.skip4(t3))
        x = self.up3(x, self.skip3(t2))
        x = self.up2(x, self.skip2(t1))
        x = self.up1(x, self.skip1(images))
        return self.out(x)

    def _resample(self, tokens: torch.Tensor) -> torch.Tensor:
        return resample_tokens(tokens, self.grid)


def resample_tokens(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens (N, D, h, w) -> (N, D, grid, grid), bilinear (align_corners=False); unchanged if already so.

    16 x 16 tokens (224 / 14) become 14 x 14 so that four 2x up-convolutions land exactly on 224, as the
    paper's code does."""
    if tokens.shape[-2:] == (grid, grid):
        return tokens
    # Channels-last: on CUDA the NCHW bilinear kernel runs a thread per output pixel (14 x 14) and loops
    # over batch x channels, and took 75% of FetalCLIP_SEG's time on an H100 (1.7 ms a frame); the
    # channels-last kernel spreads over every output element. Same values (tests/test_models.py).
    tokens = tokens.contiguous(memory_format=torch.channels_last)
    return F.interpolate(tokens, size=(grid, grid), mode="bilinear", align_corners=False)
