"""Decode, hash and size-filter images. Cheap CPU operators, fused into one actor stage.

Decoding goes through curation.media.open_image (one pixel cap, checked on the header;
EXIF orientation, 16-bit, float, CMYK and transparency handled). The full decode is
released at once: the private `_image` column carries a thumbnail bounded to
THUMBNAIL_SIDE px on the long side (the image itself when it is that small), which is
all the fused operators need (perceptual_hash looks at 32x32; image_quality at the
recorded size). Operators that need full resolution (ocr, clip_score) get it from
`images_of`, which decodes one image at a time from the bytes when `_image` is a
reduced copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator

import imagehash
import pandas as pd
from PIL import Image

from ..errors import ConfigError
from ..media import DEFAULT_MAX_PIXELS, MediaError, open_image, open_image_with_facts, thumbnail
from .base import MapOp, register

# Our own pixel cap (curation.media) replaces PIL's global one, so a bomb is a clean
# per-sample drop that still records the size its header claimed.
Image.MAX_IMAGE_PIXELS = None

THUMBNAIL_SIDE = 512  # long side of the decoded copy kept in `_image` for the fused operators


def _is_full(image, width, height) -> bool:
    return isinstance(image, Image.Image) and (pd.isna(width) or pd.isna(height)
                                               or image.size == (int(width), int(height)))


def images_of(batch: pd.DataFrame) -> Iterator[Image.Image]:
    """Full-resolution RGB images for the batch's rows, one at a time: the decode_image
    result when it is the whole image (same fused stage, image no larger than
    THUMBNAIL_SIDE), else decoded from the bytes with the pixel cap."""
    n = len(batch)
    kept = batch["_image"] if "_image" in batch.columns else pd.Series([None] * n, index=batch.index)
    widths = batch["width"] if "width" in batch.columns else pd.Series([None] * n, index=batch.index)
    heights = batch["height"] if "height" in batch.columns else pd.Series([None] * n, index=batch.index)
    data = batch["image_bytes"] if "image_bytes" in batch.columns else pd.Series([None] * n, index=batch.index)
    for image, w, h, raw in zip(kept, widths, heights, data):
        if _is_full(image, w, h) or (isinstance(image, Image.Image) and not raw):
            yield image
        else:
            yield open_image(raw, DEFAULT_MAX_PIXELS)


def thumbnails_of(batch: pd.DataFrame) -> list[Image.Image]:
    """The `_image` thumbnails, or the same thumbnails made from the bytes when this
    operator runs in another stage (so results never depend on how stages were fused)."""
    if "_image" in batch.columns:
        return list(batch["_image"])
    return [thumbnail(open_image(raw, DEFAULT_MAX_PIXELS), THUMBNAIL_SIDE) for raw in batch["image_bytes"]]


@register
class DecodeImage(MapOp):
    """Decode the image, record its displayed size (EXIF orientation applied), the
    format a tier will store it in (image_format; source_format is the original's;
    conversion says why they differ, None when the tier keeps the original bytes; all as
    curation.media.tier_members records them), num_bytes and sha256, and reject what cannot be used: no image at all (no_image),
    more pixels than max_pixels (too_many_pixels, from the header, before the pixels are
    decompressed), or bytes that do not decode (decode_error, with the cause)."""

    name = "decode_image"
    reasons = ("no_image", "too_many_pixels", "decode_error")
    version = "2"
    outputs = ("width", "height", "image_format", "source_format", "conversion", "num_bytes", "sha256")
    kinds = ("image_text", "interleaved")  # a document's first image; tier_members checks the others

    @dataclasses.dataclass
    class Params:
        max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def check_params(cls, params, where):
        if not 1 <= params.max_pixels <= DEFAULT_MAX_PIXELS:
            raise ConfigError(f"{where} (decode_image): max_pixels must be between 1 and {DEFAULT_MAX_PIXELS} "
                              "(curation.media.DEFAULT_MAX_PIXELS, the cap every decoder and the tier writer use)")

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        images, widths, heights, formats, sources, convs, sizes, digests = [], [], [], [], [], [], [], []
        for idx, data in zip(live.index, live["image_bytes"]):
            image = w = h = fmt = src = conv = digest = None
            size = len(data) if isinstance(data, (bytes, bytearray)) else None
            if not data:
                self.drop(live, live.index == idx, "no_image")
            else:
                digest = hashlib.sha256(data).hexdigest()
                try:
                    full, facts = open_image_with_facts(data, self.params.max_pixels)
                    w, h = full.size
                    fmt, src, conv = facts["tier_format"], facts["format"], facts["conversion"]
                    image = thumbnail(full, THUMBNAIL_SIDE)
                    del full  # the full decode is released here, not at the end of the batch
                except MediaError as exc:
                    w, h = exc.facts.get("width", w), exc.facts.get("height", h)
                    src = exc.facts.get("format", src)
                    if exc.reason == "too_many_pixels":
                        self.drop(live, live.index == idx, "too_many_pixels")
                    else:
                        self.fail(live, [idx], "decode_error", f"{exc.reason}: {exc}")
            images.append(image)
            widths.append(w)
            heights.append(h)
            formats.append(fmt)
            sources.append(src)
            convs.append(conv)
            sizes.append(size)
            digests.append(digest)
        live["_image"] = images
        live["width"], live["height"] = widths, heights
        live["image_format"], live["source_format"], live["sha256"] = formats, sources, digests
        # num_bytes counts all of a sample's media (set when read); only fill it if absent.
        # So does `conversion` (media.tier_members sets it for all of a document's images).
        for col, values in (("num_bytes", sizes), ("conversion", convs)):
            live[col] = live[col].where(live[col].notna(), pd.Series(values, index=live.index)) \
                if col in live.columns else values
        if "doc_sha256" in live.columns:  # a document's identity is all of its images
            live["sha256"] = live["doc_sha256"].where(live["doc_sha256"].notna(), live["sha256"])
        return live


@register
class PerceptualHash(MapOp):
    """64-bit DCT perceptual hash (imagehash.phash) as 16 hex chars, for near-dedup.
    Computed on the decode_image thumbnail (long side THUMBNAIL_SIDE): identical to the
    full image's hash for images that small, within a bit or two for larger ones."""

    name = "perceptual_hash"
    version = "2"
    kinds = ("image_text", "interleaved")
    outputs = ("phash",)

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        live["phash"] = [str(imagehash.phash(img)) for img in thumbnails_of(live)]
        return live


@register
class ImageQuality(MapOp):
    """Drop images that are too small, too large or too elongated to train on."""

    name = "image_quality"
    reasons = ("too_small", "too_large", "bad_aspect_ratio")
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
