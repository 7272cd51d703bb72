"""Decode, hash and size-filter images. Cheap CPU operators, fused into one actor stage."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings

import imagehash
import pandas as pd
from PIL import Image

from ..errors import ConfigError
from .base import MapOp, describe_error, register

# Our own pixel cap replaces PIL's global one, so a bomb is a clean per-sample drop.
Image.MAX_IMAGE_PIXELS = None

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def images_of(batch: pd.DataFrame) -> pd.Series:
    """Decoded RGB images for the batch's rows: reuses the decode_image result when this
    operator runs in the same fused stage, decodes from bytes otherwise."""
    if "_image" in batch.columns:
        return batch["_image"]
    return batch["image_bytes"].map(lambda b: Image.open(io.BytesIO(b)).convert("RGB"))


@register
class DecodeImage(MapOp):
    """Decode the image, record size/format/sha256, and reject what cannot be used:
    no image at all, undecodable or truncated bytes, or more pixels than max_pixels
    (checked from the header, before the pixels are decompressed)."""

    name = "decode_image"
    version = "1"
    outputs = ("width", "height", "image_format", "num_bytes", "sha256")
    kinds = ("image_text", "interleaved")  # a document's first image; all were decoded at crawl

    @dataclasses.dataclass
    class Params:
        max_pixels: int = 64_000_000

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        images, widths, heights, formats, sizes, digests = [], [], [], [], [], []
        for idx, data in zip(live.index, live["image_bytes"]):
            image = w = h = fmt = digest = None
            size = len(data) if isinstance(data, (bytes, bytearray)) else None
            if not data:
                self.drop(live, live.index == idx, "no_image")
            else:
                digest = hashlib.sha256(data).hexdigest()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", Image.DecompressionBombWarning)
                        opened = Image.open(io.BytesIO(data))
                        w, h, fmt = opened.width, opened.height, opened.format
                        if w * h > self.params.max_pixels:
                            self.drop(live, live.index == idx, "too_many_pixels")
                        else:
                            opened.load()  # raises on truncated or corrupt data
                            image = opened.convert("RGB")
                except Exception as exc:  # PIL raises many types for bad data
                    self.fail(live, [idx], "decode_error", describe_error(exc))
            images.append(image)
            widths.append(w)
            heights.append(h)
            formats.append(fmt)
            sizes.append(size)
            digests.append(digest)
        live["_image"] = images
        live["width"], live["height"] = widths, heights
        live["image_format"], live["sha256"] = formats, digests
        # num_bytes counts all of a sample's media (set when read); only fill it if absent
        live["num_bytes"] = live["num_bytes"].where(live["num_bytes"].notna(), pd.Series(sizes, index=live.index)) \
            if "num_bytes" in live.columns else sizes
        if "doc_sha256" in live.columns:  # a document's identity is all of its images
            live["sha256"] = live["doc_sha256"].where(live["doc_sha256"].notna(), live["sha256"])
        return live


@register
class PerceptualHash(MapOp):
    """64-bit DCT perceptual hash (imagehash.phash) as 16 hex chars, for near-dedup."""

    name = "perceptual_hash"
    version = "1"
    requires = ("width", "height")  # decode_image: the image was decoded within the pixel cap
    kinds = ("image_text", "interleaved")
    outputs = ("phash",)

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        live["phash"] = [str(imagehash.phash(img)) for img in images_of(live)]
        return live


@register
class ImageQuality(MapOp):
    """Drop images that are too small, too large or too elongated to train on."""

    name = "image_quality"
    version = "1"
    requires = ("width", "height")  # decode_image: the image was decoded within the pixel cap
    kinds = ("image_text", "interleaved")

    @dataclasses.dataclass
    class Params:
        min_side: int = 32
        max_side: int = 16384
        max_aspect_ratio: float = 4.0

    @classmethod
    def check_params(cls, params, where):
        if params.min_side < 1 or params.max_side < params.min_side or params.max_aspect_ratio < 1:
            raise ConfigError(f"{where} (image_quality): need 1 <= min_side <= max_side and max_aspect_ratio >= 1")

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        w = live["width"].astype(float)
        h = live["height"].astype(float)
        self.drop(live, (w < self.params.min_side) | (h < self.params.min_side), "too_small")
        self.drop(live, (w > self.params.max_side) | (h > self.params.max_side), "too_large")
        ratio = pd.concat([w / h, h / w], axis=1).max(axis=1)
        self.drop(live, ratio > self.params.max_aspect_ratio, "bad_aspect_ratio")
        return live
