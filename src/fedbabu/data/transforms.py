"""Batched augmentation and normalization on uint8 NHWC tensors.

A whole batch is cropped, flipped and normalized with a handful of tensor operations, instead of
one Python call per image: the per-image loop of a ``DataLoader`` costs more than the 4convNet's
forward pass on a CPU. The output is an NCHW view of NHWC memory, i.e. already ``channels_last``.
"""

from __future__ import annotations

import torch


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop of the original size after zero-padding, then a random horizontal flip, per image.

    Offsets and flips are drawn in one call each from ``generator``, in a fixed order, so a
    per-image reference (see the tests) given the same draws produces the same pixels.
    """
    n, height, width, _ = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))
    rows = offsets[:, 0:1] + torch.arange(height)
    cols = offsets[:, 1:2] + torch.arange(width)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


class Normalizer:
    """uint8 NHWC -> float NCHW (channels_last memory), standardized with the dataset's mean/std.

    Float feature rows (a user's tabular data, see :func:`fedbabu.data.custom.from_arrays`) are not
    images: they go to the model as they are, in float32.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool = True) -> None:
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32)
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        if images.dtype != torch.uint8:
            return images.to(torch.float32)
        x = images.to(torch.float32).mul_(self.scale.to(device)).sub_(self.shift.to(device))
        x = x.permute(0, 3, 1, 2)
        return x if self.channels_last else x.contiguous()
