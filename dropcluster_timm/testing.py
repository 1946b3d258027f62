""" Synthetic activations with known structure, for tests and benchmarks of the clustering engine."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['smooth_region_fields']


def smooth_region_fields(
        batch: int,
        channels: int,
        height: int,
        width: int,
        regions: int,
        generator: Optional[torch.Generator] = None,
        noise: float = 0.3,
) -> Tensor:
    """Activations ``(B, C, H, W)`` made of ``regions`` Voronoi cells per channel.

    Each cell carries one random value per sample; a smooth random field (5x5 box-filtered noise,
    weight ``3 * noise``) and white noise (std 0.1) are added. The cells are the ground-truth
    clusters.
    """
    seeds = torch.rand(channels, regions, 2, generator=generator) * torch.tensor([height, width])
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing='ij')
    pix = torch.stack([yy, xx], -1).view(1, -1, 1, 2)
    region = (pix - seeds.view(channels, 1, regions, 2)).norm(dim=-1).argmin(-1)
    vals = torch.randn(batch, channels, regions, generator=generator)
    x = vals.gather(2, region.unsqueeze(0).expand(batch, channels, -1)).view(batch, channels, height, width)
    smooth = F.avg_pool2d(torch.randn(batch, channels, height, width, generator=generator), 5, 1, 2)
    return x + 3 * noise * smooth + 0.1 * torch.randn(batch, channels, height, width, generator=generator)
