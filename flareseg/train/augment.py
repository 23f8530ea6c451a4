"""The paper's augmentation as one batched affine warp on the training device.

Each sample gets its own rotation, translation, scaling and shear; the image is
resampled bilinearly and the mask by nearest neighbour with the very same transform.
Parameters come from a CPU ``torch.Generator``, so a seed fixes them on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flareseg.train.config import AugmentConfig


def sample_affines(n: int, size: tuple[int, int], cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) sampling matrices for ``F.affine_grid`` (output -> input, normalised coordinates)."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

    angle = torch.deg2rad(uniform(-cfg.rotation_deg, cfg.rotation_deg))
    shear = torch.deg2rad(uniform(-cfg.shear_deg, cfg.shear_deg))
    scale = uniform(*cfg.scale)
    h, w = size
    tx = uniform(-cfg.translation, cfg.translation) * w
    ty = uniform(-cfg.translation, cfg.translation) * h
    apply = torch.rand(n, generator=generator, dtype=torch.float64) < cfg.probability
    # Forward transform in pixels about the slice centre: rotation . shear . scale, then translation.
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shr = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    shr[:, 0, 1] = torch.tan(shear)
    forward = rot @ shr @ (scale[:, None, None] * torch.eye(2, dtype=torch.float64))
    inverse = torch.linalg.inv(forward)
    shift = -(inverse @ torch.stack([tx, ty], -1)[..., None])[..., 0]
    # Pixels -> affine_grid's normalised coordinates (x by width, y by height).
    norm = torch.tensor([[2.0 / w, 0.0], [0.0, 2.0 / h]], dtype=torch.float64)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, :, :2] = norm @ inverse @ torch.linalg.inv(norm)
    theta[:, :, 2] = (norm @ shift[..., None])[..., 0]
    theta[~apply] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    return theta.float()


def augment_batch(images: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp (N, H, W) images (bilinear) and labels (nearest) with the same (N, 2, 3) matrices."""
    theta = theta.to(images.device)
    grid = F.affine_grid(theta, [images.shape[0], 1, *images.shape[-2:]], align_corners=False)
    # Areas moved in from outside the slice take the slice's minimum (air), not zero (the mean).
    floor = images.flatten(1).amin(1)[:, None, None, None]
    warped = F.grid_sample(images[:, None] - floor, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped_labels = F.grid_sample(
        labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return (warped + floor)[:, 0], warped_labels[:, 0].round().long()


def max_displacement_px(theta: torch.Tensor, size: tuple[int, int]) -> float:
    """Largest corner displacement of a batch of transforms, in pixels (for tests and logs)."""
    h, w = size
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    moved = torch.einsum("nij,kj->nki", theta.double(), corners.double())
    d = (moved - corners[None, :, :2].double()) * torch.tensor([w / 2, h / 2], dtype=torch.float64)
    return float(d.norm(dim=-1).max()) if math.prod(theta.shape) else 0.0
