"""Visual and text token counts as LLaVA-OneVision spends them (facts from the paper,
arXiv 2408.03326; the trainer's AnyRes tiling uses the same grid choice).

* single image, AnyRes-Max-9: pick a grid of base-resolution tiles (up to 6x6) that
  maximises the effective resolution of the image, then wastes the least area; each tile
  and one global view give 27x27 = 729 tokens; when the tile features exceed 9 tiles'
  worth by a factor t > 1.1 they are bilinearly downsampled by t per side; one newline
  token ends each feature row. The maximum is about 729 x (9 + 1).
* multi-image: 729 tokens per image (no tiling).
* video: 196 tokens per frame, up to 32 sampled frames.
"""

from __future__ import annotations

import math
from functools import lru_cache

BASE = 384  # SigLIP input resolution
UNIT = 27  # tokens per tile side (729 per tile)
MAX_GRID = 6
MAX_TILES = 9
DOWNSAMPLE_THRESHOLD = 1.1
TOKENS_PER_IMAGE_MULTI = 729
TOKENS_PER_FRAME = 196
MAX_FRAMES = 32
CHARS_PER_TEXT_TOKEN = 4.0  # without a tokenizer: the usual ~4 characters per token in English


@lru_cache(maxsize=4096)
def anyres_grid(width: int, height: int, max_grid: int = MAX_GRID) -> tuple[int, int]:
    """(columns, rows) of base tiles: most effective resolution first, then least waste."""
    best, best_key = (1, 1), None
    for cols in range(1, max_grid + 1):
        for rows in range(1, max_grid + 1):
            cw, ch = cols * BASE, rows * BASE
            scale = min(cw / width, ch / height)
            effective = min(int(width * scale) * int(height * scale), width * height)
            key = (effective, -(cw * ch - effective))
            if best_key is None or key > best_key:
                best, best_key = (cols, rows), key
    return best


def anyres_tokens(width: int, height: int) -> int:
    cols, rows = anyres_grid(int(width), int(height))
    feat_w, feat_h = cols * UNIT, rows * UNIT
    t = math.sqrt(feat_w * feat_h / (MAX_TILES * UNIT * UNIT))
    if t > DOWNSAMPLE_THRESHOLD:
        feat_w, feat_h = int(feat_w / t), int(feat_h / t)
    return feat_w * feat_h + feat_h + UNIT * UNIT  # tiles + one newline per row + global view


def visual_tokens(kind: str, width, height, num_images, num_frames) -> tuple[int, int, int]:
    """(images, frames, visual tokens) for one sample."""
    if kind == "video":
        frames = min(int(num_frames or MAX_FRAMES), MAX_FRAMES)
        return 0, frames, frames * TOKENS_PER_FRAME
    if kind == "interleaved":
        n = int(num_images or 0)
        return n, 0, n * TOKENS_PER_IMAGE_MULTI
    return 1, 0, anyres_tokens(int(width), int(height))


def text_tokens(text: str | None) -> int:
    return math.ceil(len(text or "") / CHARS_PER_TEXT_TOKEN)
