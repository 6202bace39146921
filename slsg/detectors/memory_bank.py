"""A PatchCore-style memory-bank detector (Roth et al., CVPR 2022): the project's baseline.

fit: frozen ImageNet backbone -> locally aware patch embeddings of normal images -> coreset memory
bank. predict: distance of each test patch to its nearest normal patch -> anomaly map (upsampled,
Gaussian-smoothed) -> image score = mean of the top-k map values (k=1: the maximum).

Design choices, and why:
- EfficientNet-Lite2 by default: on MTD validation it and a 10% coreset raised image AUROC by
  0.014-0.042 at three seeds over Lite0 with 1% (benchmarks/RESULTS.md).
- Two mid-level stages (strides 8 and 16; for EfficientNet-Lite2 the ends of the 48- and 120-channel
  stages, for ResNets layer2 and layer3 as in PatchCore). Shallower stages describe generic edges and
  textures and quadruple the number of patches; the stride-32 stage is biased towards ImageNet
  classes and, at 8x8 cells for a 256 px input, too coarse to localise small defects. Stride 8
  gives a 32x32 grid at 256 px; the stride-16 features add context.
- 3x3 average pooling of each map before concatenation ("locally aware" patches): each patch then
  describes its neighbourhood, which makes the nearest-neighbour distance robust to small shifts.
- Images keep their aspect ratio (``resize="keep_aspect"``): one scale factor, fixed at fit so
  that the training images' median shorter side becomes ``image_size``, resizes every image.
  Nearest-neighbour distances compare local texture, so every patch must be seen at the same
  scale; squashing images of varied aspect ratio to a square (``resize="square"``, the usual
  PatchCore input) stretches each one differently. For a dataset of equal square images both
  modes give the same input.
- Edge patches are measured against their own normal level (``edge_band``, slsg.detectors.edges):
  on held-out normal images the cells at an image's edge lie further from the bank than interior
  ones, so without this the maximum of a normal map sits at its edge in almost every image (97% on
  MTD validation) and sets the bar an interior defect must clear. Each patch distance is divided by
  the mean held-out normal distance of cells at the same offset from the edges, floored at the
  interior's. On MTD validation (simulated anomalies, no test image) this raised image AUROC by
  0.015-0.022 at three seeds; it also discounts defects that touch the edge (benchmarks/RESULTS.md).
- Threshold from normal images only: a seeded share of the training images (``calibration_ratio``)
  is held out of the memory bank; their image scores against the bank estimate the score
  distribution of unseen normal images, and ``threshold_quantile`` of it becomes the threshold.
  Test images are never used.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from slsg import ops
from slsg.backbones import Backbone, create
from slsg.detectors.base import (Detector, ModelError, check_image_batch, collate_images,
                                 gaussian_smooth, image_sizes, register)
from slsg.detectors.edges import (band_of_levels, divide_by_edge_levels, edge_class_sums, edge_classes,
                                  levels_from_sums, total_class_sums)
from slsg.data.io import check_bit_depth
from slsg.memory import MemoryBank, coreset_size
from slsg.metrics import threshold_from_normal
from slsg.utils import atomic_path, elapsed_status


RESIZE_MODES = ("keep_aspect", "square")
# Below this many held-out normal images, a quantile of their scores is mostly one image's score.
MIN_CALIBRATION_IMAGES = 5


@dataclass
class MemoryBankConfig:
    # EfficientNet-Lite2 and a 10% coreset: chosen on validation data (benchmarks/RESULTS.md, "Choosing
    # the defaults"); Lite0 and 1% are about 6x faster to fit on large training sets.
    backbone: str = "efficientnet_lite2"
    weights: str | None = "imagenet"  # "imagenet", a state-dict path, or None (random: tests only)
    strides: tuple[int, ...] = (8, 16)  # backbone stages whose features form the patch embedding
    image_size: int = 256
    resize: str = "keep_aspect"  # "keep_aspect" (one scale for all images) or "square" (S x S)
    # Bits per sample of the images when wider than 8 (e.g. 12 for a 12-bit camera's 16-bit
    # files); None: their container's 16. How the CLI opens this model's data (slsg.data.io).
    bit_depth: int | None = None
    pool_size: int = 3  # neighbourhood aggregated into each patch embedding
    embed_dim: int | None = None  # adaptive average pooling of the concatenated channels; None keeps all
    # Share of training patches kept in the memory bank (None keeps all). PatchCore's paper uses 1-25%;
    # 10% (as anomalib) covers rare normal patterns better than 1% (validation on MTD), and the pruned
    # greedy selection keeps it to seconds for ~200 images.
    coreset_ratio: float | None = 0.1
    seed: int = 0
    sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in pixels of the model's input
    score_topk: int = 1  # image score = mean of the top-k map values
    # Cells within this many grid cells of an image edge are scored against the held-out normal
    # level of their offset from the edges (slsg.detectors.edges); 0 turns it off. Needs held-out
    # calibration images (calibration_ratio > 0). 4 cells = 32 px at stride 8.
    edge_band: int = 4
    # PatchCore's image-score reweighting (Roth et al., eq. 7): scale the score by how isolated the
    # most anomalous patch's nearest normal patch is among its `score_reweight` nearest bank
    # neighbours. 0 turns it off; PatchCore (and anomalib) use 9. With these features the patch
    # distances are tens of units, so the softmax saturates and the weight stays within 0.5% of 1
    # (held-out training images of bottle and MTD): image AUROC on MTD validation was unchanged.
    score_reweight: int = 0
    calibration_ratio: float = 0.1  # share of training images held out to set the threshold
    threshold_quantile: float = 0.99
    batch_size: int = 8
    num_workers: int = 0

    def __post_init__(self) -> None:
        if not self.strides or any(s not in (2, 4, 8, 16, 32) for s in self.strides):
            raise ValueError(f"strides must be a non-empty subset of (2, 4, 8, 16, 32), got {self.strides}")
        self.strides = tuple(sorted(set(self.strides)))
        if self.image_size < 32 or self.image_size % max(self.strides):
            raise ValueError(f"image_size must be a multiple of {max(self.strides)} and at least 32, "
                             f"got {self.image_size}")
        check_bit_depth(self.bit_depth)
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.coreset_ratio is not None and not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must lie in (0, 1] or be None, got {self.coreset_ratio}")
        if not 0.0 <= self.calibration_ratio < 1.0:
            raise ValueError(f"calibration_ratio must lie in [0, 1), got {self.calibration_ratio}")
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise ValueError(f"threshold_quantile must lie in (0, 1], got {self.threshold_quantile}")
        if self.pool_size < 1 or self.pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd number, got {self.pool_size}")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive or None, got {self.embed_dim}")
        if self.score_reweight < 0 or self.score_reweight == 1:
            raise ValueError(f"score_reweight must be 0 (off) or at least 2 neighbours, got {self.score_reweight}")
        if self.edge_band < 0:
            raise ValueError(f"edge_band must be >= 0 (0: off), got {self.edge_band}")
        if self.score_topk < 1 or self.sigma < 0 or self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("score_topk and batch_size must be >= 1, sigma and num_workers >= 0")


@register("memory_bank")
class MemoryBankDetector(Detector):
    config_class = MemoryBankConfig

    def __init__(self, config: MemoryBankConfig | None = None, device: str | torch.device | None = None,
                 progress: bool = True) -> None:
        super().__init__(config or MemoryBankConfig())
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.progress = progress
        self.backbone: Backbone | None = None
        self._fast_backbone: Backbone | None = None  # fused inference copy of self.backbone
        self.bank: MemoryBank | None = None
        # Level per edge class: held-out normal mean, floored at the interior's (slsg.detectors.edges);
        # None: raw distances.
        self.edge_levels: torch.Tensor | None = None

    # ------------------------------------------------------------------ features
    def _backbone(self) -> Backbone:
        if self.backbone is None:
            cfg = self.config
            self.backbone = create(cfg.backbone, weights=cfg.weights, max_stride=max(cfg.strides)).to(self.device)
            self._fast_backbone = None
        return self.backbone

    def _inference_backbone(self) -> Backbone:
        if self._fast_backbone is None:
            self._fast_backbone = self._backbone().fused()
        return self._fast_backbone

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [B, h, w, D] of images [B, 3, H, W] already at the model's input size."""
        cfg = self.config
        images = images.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
        feats = self._inference_backbone()(images, strides=cfg.strides)
        grid = feats[cfg.strides[0]].shape[-2:]
        parts = []
        for stride in cfg.strides:
            f = feats[stride]
            if cfg.pool_size > 1:
                f = F.avg_pool2d(f, cfg.pool_size, stride=1, padding=cfg.pool_size // 2, count_include_pad=False)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            parts.append(f)
        x = torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # [B, h, w, C]
        if cfg.embed_dim is not None and cfg.embed_dim != x.shape[-1]:
            b, h, w, c = x.shape
            x = F.adaptive_avg_pool1d(x.reshape(-1, 1, c), cfg.embed_dim).reshape(b, h, w, cfg.embed_dim)
        return x.contiguous()

    @property
    def dataset_image_size(self) -> int | None:
        return self.config.image_size if self.config.resize == "square" else None

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of ``height`` x ``width`` pixels is resized to before the backbone."""
        cfg = self.config
        if cfg.resize == "square":
            return cfg.image_size, cfg.image_size
        scale = self.fit_info.get("input_scale")
        if scale is None:
            raise RuntimeError("the detector is not fitted: its input scale is set by fit(dataset)")
        multiple = max(cfg.strides)  # every stage then has a whole number of cells
        return tuple(max(2 * multiple, round(side * scale / multiple) * multiple) for side in (height, width))


    # ------------------------------------------------------------------ fit
    def fit(self, dataset: Dataset) -> "MemoryBankDetector":
        # _fit sets the model's state step by step (the input scale first: resizing needs it), so
        # a fit that fails partway would leave a mix of old and new state that predicts wrongly
        # and saves as an unloadable model: put the previous state back instead.
        previous = (self.fit_info, self.bank, self.image_threshold, self.edge_levels)
        try:
            return self._fit(dataset)
        except BaseException:
            self.fit_info, self.bank, self.image_threshold, self.edge_levels = previous
            raise

    def _fit(self, dataset: Dataset) -> "MemoryBankDetector":
        cfg = self.config
        start = time.perf_counter()
        n = len(dataset)
        if n == 0:
            raise ValueError("fit: the training dataset is empty")
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(n, generator=generator).tolist()
        n_cal = min(n - 1, max(1, round(cfg.calibration_ratio * n))) if cfg.calibration_ratio > 0 else 0
        cal_index, bank_index = sorted(order[:n_cal]), sorted(order[n_cal:])
        if 0 < n_cal < MIN_CALIBRATION_IMAGES:
            warnings.warn(f"the image threshold comes from only {n_cal} held-out normal image(s) of {n} "
                          f"(calibration_ratio={cfg.calibration_ratio}): expect it to flag many normal images; "
                          "more training images make it reliable", stacklevel=3)
        if cfg.resize == "square":
            self.fit_info = {"input_scale": None}
            input_sizes = [(cfg.image_size, cfg.image_size)] * n
        else:
            sizes = image_sizes(dataset)
            shorter = sorted(min(h, w) for h, w in sizes)
            self.fit_info = {"input_scale": cfg.image_size / shorter[len(shorter) // 2]}
            input_sizes = [self.input_size(*s) for s in sizes]

        cell = min(cfg.strides)
        patches = sum((h // cell) * (w // cell) for h, w in (input_sizes[i] for i in bank_index))
        features = self._collect_features(Subset(dataset, bank_index), patches)
        feature_seconds = time.perf_counter() - start
        kept = coreset_size(len(features), cfg.coreset_ratio)
        with elapsed_status(f"coreset: selecting {kept:,} of {len(features):,} patches",
                            enabled=self.progress and kept < len(features)):
            self.bank = MemoryBank.build(features, coreset_ratio=cfg.coreset_ratio, seed=cfg.seed)
        coreset_seconds = time.perf_counter() - start - feature_seconds
        del features

        self.image_threshold = None
        self.edge_levels = None
        cal_scores: list[float] = []
        if cal_index:
            cal_scores = self._calibrate(Subset(dataset, cal_index))
            self.image_threshold = threshold_from_normal(cal_scores, cfg.threshold_quantile)
        if cfg.edge_band and self.edge_levels is None:
            why = (f"they need at least 2 held-out normal images, and {n_cal} of {n} were held out "
                   f"(calibration_ratio={cfg.calibration_ratio})" if n_cal < 2 else
                   "the held-out images' interior patches all matched the memory bank exactly")
            warnings.warn(f"edge levels (edge_band={cfg.edge_band}) are off for this model: {why}; "
                          "edge patches are scored on raw distances", stacklevel=3)
        self.fit_info.update({
            "train_images": len(bank_index),
            "calibration_images": len(cal_index),
            "calibration_indices": cal_index,
            "bank_size": len(self.bank),
            "embedding_dim": int(self.bank.dim),
            "calibration_score_max": max(cal_scores) if cal_scores else None,
            "edge_levels": self.edge_levels.tolist() if self.edge_levels is not None else None,
            "feature_seconds": feature_seconds,
            "coreset_seconds": coreset_seconds,
            "fit_seconds": time.perf_counter() - start,
        })
        return self

    @torch.no_grad()
    def _calibrate(self, held_out: Dataset) -> list[float]:
        """Set the edge levels from the held-out normal images and return their image scores.
        Each image is scored with the levels of the other held-out images (leave one out), as an
        unseen image would be: with its own distances in its levels its score would be biased low,
        and so would the threshold taken from these scores. So edge levels need at least two
        held-out images; with one, the model keeps raw distances."""
        cfg = self.config
        searched = []  # per image: what scoring it needs, so that it is searched only once
        for batch in self._batches(held_out, "calibration"):
            for images in ([x[None] for x in batch] if isinstance(batch, list) else [batch]):
                images = check_image_batch(images)
                resized = self.resize_to_input(images)
                dist, nearest, emb = self._search_patches(resized)
                for i in range(len(images)):
                    # Reweighting needs the embedding of the image's worst patch only, which under
                    # any levels is the worst patch of one edge class: keep those rows, not all.
                    rows = _class_maxima(dist[i], cfg.edge_band) if cfg.score_reweight else None
                    kept = (rows, emb[i].reshape(-1, emb.shape[-1])[rows].clone()) if rows is not None else None
                    searched.append((dist[i:i + 1].clone(), nearest[i:i + 1].clone(), kept,
                                     resized.shape[-2:], images.shape[-2:]))
        use_levels = cfg.edge_band > 0 and len(searched) >= 2
        sums = [edge_class_sums(dist[0], cfg.edge_band) for dist, *_ in searched] if use_levels else []
        total_sum, total_count = total_class_sums(sums) if sums else (None, None)
        self.edge_levels = levels_from_sums(total_sum, total_count) if sums else None
        scores = []
        for i, (dist, nearest, kept, input_size, out_size) in enumerate(searched):
            levels = self.edge_levels
            if levels is not None:
                levels = levels_from_sums(total_sum - sums[i][0], total_count - sums[i][1])
                # None only when the other images' interior distances are all 0 (duplicates of
                # bank images): then this image's own levels are all there is.
                levels = self.edge_levels if levels is None else levels
            emb = None
            if kept is not None:
                rows, vectors = kept
                emb = vectors.new_zeros(dist.numel(), vectors.shape[-1])
                emb[rows] = vectors
                emb = emb.reshape(*dist.shape, -1)
            score, _ = self._score(dist, nearest, emb, input_size, out_size, levels)
            scores.append(float(score[0]))
        return scores

    def _batches(self, dataset: Dataset, what: str):
        loader = DataLoader(dataset, batch_size=self.config.batch_size, shuffle=False,
                            num_workers=self.config.num_workers, collate_fn=_collate_images)
        yield from tqdm(loader, desc=what, unit="batch", disable=not self.progress, leave=False)

    def _collect_features(self, dataset: Dataset, patches: int) -> torch.Tensor:
        """All ``patches`` patch embeddings of ``dataset`` as [patches, D], filled into one
        preallocated tensor (concatenating per-batch pieces would briefly need twice the memory)."""
        features: torch.Tensor | None = None
        row = 0
        for batch in self._batches(dataset, "features"):
            for images in ([x[None] for x in batch] if isinstance(batch, list) else [batch]):
                emb = self.embed(self.resize_to_input(check_image_batch(images)))
                emb = emb.reshape(-1, emb.shape[-1]).cpu()
                if features is None:
                    features = torch.empty(patches, emb.shape[1], dtype=emb.dtype)
                if row + emb.shape[0] > patches:
                    raise RuntimeError("the dataset's images are larger than its reported sizes")
                features[row:row + emb.shape[0]] = emb
                row += emb.shape[0]
        assert features is not None
        if row != patches:
            raise RuntimeError(f"expected {patches} patch embeddings from the dataset's image sizes, got {row}")
        return features

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def patch_distances(self, images: torch.Tensor) -> torch.Tensor:
        """Distance of each patch to its nearest memory-bank patch, [B, h, w]."""
        return self._search_patches(images)[0]

    def _search_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest-normal distances [B, h, w], the nearest bank rows [B, h, w] and the patch
        embeddings [B, h, w, D] of images already at the model's input size."""
        if self.bank is None:
            raise RuntimeError("the detector is not fitted: call fit(dataset) or load a saved model")
        emb = self.embed(images)
        b, h, w, d = emb.shape
        sq_dist, nearest = self.bank.search(emb.reshape(-1, d), k=1)
        dist = torch.as_tensor(sq_dist)[:, 0].clamp_min(0).sqrt().reshape(b, h, w)
        return dist, torch.as_tensor(nearest)[:, 0].reshape(b, h, w), emb

    def _reweighting(self, dist: torch.Tensor, nearest: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """PatchCore's weight [B] per image: 1 - softmax over the distances from the most anomalous
        patch to its nearest bank row m* and to m*'s nearest bank neighbours, taken at m*. Close to
        1 when m* lies in a sparse part of the bank (a rare normal pattern is a weaker alibi)."""
        b = dist.shape[0]
        rows = torch.arange(b)
        worst = dist.reshape(b, -1).argmax(1)
        query = emb.reshape(b, -1, emb.shape[-1])[rows, worst].to(self.bank.features.device)
        anchor = nearest.reshape(b, -1)[rows, worst].to(self.bank.features.device)
        k = min(self.config.score_reweight, len(self.bank))
        _, support = self.bank.search(self.bank.features[anchor], k=k)
        support = torch.as_tensor(support)
        support[:, 0] = anchor  # m* itself first, even when the bank holds a duplicate of it
        d = (query[:, None, :] - self.bank.features[support]).norm(dim=-1)
        return (1 - torch.softmax(d, dim=1)[:, 0]).cpu()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = check_image_batch(images)
        return self._predict(self.resize_to_input(images), images.shape[-2:])

    def predict_input(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = check_image_batch(images)
        return self._predict(images, images.shape[-2:])

    def _predict(self, resized: torch.Tensor, out_size: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        dist, nearest, emb = self._search_patches(resized)
        return self._score(dist, nearest, emb, resized.shape[-2:], out_size, self.edge_levels)

    def _score(self, dist: torch.Tensor, nearest: torch.Tensor, emb: torch.Tensor | None,
               input_size: torch.Size, out_size: torch.Size, edge_levels: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores and anomaly maps at ``out_size`` from the patch search of images resized to
        ``input_size``, the distances divided by ``edge_levels`` when given."""
        if edge_levels is not None:
            dist = divide_by_edge_levels(dist, edge_levels)
        maps = F.interpolate(dist[:, None].float(), size=input_size, mode="bilinear",
                             align_corners=False)
        maps = gaussian_smooth(maps, self.config.sigma)
        if maps.shape[-2:] != out_size:
            maps = F.interpolate(maps, size=out_size, mode="bilinear", align_corners=False)
        maps = maps[:, 0]
        k = min(self.config.score_topk, maps[0].numel())
        scores = ops.topk_mean(maps.reshape(maps.shape[0], -1), k).cpu()
        if self.config.score_reweight:
            scores = scores * self._reweighting(dist, nearest, emb)
        return scores, maps.cpu()

    # ------------------------------------------------------------------ persistence
    def _is_fitted(self) -> bool:
        return self.bank is not None

    def _save_weights(self, directory: Path, token: str) -> dict[str, str]:
        fitted_band = band_of_levels(self.edge_levels) if self.edge_levels is not None else None
        if fitted_band is not None and fitted_band != self.config.edge_band:
            raise RuntimeError(f"config.edge_band ({self.config.edge_band}) differs from the band the edge levels "
                               f"were fitted with ({fitted_band}): fit again, or set it back")
        files = {"backbone": f"backbone-{token}.pt", "bank": f"bank-{token}.npz"}
        with atomic_path(directory / files["backbone"]) as tmp:
            torch.save(self._backbone().state_dict(), tmp)
        self.bank.save(directory / files["bank"])
        return files

    def _load_weights(self, directory: Path, files: dict[str, str]) -> None:
        cfg = self.config
        if set(files) != {"backbone", "bank"}:
            raise ModelError(f"{directory}: expected backbone and bank files, found {sorted(files)}")
        backbone = create(cfg.backbone, weights=None, max_stride=max(cfg.strides))
        path = directory / files["backbone"]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            backbone.load_state_dict(state)
        except Exception as exc:
            raise ModelError(f"cannot load backbone weights {path}: {exc}") from exc
        scale = self.fit_info.get("input_scale")
        if cfg.resize == "keep_aspect" and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                            or not math.isfinite(scale) or scale <= 0):
            raise ModelError(f"{directory}: fit_info needs a positive input_scale for resize='keep_aspect', "
                             f"got {scale!r}")
        try:
            bank = MemoryBank.load(directory / files["bank"])
        except (OSError, ValueError) as exc:
            raise ModelError(str(exc)) from exc
        self.backbone = backbone.to(self.device)
        self._fast_backbone = None
        self.bank = bank
        self.edge_levels = self._saved_edge_levels(directory)

    def _saved_edge_levels(self, directory: Path) -> torch.Tensor | None:
        if "edge_levels" not in self.fit_info:
            # Models of slsg before edge levels have neither the key nor edge_band in their config,
            # which then took the default: say what the model does, raw distances.
            if "edge_band" in self.saved_config_keys:
                raise ModelError(f"{directory}: fit_info lacks edge_levels (null or a list), which fit writes")
            self.config.edge_band = 0
            self.fit_info["edge_levels"] = None  # as fit writes it, so that a re-saved copy loads
            return None
        levels = self.fit_info["edge_levels"]
        if levels is None:  # fitted without edge levels (edge_band=0, fewer than 2 calibration images)
            return None
        band = self.config.edge_band
        if band == 0:
            raise ModelError(f"{directory}: fit_info has edge_levels but the configuration's edge_band is 0")
        expected = (2 * band + 1) ** 2
        if (not isinstance(levels, list) or len(levels) != expected
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels)):
            raise ModelError(f"{directory}: fit_info edge_levels must be a list of {expected} numbers "
                             f"for edge_band={band}")
        tensor = torch.tensor(levels, dtype=torch.float32)
        if not (torch.isfinite(tensor).all() and (tensor > 0).all()):
            raise ModelError(f"{directory}: fit_info edge_levels must be finite and positive")
        return tensor

    def to(self, device: str | torch.device) -> "MemoryBankDetector":
        self.device = torch.device(device)
        if self.backbone is not None:
            self.backbone.to(self.device)
            self._fast_backbone = None
        return self


def _class_maxima(dist: torch.Tensor, band: int) -> torch.Tensor:
    """Flat indices of the cells of ``dist`` [h, w] where the argmax of the map can lie once each
    edge class (the whole grid when ``band`` is 0) is divided by its level: per class, the first
    cell at its maximum, and every cell within a few ulps below it (the correctly rounded division
    keeps the order of two distances but can tie them, and argmax takes the earlier of a tie)."""
    flat = dist.reshape(-1)
    classes = (edge_classes(*dist.shape, band, device=dist.device).reshape(-1) if band > 0
               else torch.zeros_like(flat, dtype=torch.long))
    n_classes = (2 * band + 1) ** 2
    class_max = flat.new_full((n_classes,), -math.inf).scatter_reduce(0, classes, flat, "amax")[classes]
    at_max = flat == class_max
    index = torch.arange(flat.numel(), device=dist.device)
    first = torch.full((n_classes,), flat.numel(), device=dist.device).scatter_reduce(
        0, classes[at_max], index[at_max], "amin")
    # Within 2**-20 relative (8 float32 ulps) below it. An exact tie at the maximum stays a tie
    # and argmax takes `first`.
    near = (flat < class_max) & (flat >= class_max * (1 - 2.0 ** -20))
    return torch.cat([first[first < flat.numel()], index[near]]).unique()


def _collate_images(items: list[Any]) -> torch.Tensor | list[torch.Tensor]:
    """Dataset items (dicts with "image", or bare tensors) -> a batch [B, 3, H, W], or a list of
    images [3, H_i, W_i] when their sizes differ."""
    return collate_images([item["image"] if isinstance(item, dict) else item for item in items])
