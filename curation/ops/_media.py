"""Media access shared by the model operators (not an operator module)."""

from __future__ import annotations

import io

import pandas as pd
from PIL import Image


def row_image(row: pd.Series) -> Image.Image:
    """The row's image: decoded earlier in the same fused stage, or from its bytes."""
    image = row.get("_image")
    if isinstance(image, Image.Image):
        return image
    return Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")


def video_bytes_of(row: pd.Series) -> bytes:
    """A video row's mp4: the `video_bytes` column, or `image_bytes` when the reader
    carries a video's media there."""
    for col in ("video_bytes", "image_bytes"):
        data = row.get(col)
        if isinstance(data, (bytes, bytearray)) and data:
            return bytes(data)
    raise ValueError("the row carries no video bytes (video rows need their mp4 in video_bytes or image_bytes)")
