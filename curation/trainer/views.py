"""How each architecture cuts an image into encoder views, and how many LM tokens that
costs. The data loader uses this to lay out sequences; the connectors use the same
layouts to arrange features, so the two always agree.

A layout is a small tuple:
  ("anyres", cols, rows, width, height)
                          llava single image: a global view + cols x rows tiles (AnyRes-Max);
                          the image's size decides which padded feature rows are cut (unpad)
  ("base",)               one view of the whole image (multi-image items; evlm/owl3 always)
  ("frame",)              one video frame (llava pools its features 2x2, as 729 -> 196 in the paper)
  ("tiled",)              omnifusion tiled mode: a 2x2 grid of tiles + the whole image
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .. import tokens
from .config import ModelConfig

ROLES = ("single", "multi", "frame")


def anyres_grid(cfg: ModelConfig, width: int, height: int) -> tuple[int, int]:
    """(cols, rows): curation.tokens' grid choice (effective resolution, then least waste).
    That function measures against a 384 px base; scaling the image by 384/base gives the
    same choice for our base resolution."""
    scale = tokens.BASE / cfg.image_size
    return tokens.anyres_grid(max(1, round(width * scale)), max(1, round(height * scale)), cfg.max_grid)


def anyres_features(cfg: ModelConfig, layout: tuple) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """(unpad box (top, left, rows, cols) of the tile feature grid, (rows, cols) of tile
    features the LM gets) for an ("anyres", ...) layout: curation.tokens' rule, the same
    one `curate plan` bills with."""
    _, cols, rows, width, height = layout
    return tokens.anyres_features(width, height, cols, rows, cfg.unit, cfg.max_tiles)


def frame_feature_side(cfg: ModelConfig) -> int:
    return math.ceil(cfg.unit / 2)


def image_layout(cfg: ModelConfig, role: str, width: int, height: int) -> tuple:
    if cfg.arch == "llava":
        if role == "single":
            return ("anyres", *anyres_grid(cfg, width, height), width, height)
        return ("frame",) if role == "frame" else ("base",)
    if cfg.arch == "omnifusion" and role == "single" and cfg.omni_tiled:
        return ("tiled",)
    return ("base",)


def num_views(layout: tuple) -> int:
    if layout[0] == "anyres":
        return 1 + layout[1] * layout[2]
    return 5 if layout[0] == "tiled" else 1


def lm_tokens(cfg: ModelConfig, layout: tuple) -> int:
    """Positions the image occupies in the LM sequence."""
    if cfg.arch in ("evlm", "owl3"):
        return 1  # a single placeholder; the LM reaches the features through cross/hyper-attention
    if cfg.arch == "omnifusion":
        return num_views(layout) * cfg.unit ** 2 + 2  # + learned start and end embeddings
    if layout[0] == "anyres":  # global view + unpadded tiles + one newline per feature row
        return tokens.anyres_token_count(layout[3], layout[4], layout[1], layout[2], cfg.unit, cfg.max_tiles)
    if layout[0] == "frame":
        return frame_feature_side(cfg) ** 2
    return cfg.unit ** 2


def cut_views(cfg: ModelConfig, image: Image.Image, layout: tuple) -> list[Image.Image]:
    """The base-resolution views the encoder sees, in the order the connector expects."""
    base = cfg.image_size
    whole = image.resize((base, base), Image.BICUBIC)
    if layout[0] in ("base", "frame"):
        return [whole]
    cols, rows = (layout[1], layout[2]) if layout[0] == "anyres" else (2, 2)
    canvas = _fit_and_pad(image, cols * base, rows * base)
    tiles = [canvas.crop((c * base, r * base, (c + 1) * base, (r + 1) * base))
             for r in range(rows) for c in range(cols)]
    return [whole, *tiles] if layout[0] == "anyres" else [*tiles, whole]


def _fit_and_pad(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize keeping the aspect ratio, centre on a grey canvas (LLaVA's resize-and-pad,
    which rounds the scaled side up; grey is 0 after SigLIP normalisation). The feature
    rows/columns that cover only padding are cut by the connector (unpad)."""
    scale = min(width / image.width, height / image.height)
    resized = image.resize((max(1, min(width, math.ceil(image.width * scale))),
                            max(1, min(height, math.ceil(image.height * scale)))), Image.BICUBIC)
    canvas = Image.new("RGB", (width, height), (127, 127, 127))
    canvas.paste(resized, ((width - resized.width) // 2, (height - resized.height) // 2))
    return canvas


def to_tensor(views: list[Image.Image], mean, std) -> torch.Tensor:
    arr = np.stack([np.asarray(v.convert("RGB"), dtype=np.float32) / 255.0 for v in views])
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
