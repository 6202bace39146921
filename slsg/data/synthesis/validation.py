"""Input checks shared by the synthesis modules: bad input fails loudly, naming the problem."""
from __future__ import annotations

import torch

# Images converted from 8-bit files can carry tiny rounding excursions.
_RANGE_TOLERANCE = 1e-4


def check_image(image: object, name: str = "image") -> tuple[int, int]:
    """Check a float image tensor ``[3, H, W]`` with values in [0, 1]; return (H, W)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [3, H, W], got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{name} must have shape [3, H, W] (RGB, channels first), got {list(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got dtype {image.dtype}")
    if image.shape[1] < 2 or image.shape[2] < 2:
        raise ValueError(f"{name} is too small: {list(image.shape)}")
    lo, hi = torch.aminmax(image)
    lo, hi = float(lo), float(hi)
    if not (lo == lo and hi == hi) or abs(lo) == float("inf") or abs(hi) == float("inf"):
        raise ValueError(f"{name} contains NaN or infinite values")
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(
            f"{name} values must lie in [0, 1] (got min {lo:.4g}, max {hi:.4g}); "
            "divide 8-bit images by 255"
        )
    return int(image.shape[1]), int(image.shape[2])


def check_same_size(image: torch.Tensor, other: torch.Tensor, name: str, other_name: str) -> None:
    if image.shape[-2:] != other.shape[-2:]:
        raise ValueError(
            f"{other_name} has size {list(other.shape[-2:])} but {name} has size {list(image.shape[-2:])}; "
            "resize them to the same size first"
        )


def check_mask(mask: object, size: tuple[int, int], name: str = "mask") -> torch.Tensor:
    """Accept a mask ``[H, W]`` or ``[1, H, W]`` (bool or {0, 1} numbers); return bool ``[H, W]``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [H, W] or [1, H, W], got {type(mask).__name__}")
    m = mask[0] if mask.dim() == 3 and mask.shape[0] == 1 else mask
    if m.dim() != 2 or tuple(m.shape) != tuple(size):
        raise ValueError(f"{name} must have shape [{size[0]}, {size[1]}] or [1, {size[0]}, {size[1]}], "
                         f"got {list(mask.shape)}")
    if m.dtype == torch.bool:
        return m
    if m.is_complex():
        raise TypeError(f"{name} must be bool or real-valued, got dtype {mask.dtype}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1 (or be a bool tensor)")
    return m.bool()


def check_generator(generator: object, device: torch.device | None = None) -> torch.Generator:
    """Check ``generator`` is a torch.Generator (on ``device``'s type when given)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if device is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the image is on {device}; "
                         "create the generator on the image's device")
    return generator


def check_probability(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
