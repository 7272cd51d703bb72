"""Visual and text token counts as LLaVA-OneVision spends them (facts from the paper,
arXiv 2408.03326; the trainer's AnyRes tiling uses the same grid choice).

* single image, AnyRes-Max-9: pick a grid of base-resolution tiles (up to 6x6) that
  maximises the effective resolution of the image, then wastes the least area; each tile
  and one global view give 27x27 = 729 tokens; when the tile features exceed 9 tiles'
  worth by a factor t > 1.1 they are bilinearly downsampled by t per side; before that
  the feature rows/columns that only cover padding are removed (LLaVA-NeXT's unpad); one
  newline token ends each feature row. The maximum is about 729 x (9 + 1).
* multi-image: 729 tokens per image (no tiling).
* video: 196 tokens per frame, up to 32 sampled frames.
"""

from __future__ import annotations

import math
from functools import lru_cache

from .kinds import IMAGE_TEXT, kind_of

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


def unpad_box(width: int, height: int, grid_w: int, grid_h: int) -> tuple[int, int, int, int]:
    """(top, left, rows, cols): the part of a padded feature grid that the image covers.

    LLaVA-NeXT's unpad: the tiles hold the image resized to fit and centred on padding;
    if the image is wider than the grid, its scaled height is int(height * grid_w / width)
    and the padding rows, (grid_h - that) // 2, are cut from top and bottom alike (columns
    likewise for a taller image). The scaled side is floored in integers, so float error
    cannot drop a row (transformers' port rounds to 7 decimals for the same reason). One
    deviation: at least one row/column is kept, where the reference would keep none (an
    even grid side and an image thinner than one feature)."""
    width, height = max(1, int(width)), max(1, int(height))
    if width * grid_h > height * grid_w:  # the image is wider than the grid: padded above and below
        pad = min((grid_h - height * grid_w // width) // 2, (grid_h - 1) // 2)
        return pad, 0, grid_h - 2 * pad, grid_w
    pad = min((grid_w - width * grid_h // height) // 2, (grid_w - 1) // 2)
    return 0, pad, grid_h, grid_w - 2 * pad


def downsampled(rows: int, cols: int, unit: int, max_tiles: int) -> tuple[int, int]:
    """AnyRes-Max: when the (unpadded) tile features exceed max_tiles tiles' worth by
    t = sqrt(rows*cols / (max_tiles*unit^2)) > 1.1, they are resized to (rows // t, cols // t)."""
    t = math.sqrt(rows * cols / (max_tiles * unit * unit))
    if t > DOWNSAMPLE_THRESHOLD:
        return int(rows // t), int(cols // t)
    return rows, cols


def anyres_features(width: int, height: int, cols: int, rows: int, unit: int = UNIT,
                    max_tiles: int = MAX_TILES) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """For an image of width x height tiled cols x rows: the unpad box of the tile feature
    grid and the (rows, cols) of features the LM gets from the tiles (before newlines).
    The one home of this rule: the trainer's LLaVA connector and `curate plan`'s bill."""
    box = unpad_box(width, height, cols * unit, rows * unit)
    return box, downsampled(box[2], box[3], unit, max_tiles)


def anyres_token_count(width: int, height: int, cols: int, rows: int, unit: int = UNIT,
                       max_tiles: int = MAX_TILES) -> int:
    """LM positions of one AnyRes-Max image: global view + unpadded (downsampled) tiles +
    one newline per feature row."""
    _, (h, w) = anyres_features(width, height, cols, rows, unit, max_tiles)
    return unit * unit + h * w + h


def anyres_tokens(width: int, height: int) -> int:
    """LLaVA-OneVision's count for one image (384 px tiles, 27x27 features, AnyRes-Max-9)."""
    cols, rows = anyres_grid(int(width), int(height))
    return anyres_token_count(int(width), int(height), cols, rows)


def visual_tokens(kind: str, width, height, num_images, num_frames) -> tuple[int, int, int]:
    """(images, frames, visual tokens) for one sample: its kind's count (curation.kinds;
    a name no kind has is billed as one image, as it always was)."""
    return kind_of(kind, default=IMAGE_TEXT).visual_tokens(width, height, num_images, num_frames)


def text_tokens(text: str | None) -> int:
    return math.ceil(len(text or "") / CHARS_PER_TEXT_TOKEN)
