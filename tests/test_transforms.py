import torch

from fedbabu.data.transforms import Normalizer, random_crop_flip


def _reference(images, offsets, flips, padding=4):
    """The textbook per-image transform: pad, crop at the offset, maybe mirror."""
    out = []
    for img, (dy, dx), flip in zip(images, offsets.tolist(), flips.tolist(), strict=True):
        h, w, _ = img.shape
        padded = torch.zeros(h + 2 * padding, w + 2 * padding, img.shape[2], dtype=img.dtype)
        padded[padding:padding + h, padding:padding + w] = img
        crop = padded[dy:dy + h, dx:dx + w]
        out.append(crop.flip(1) if flip else crop)
    return torch.stack(out)


def test_batched_crop_flip_matches_per_image_reference():
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    got = random_crop_flip(images, torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 9, (64, 2), generator=draws)
    flips = torch.rand(64, generator=draws) < 0.5
    assert 0 < int(flips.sum()) < 64 and len(set(map(tuple, offsets.tolist()))) > 10
    assert torch.equal(got, _reference(images, offsets, flips))


def test_normalizer_gives_channels_last_standardized_floats():
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = Normalizer(mean, std)(images)
    assert x.shape == (8, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None]
    assert torch.allclose(x, expected, atol=1e-5)
    assert Normalizer(mean, std, channels_last=False)(images).is_contiguous()
