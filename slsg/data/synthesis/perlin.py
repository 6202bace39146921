"""Perlin-noise anomaly masks, vectorised over a batch.

The release (after DRAEM) draws one 2-D Perlin field per sample with a lattice of
2^randint(0, s) cells per axis, rotates it by up to +-90 degrees and thresholds it.
Here the whole batch is computed at once and the rotation is applied to the sampling
coordinates rather than to a finished image: the field is evaluated exactly at the
rotated positions, so there is no interpolation blur and no empty corners (rotating a
finished square image, as imgaug does in the release, leaves zero-valued corners that
can never become anomalous).
"""
from __future__ import annotations

import math

import torch

from .validation import check_generator

__all__ = ["perlin_noise", "perlin_masks", "as_size"]

# Half-diagonal of the unit square: rotated coordinates stay within +-this.
_HALF_DIAG = math.sqrt(0.5) + 1e-4


def as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """Normalise an int or (H, W) into a checked (H, W) tuple."""
    if isinstance(size, int) and not isinstance(size, bool):
        h = w = size
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in size
    ):
        h, w = size
    else:
        raise ValueError(f"size must be an int or a pair of ints (H, W), got {size!r}")
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {(h, w)}")
    return h, w


def _fade(t: torch.Tensor) -> torch.Tensor:
    # Perlin's quintic 6t^5 - 15t^4 + 10t^3: C2-continuous across cell borders.
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    n: int,
    size: int | tuple[int, int],
    scale_max: int,
    generator: torch.Generator,
    rotation_deg: float = 90.0,
    chunk: int | None = None,
) -> torch.Tensor:
    """``n`` rotated Perlin fields, float32 ``[n, H, W]``, values roughly in [-1, 1].

    Each field has 2^e cells per axis with e drawn independently per axis from
    ``{0, ..., scale_max - 1}`` (``torch.randint`` semantics, as the release) and is
    rotated by an angle uniform in ``[-rotation_deg, rotation_deg]``. Values are scaled
    by sqrt(2) like the reference implementation, so the thresholds of the method
    (0.5 / 0.4) mean the same thing. Tensors live on the generator's device.
    ``chunk`` fields are computed at a time (default: about 128k pixels per chunk,
    which keeps the temporaries in cache; this is 2x faster than whole batches on CPU).
    """
    check_generator(generator)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(scale_max, int) or not 1 <= scale_max <= 10:
        raise ValueError(f"scale_max must be an int in [1, 10], got {scale_max!r}")
    h, w = as_size(size)
    device = generator.device
    if chunk is None:
        chunk = max(1, (1 << 17) // (h * w)) if device.type == "cpu" else max(1, (1 << 24) // (h * w))
    elif not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    # Draw every random number up front so results do not depend on ``chunk``.
    exps = torch.randint(0, scale_max, (n, 2), generator=generator, device=device)
    res = (2.0 ** exps.float()).view(n, 1, 1, 2)  # cells per axis (y, x)
    theta = (torch.rand(n, generator=generator, device=device) * 2.0 - 1.0) * math.radians(rotation_deg)
    lattice = math.ceil(2 * _HALF_DIAG * 2 ** (scale_max - 1)) + 2
    angles = torch.rand(n, lattice * lattice, generator=generator, device=device) * (2.0 * math.pi)
    grad_x, grad_y = torch.cos(angles), torch.sin(angles)

    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w - 0.5
    yy, xx = (t.reshape(1, h * w) for t in torch.meshgrid(ys, xs, indexing="ij"))
    # Rotation, shift into positive lattice coordinates and per-axis scaling folded
    # into one affine map per field: lattice_x = ax*x + bx*y + cx (same for y).
    cos, sin = torch.cos(theta).view(n, 1), torch.sin(theta).view(n, 1)
    rx, ry = res[:, 0, 0, 1].view(n, 1), res[:, 0, 0, 0].view(n, 1)
    ax, bx, cx = cos * rx, -sin * rx, _HALF_DIAG * rx
    ay, by, cy = sin * ry, cos * ry, _HALF_DIAG * ry

    out = torch.empty(n, h, w, dtype=torch.float32, device=device)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        fx = torch.addcmul(cx[sl], ax[sl], xx).addcmul_(bx[sl], yy)  # [c, HW]
        fy = torch.addcmul(cy[sl], ay[sl], xx).addcmul_(by[sl], yy)
        cell_x, cell_y = fx.floor(), fy.floor()
        fx.sub_(cell_x)
        fy.sub_(cell_y)
        # Flat index of the top-left lattice corner; exact in float32 (< 2^24).
        base = cell_x.add_(cell_y, alpha=lattice).to(torch.int64)
        fx1, fy1 = fx - 1.0, fy - 1.0  # offsets to the far corners
        gxs, gys = grad_x[sl], grad_y[sl]

        def corner(idx: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
            return torch.gather(gxs, 1, idx).mul_(dx).addcmul_(torch.gather(gys, 1, idx), dy)

        wx, wy = _fade(fx), _fade(fy)
        top = torch.lerp(corner(base, fx, fy), corner(base + 1, fx1, fy), wx)
        base += lattice
        bottom = torch.lerp(corner(base, fx, fy1), corner(base + 1, fx1, fy1), wx)
        out[sl] = torch.lerp(top, bottom, wy).mul_(math.sqrt(2.0)).view(-1, h, w)
    return out


def _check_foreground(foreground: torch.Tensor | None, n: int, h: int, w: int, device) -> torch.Tensor | None:
    if foreground is None:
        return None
    if not isinstance(foreground, torch.Tensor):
        raise TypeError(f"foreground must be a torch.Tensor, got {type(foreground).__name__}")
    fg = foreground
    if fg.dim() == 3 and fg.shape[0] == 1 and n != 1:
        fg = fg[0]
    if fg.dim() == 2:
        fg = fg.unsqueeze(0).expand(n, -1, -1)
    if fg.dim() != 3 or tuple(fg.shape) != (n, h, w):
        raise ValueError(
            f"foreground must have shape [H, W], [1, H, W] or [n, H, W] = [{n}, {h}, {w}], "
            f"got {list(foreground.shape)}"
        )
    return fg.to(device=device).bool()


def perlin_masks(
    n: int,
    size: int | tuple[int, int],
    scale_max: int,
    threshold: float,
    generator: torch.Generator,
    min_pixels: int = 49,
    foreground: torch.Tensor | None = None,
    rotation_deg: float = 90.0,
    max_rounds: int = 32,
) -> torch.Tensor:
    """``n`` boolean Perlin masks ``[n, H, W]``, each with at least ``min_pixels`` set.

    A mask is ``noise > threshold`` (restricted to ``foreground`` when given: a bool
    tensor ``[H, W]`` or ``[n, H, W]``). Masks with fewer than ``min_pixels`` set
    pixels are redrawn (only those, in one batch per round). After ``max_rounds``
    rounds any mask still short -- only likely with a tiny foreground -- keeps its
    last field and takes its ``min_pixels`` highest-noise allowed pixels, so the call
    always terminates with a Perlin-shaped blob.
    """
    check_generator(generator)
    h, w = as_size(size)
    if not isinstance(min_pixels, int) or min_pixels < 1:
        raise ValueError(f"min_pixels must be a positive int, got {min_pixels!r}")
    if min_pixels > h * w:
        raise ValueError(f"min_pixels={min_pixels} exceeds the mask area {h}x{w}={h * w}")
    if not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive int, got {max_rounds!r}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    fg = _check_foreground(foreground, n, h, w, generator.device)
    if fg is not None:
        area = fg.flatten(1).count_nonzero(1)
        if n and int(area.min()) < min_pixels:
            bad = int(area.argmin())
            raise ValueError(
                f"foreground of mask {bad} has {int(area[bad])} pixels, fewer than min_pixels={min_pixels}"
            )

    masks = None
    todo = torch.arange(n, device=generator.device)
    noise = None
    for _ in range(max_rounds):
        if todo.numel() == 0:
            break
        noise = perlin_noise(todo.numel(), (h, w), scale_max, generator, rotation_deg)
        cand = noise > threshold
        if fg is not None:
            cand &= fg[todo]
        ok = cand.flatten(1).count_nonzero(1) >= min_pixels
        if masks is None:
            masks = cand  # first round: keep the whole batch, redraw the failures in place
        else:
            masks[todo[ok]] = cand[ok]
        todo, noise = todo[~ok], noise[~ok]
    if masks is None:  # n == 0
        return torch.zeros(n, h, w, dtype=torch.bool, device=generator.device)
    if todo.numel():
        # Fallback: the min_pixels strongest allowed pixels of the last field.
        scores = noise.flatten(1)
        if fg is not None:
            scores = scores.masked_fill(~fg[todo].flatten(1), float("-inf"))
        kth = scores.topk(min_pixels, dim=1).values[:, -1:]
        masks[todo] = (scores >= kth).view(-1, h, w)
    return masks
