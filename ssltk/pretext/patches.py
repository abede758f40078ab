"""What Jigsaw and Relative Patch Location share: patch sampling, per-patch embedding, the MLP head.

Training patches (the released ``self_supervision/patch_utils.py``): bilinear resize to ``resize``²,
grayscale per image with probability ``grayscale_p``, a ``crop``² crop (random; centred in eval), a
``grid``×``grid`` grid of ``cell``² cells and a ``patch``² sub-crop per cell (random jitter; centred
in eval), each patch standardised. The crop and jitter are folded into per-patch offsets, so one
call of :func:`ssltk.kernels.patch_extraction.extract_patches` gathers, grays and standardises every
patch of the batch without materialising the crop. Patches are in row-major grid order (centre =
``grid²//2``).
"""

from __future__ import annotations

import torch
from torch import nn

from ssltk.config import Config
from ssltk.data import rng
from ssltk.data.augment import (
    ImageList,
    Images,
    Preprocessing,
    center_crop_offsets,
    crop_and_resize_each,
    grayscale_mask,
    random_crop_offsets,
    resize_bilinear,
    resize_grid,
    resize_small,
    small_side_crops,
)
from ssltk.data.image_list import image_sizes
from ssltk.kernels.patch_extraction import extract_patches
from ssltk.pretext.base import (
    Pool,
    PretextTask,
    backbone_from_config,
    select_endpoints,
)
from ssltk.pretext.geometry import PatchLayout, resolve_patch_layout
from ssltk.sections import PatchHeadConfig

__all__ = ["PatchHead", "PatchHeadConfig", "PatchTask", "grid_offsets"]


HEAD_INIT_STD = 0.005
HEAD_HIDDEN_BIAS = 0.1
HEAD_BN_MOMENTUM = 0.003  # TF decay 0.997
HEAD_BN_EPS = 1e-5


class PatchHead(nn.Sequential):
    """Dense → BN → ReLU → Dropout → Dense, initialised as the released patch head
    (``self_supervision/patch_utils.py``)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden, eps=HEAD_BN_EPS, momentum=HEAD_BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for layer, bias in ((self[0], HEAD_HIDDEN_BIAS), (self[4], 0.0)):
            # TF's truncated normal redraws values beyond two standard deviations.
            nn.init.trunc_normal_(
                layer.weight, std=HEAD_INIT_STD, a=-2 * HEAD_INIT_STD, b=2 * HEAD_INIT_STD
            )
            nn.init.constant_(layer.bias, bias)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Dense kernels with ``weight_decay``; biases and BN parameters without."""
        kernels = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        kernel_ids = {id(p) for p in kernels}
        others = [p for p in self.parameters() if id(p) not in kernel_ids]
        return [
            {"params": kernels, "weight_decay": float(weight_decay)},
            {"params": others, "weight_decay": 0.0},
        ]


def grid_offsets(grid: int, cell: int, device: torch.device | None = None) -> torch.Tensor:
    """``[grid², 2]`` top-left (row, col) of each cell in row-major order."""
    index = torch.arange(grid, device=device) * cell
    rows, cols = torch.meshgrid(index, index, indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


class PatchTask(PretextTask):
    """A task whose backbone embeds each patch in patch mode and whose head reads the embeddings."""

    patch_mode = True

    def __init__(
        self,
        backbone: nn.Module,
        head: PatchHead,
        layout: PatchLayout,
        *,
        head_weight_decay: float,
        grayscale_p: float,
        preprocessing: Preprocessing = "symmetric",
    ) -> None:
        super().__init__(backbone)
        self.preprocessing = preprocessing
        self.head = head
        self.layout = layout
        self.head_weight_decay = head_weight_decay
        self.grayscale_p = grayscale_p

    @staticmethod
    def layout_from_config(config: Config) -> PatchLayout:
        return resolve_patch_layout(config.pretext.patches, config.pretext.input_size)

    @classmethod
    def patch_backbone(cls, config: Config, embed_dim: int) -> nn.Module:
        """``model.*`` in patch mode at the patch size, embedding each patch in ``embed_dim``."""
        return backbone_from_config(
            config,
            num_classes=embed_dim,
            patch_mode=True,
            input_size=cls.layout_from_config(config).patch,
        )

    @staticmethod
    def patch_options(config: Config, section: PatchHeadConfig) -> dict[str, float | str]:
        """The keyword arguments of :class:`PatchTask` read from ``config``."""
        return {
            "head_weight_decay": section.weight_decay,
            "grayscale_p": config.pretext.patches.grayscale_p,
            "preprocessing": config.pretext.preprocessing,
        }

    def resize_whole(self, images: Images, keys: torch.Tensor, *, train: bool) -> torch.Tensor:
        """Each whole image bilinearly resized to ``resize``² (aspect ignored), float32 in the
        input's range: the square the patch grid is cut from. An :class:`ImageList` (the
        original images of files storage) is resized image by image."""
        grid = resize_grid(self.preprocessing)
        # A random sub-pixel phase per image (symmetric mode): otherwise each slot sees its own
        # mix of interpolation phases, and a patch's sharpness tells where it came from.
        shift = None
        if train and grid == "half_pixel":
            shift = rng.uniform(keys, rng.Stream.PATCH_PHASE, 2).to(torch.float32) - 0.5
        size = (self.layout.resize, self.layout.resize)
        if isinstance(images, ImageList):
            whole = torch.tensor([[0, 0, h, w] for h, w in image_sizes(images)]).view(-1, 4)
            return crop_and_resize_each(images, whole, size, grid=grid, shift=shift)
        return resize_bilinear(images, size, grid=grid, shift=shift)

    def sample_patches(self, images: Images, keys: torch.Tensor, *, train: bool) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` (or an :class:`ImageList`) → standardised float32 patches
        ``[B, grid², 3, patch, patch]`` cut from :meth:`resize_whole`."""
        layout = self.layout
        device = images.device
        batch = len(images)
        resized = self.resize_whole(images, keys, train=train)
        square = (layout.resize, layout.resize)
        gray = grayscale_mask(keys, rng.Stream.PATCH_GRAY, self.grayscale_p)
        if train:
            crop = random_crop_offsets(keys, rng.Stream.PATCH_CROP, square, layout.crop)
            jitter = rng.randint(
                keys, rng.Stream.PATCH_JITTER, layout.jitter + 1, n=2 * layout.num_patches
            )
            jitter = jitter.view(batch, layout.num_patches, 2)
        else:
            crop = center_crop_offsets(square, layout.crop, batch)
            jitter = torch.full((batch, layout.num_patches, 2), layout.jitter // 2)
        cells = grid_offsets(layout.grid, layout.cell, device)
        offsets = crop.to(device)[:, None, :] + cells[None] + jitter.to(device)
        return extract_patches(resized, offsets, gray.to(device), layout.patch)

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, P, 3, p, p]`` patches → ``[B, P, embed_dim]`` per-patch embeddings (logits)."""
        batch, num_patches = patches.shape[:2]
        logits = self.backbone(patches.flatten(0, 1))["logits"]
        return logits.view(batch, num_patches, -1)

    def head_param_groups(self) -> list[dict]:
        return self.head.param_groups(self.head_weight_decay)

    @torch.no_grad()
    def representation(
        self,
        images: Images,
        layers: list[str] | None,
        *,
        pool: Pool | None = None,
        keys: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The released linear evaluation of patch models: shorter side ``input_size`` (area), a
        ``grid·patch`` crop (centred, or random from ``keys``), unjittered grid, per-patch
        standardisation, no grayscale; each endpoint is computed per patch, passed through ``pool``
        if given (the per-patch pooling to at most ``eval.max_features``) and averaged over the
        patches. Original images of different sizes (an :class:`ImageList`) are resized and
        cropped one by one.
        """
        layout = self.layout
        batch = len(images)
        stream = rng.Stream.PATCH_EVAL_CROP
        if isinstance(images, ImageList):
            resized = small_side_crops(images, layout.eval_resize, layout.eval_crop, keys, stream)
            corner = torch.zeros((batch, 2), dtype=torch.int64)
        else:
            resized = resize_small(images, layout.eval_resize)
            in_hw = tuple(resized.shape[-2:])
            if keys is None:
                corner = center_crop_offsets(in_hw, layout.eval_crop, batch)
            else:
                corner = random_crop_offsets(keys, stream, in_hw, layout.eval_crop)
        cells = grid_offsets(layout.grid, layout.patch, images.device)
        offsets = corner.to(images.device)[:, None, :] + cells[None]
        gray = torch.zeros(batch, dtype=torch.bool, device=images.device)
        patches = extract_patches(resized, offsets, gray, layout.patch)
        endpoints = select_endpoints(self.backbone(patches.flatten(0, 1)), layers)
        out = {}
        for layer, value in endpoints.items():
            value = pool(value) if pool is not None else value
            out[layer] = value.view(batch, layout.num_patches, *value.shape[1:]).mean(dim=1)
        return out
