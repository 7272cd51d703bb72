"""Media access shared by the model operators (not an operator module)."""

from __future__ import annotations

import pandas as pd
from PIL import Image


def row_image(row: pd.Series) -> Image.Image:
    """The row's full image, decoded from its bytes through the one pixel cap, with
    orientation and colour handled (media.open_image). `_image` is only a thumbnail."""
    from ..media import DEFAULT_MAX_PIXELS, open_image

    return open_image(row["image_bytes"], DEFAULT_MAX_PIXELS)


def video_bytes_of(row: pd.Series) -> bytes:
    """A video row's mp4: the `video_bytes` column, or `image_bytes` when the reader
    carries a video's media there."""
    for col in ("video_bytes", "image_bytes"):
        data = row.get(col)
        if isinstance(data, (bytes, bytearray)) and data:
            return bytes(data)
    raise ValueError("the row carries no video bytes (video rows need their mp4 in video_bytes or image_bytes)")
