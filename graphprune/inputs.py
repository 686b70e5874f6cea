"""Structured (image-like) inputs from the photos bundled with scikit-image: redundancy that white noise lacks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def photos(count: int) -> list[np.ndarray]:
    """``count`` RGB photos (H, W, 3) in [0, 1] from ``skimage.data``, cycling through a fixed list."""
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("structured inputs need scikit-image: pip install 'graphprune[bench]'") from exc
    out = []
    for i in range(count):
        img = getattr(data, _PHOTOS[i % len(_PHOTOS)])()
        out.append(img[..., :3].astype(np.float32) / 255.0)
    return out


def image_latents(batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """(batch, channels, height, width) latents made from photos: RGB + luminance channels, standardized.

    A stand-in for VAE latents of real images (no VAE weights here): spatially smooth, with edges and textures.
    """
    rows = []
    for img in photos(batch):
        t = torch.from_numpy(img).permute(2, 0, 1)[None]  # (1, 3, H, W)
        t = F.interpolate(t, size=(height, width), mode="area")[0]
        lum = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2])[None]
        chans = torch.cat([t, lum, 1 - t, 1 - lum])[:channels]
        if chans.shape[0] < channels:
            chans = chans.repeat((channels + chans.shape[0] - 1) // chans.shape[0], 1, 1)[:channels]
        rows.append((chans - chans.mean()) / (chans.std() + 1e-6))
    return torch.stack(rows)
