"""Every image and video the project decodes or ships goes through here.

* One pixel cap (`DEFAULT_MAX_PIXELS`) for every image decoded anywhere: the header is
  read first and the cap checked before a single pixel is decompressed.
* `open_image` decodes to what every operator sees: 8-bit RGB, EXIF orientation applied,
  16-bit and float data scaled to their real range, CMYK converted (through its ICC
  profile when it has one), transparency composited on white.
* `tier_members` decides what a tier sample carries, so the tar holds exactly what the
  operators scored and its sidecar row describes the tar truly.

Format policy for tiers
-----------------------
A tier keeps the ORIGINAL BYTES when any reader (PIL + convert("RGB"), torchvision,
webdataset, HF datasets, browsers) decodes them to the same picture `open_image` gives:
a JPEG in RGB or greyscale (baseline or progressive), an 8-bit PNG (greyscale, RGB or
palette) or a WebP in RGB, none of them animated, transparent or EXIF-rotated. The
member is named by the real format (`jpg`, `png`, `webp`), whatever the raw shard
called it. Anything else (TIFF, BMP, GIF, AVIF, 16-bit or transparent PNG, CMYK JPEG,
float data, an EXIF orientation, animation) is converted once with `open_image` and
stored as:

* PNG (lossless) when the source was lossless: a conversion must not add loss to
  screenshots, graphics and 16-bit scans; PNG has no size limit that matters.
* JPEG quality 95, 4:4:4 chroma, when the source was itself lossy (JPEG, lossy WebP,
  AVIF): a second generation at q95 is not visible, and PNG would make a rotated or CMYK
  photo 5-10x larger. JPEG cannot hold a side over 65500 px; such an image falls back
  to PNG (it cannot come from a JPEG or WebP source anyway).

EXIF orientation is APPLIED (the image is converted): readers disagree on whether they
honour the tag (PIL, torchvision and webdataset do not), so keeping the bytes would
hand the trainer a sideways image that the operators never saw. width/height are always
the displayed size, which is the size in the tar.

The sidecar row says what the tar holds: `image_format` (format IN THE TAR, PIL's name),
`source_format` (the original's), `conversion` (null when the original bytes are kept,
else why it was converted, e.g. "cmyk", "16bit+format", "orientation"), width/height (in
the tar), `num_bytes` (the tar's media members), and `sha256`, which stays the hash of
the ORIGINAL bytes: it is the dedup identity (a document's is its images' hash of
hashes).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings

import numpy as np
from PIL import Image

from .kinds import IMAGE_TEXT, kind_of

DEFAULT_MAX_PIXELS = 40_000_000  # one pixel cap for every image decoded anywhere
JPEG_MAX_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION
JPEG_QUALITY = 95
VIDEO_PROBE_PACKETS = 512  # demuxed packets tried before a video counts as undecodable

# Formats we open at all (JPEG opens MPO too). Others (EPS runs Ghostscript, PSD, ICNS, ...) are not images to us.
OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "AVIF")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_LOSSY = ("JPEG", "MPO", "AVIF")
_SIXTEEN = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{4,}\b")  # memory addresses, not "30000x30000"


class MediaError(Exception):
    """A media member that cannot be used. `reason` is a short snake_case ledger reason
    (too_many_pixels, not_image, corrupt_image, unsupported_image, no_image, bad_document,
    missing_member, corrupt_video, unsupported_video); str() is one line. `facts` holds
    what the header told before it failed (e.g. width/height of a refused bomb)."""

    def __init__(self, reason: str, message: str, facts: dict | None = None):
        message = " ".join(_ADDRESS.sub("<address>", str(message)).split())[:500]
        super().__init__(message)
        self.reason = reason
        self.facts = dict(facts or {})


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- header
def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open with the cap checked on the header; nothing decompressed yet."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise MediaError("no_image", "no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own cap, when a caller left it set
        raise MediaError("too_many_pixels", str(exc)) from None
    except Image.UnidentifiedImageError:
        raise MediaError("not_image", "not a decodable image (unknown format)") from None
    except Exception as exc:  # a known format with a broken header
        raise MediaError("corrupt_image", _describe(exc)) from None
    _check_pixels(im, max_pixels)
    return im


def _check_pixels(im: Image.Image, max_pixels: int) -> None:
    w, h = im.size
    if w < 1 or h < 1:
        raise MediaError("corrupt_image", f"{w}x{h} image", {"width": w, "height": h, "format": im.format})
    if w * h > max_pixels:
        raise MediaError("too_many_pixels", f"{w}x{h} exceeds {max_pixels} pixels",
                         {"width": w, "height": h, "format": im.format})


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from what the header gave (a PNG's eXIf only before IDAT, so
    deciding it never decompresses anything)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is ignored, as every viewer does
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _png_bit_depth(data: bytes) -> int:
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 8


def _webp_lossy(data: bytes) -> bool:
    """Whether a WebP's (first) image is VP8 (lossy) rather than VP8L."""
    pos, end = 12, min(len(data), 1 << 20)
    while pos + 8 <= end:
        tag, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if tag in (b"VP8 ", b"ALPH"):
            return True
        if tag == b"VP8L":
            return False
        if tag == b"ANMF":  # an animation frame: its image chunks follow a 16-byte header
            pos += 8 + 16
            continue
        pos += 8 + size + (size & 1)
    return True


def _facts(im: Image.Image, data: bytes) -> dict:
    try:
        return _read_facts(im, data)
    except Exception as exc:  # a header PIL opened but whose details it cannot give
        raise MediaError("corrupt_image", _describe(exc)) from None


def _read_facts(im: Image.Image, data: bytes) -> dict:
    fmt, mode = im.format, im.mode
    w, h = im.size
    orientation = _orientation(im)
    if orientation >= 5:
        w, h = h, w
    animated = bool(getattr(im, "is_animated", False)) if fmt in ("PNG", "WEBP") else False
    bits = _png_bit_depth(data) if fmt == "PNG" else 8
    transparency = mode in _ALPHA_MODES or "transparency" in im.info
    reasons = []
    if fmt not in ("JPEG", "MPO", "PNG", "WEBP"):
        reasons.append("format")
    if mode == "CMYK":
        reasons.append("cmyk")
    elif bits > 8 or mode in _SIXTEEN:
        reasons.append("16bit")
    elif mode == "F":
        reasons.append("float")
    elif transparency:
        reasons.append("alpha")
    elif mode not in ("1", "L", "RGB", "P") or (fmt in ("JPEG", "MPO") and mode not in ("L", "RGB")) \
            or (fmt == "WEBP" and mode != "RGB"):
        reasons.append("mode")
    if animated:
        reasons.append("animated")
    if orientation != 1:
        reasons.append("orientation")
    lossy = fmt in _LOSSY or (fmt == "WEBP" and _webp_lossy(data))
    if not reasons:
        tier_format = "JPEG" if fmt == "MPO" else fmt
    else:
        tier_format = "JPEG" if lossy and max(w, h) <= JPEG_MAX_SIDE else "PNG"
    return {"format": fmt, "width": w, "height": h, "mode": mode, "orientation": orientation,
            "animated": animated, "bits": bits, "transparency": transparency, "lossy": lossy,
            "tier_format": tier_format, "conversion": "+".join(reasons) or None}


def image_facts(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Header only, nothing decompressed: format (PIL's name), width/height as displayed
    (EXIF orientation applied), mode, orientation, animated, bits, transparency, lossy,
    and the tier decision: tier_format (format the tier stores) and conversion (None when
    the original bytes are kept, else why not). Raises MediaError."""
    return _facts(_open(data, max_pixels), data)


# --------------------------------------------------------------------------- decode
def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decoded 8-bit RGB image as displayed, or MediaError (never anything else).

    The pixel cap is checked on the header before decompression (and again on the frame
    that was decoded: a GIF frame may be larger than its screen). Animated images give
    their first frame."""
    return open_image_with_facts(data, max_pixels)[0]


def open_image_with_facts(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, dict]:
    """open_image plus the source's image_facts (one header read for both), and
    facts["icc_profile"]: the RGB ICC profile a conversion should carry, or None."""
    im = _open(data, max_pixels)
    facts = _facts(im, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()  # raises on truncated or corrupt data
    except MemoryError:
        raise MediaError("too_many_pixels", f"{im.size[0]}x{im.size[1]}: out of memory while decoding") from None
    except Exception as exc:
        text = str(exc).lower()
        reason = "unsupported_image" if ("not available" in text or "unsupported" in text) else "corrupt_image"
        raise MediaError(reason, _describe(exc)) from None
    _check_pixels(im, max_pixels)
    facts["icc_profile"] = _icc_for(im.mode, im.info)
    try:
        rgb = _to_rgb(im)
    except Exception as exc:
        raise MediaError("unsupported_image", f"mode {im.mode}: {_describe(exc)}") from None
    del im
    if facts["orientation"] != 1:
        rgb = rgb.transpose(_TRANSPOSE[facts["orientation"]])
    return rgb, facts


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im  # loaded; holds no file (the bytes are in memory)
    if mode in _SIXTEEN:  # 16-bit (and 32-bit int) grey: 0..65535 -> 0..255, round(x / 257)
        a = np.asarray(im)
        a = np.clip(a, 0, 65535).astype(np.uint32)
        a *= 255
        a += 32767
        a //= 65535
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_u8(np.asarray(im, dtype=np.float32)), "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")  # 1, L, P, YCbCr, ...


def _float_to_u8(a: np.ndarray) -> np.ndarray:
    """Float data by its real range: 0..1 -> 0..255; already 0..255 -> as is; anything
    else min..max -> 0..255. NaN and inf become 0."""
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    values = a[finite]
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi <= 1:
        scaled = a * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = a
    elif hi > lo:
        scaled = (a - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(a)
    scaled = np.where(finite, scaled, 0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """Through the embedded ICC profile to sRGB when there is one (littleCMS); PIL's
    plain formula (what every viewer without colour management shows) otherwise."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken or unusable profile: fall back to the plain formula
            pass
    return im.convert("RGB")


def _icc_for(im_mode: str, info: dict) -> bytes | None:
    """An RGB source's ICC profile travels with its conversion (its values are unchanged)."""
    icc = info.get("icc_profile")
    if icc and im_mode in ("RGB", "RGBA", "RGBa", "P", "PA") and icc[16:20] == b"RGB ":
        return icc
    return None


def encode(img: Image.Image, fmt: str, icc_profile: bytes | None = None) -> bytes:
    """Deterministic encoding of an RGB image: PNG (lossless) or JPEG q95 4:4:4."""
    buf = io.BytesIO()
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    if fmt == "JPEG" and max(img.size) <= JPEG_MAX_SIDE:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, **extra)
    else:
        img.save(buf, format="PNG", compress_level=6, **extra)
    return buf.getvalue()


def thumbnail(img: Image.Image, side: int) -> Image.Image:
    """`img` itself when it fits in side x side, else a copy that does (aspect kept)."""
    if max(img.size) <= side:
        return img
    small = img.copy()
    small.thumbnail((side, side), Image.Resampling.BICUBIC)
    return small


# --------------------------------------------------------------------------- tiers
def _tier_image(data: bytes, max_pixels: int, validate: bool) -> tuple[str, bytes, dict]:
    """(ext, bytes, facts) of one image as a tier stores it. Kept bytes are checked on the
    header only unless `validate` (then fully decoded too)."""
    facts = image_facts(data, max_pixels)
    if facts["conversion"] is None:
        if validate:
            open_image_with_facts(data, max_pixels)
        return _EXT[facts["tier_format"]], bytes(data), facts
    img, facts = open_image_with_facts(data, max_pixels)
    fmt = facts["tier_format"] if max(img.size) <= JPEG_MAX_SIDE else "PNG"
    out = encode(img, fmt, facts.pop("icc_profile"))
    return _EXT[fmt], out, {**facts, "tier_format": fmt, "width": img.width, "height": img.height}


def _image_updates(facts: dict) -> dict:
    return {"image_format": facts["tier_format"], "source_format": facts["format"],
            "conversion": facts["conversion"], "width": facts["width"], "height": facts["height"]}


def _member(files: dict, name) -> bytes:
    if not isinstance(name, str) or name not in files:
        raise MediaError("missing_member", f"the sample has no member {name!r}")
    return files[name]


def _names(row: dict) -> list:
    names = row.get("media")
    names = [] if names is None else names
    if not isinstance(names, list):
        raise MediaError("bad_metadata", "media is not a list of member names")
    return names


def tier_members(row: dict, files: dict[str, bytes], max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[list[tuple[str, bytes]], dict]:
    """The media members a tier sample carries, in order, and the row updates that
    describe them truly (always `media` and `num_bytes`; see the module doc for the
    format policy). image_text: one `jpg|png|webp`; interleaved: `0.<ext>`, `1.<ext>`, ...
    with the document's member references rewritten, every image checked against the cap
    and (beyond the first, which decode_image decodes) fully decoded; video: the clip
    as is, probed from the file. Deterministic. Raises MediaError only."""
    # a name no kind has is stored as one image, as it always was (stage A fails such rows first)
    return kind_of(row.get("kind"), default=IMAGE_TEXT).tier_members(row, files, max_pixels)


def video_tier_members(row: dict, files: dict[str, bytes], max_pixels: int) -> tuple[list[tuple[str, bytes]], dict]:
    """A video's clip as is, probed from the file (tier_members)."""
    names = _names(row)
    if not names:
        raise MediaError("no_video", "the sample has no video member")
    data = _member(files, names[0])
    probe = probe_video(data, max_pixels)
    ext = probe.pop("ext")
    updates = {"media": [ext], "num_bytes": len(data), **probe}
    if not row.get("sha256"):
        updates["sha256"] = hashlib.sha256(data).hexdigest()
    return [(ext, bytes(data))], updates


def _image_names(row: dict) -> list:
    names = _names(row)
    if not names:
        raise MediaError("no_image", "the sample has no image member")
    return names


def document_tier_members(row: dict, files: dict[str, bytes], max_pixels: int) -> tuple[list[tuple[str, bytes]], dict]:
    """A document's images as `0.<ext>`, `1.<ext>`, ..., its doc's members renamed (tier_members)."""
    names = _image_names(row)
    members, first, conversions = [], None, []
    for i, name in enumerate(names):
        try:
            ext, out, facts = _tier_image(_member(files, name), max_pixels, validate=i > 0)
        except MediaError as exc:
            raise MediaError(exc.reason, f"image {i} ({name}): {exc}", exc.facts) from None
        members.append((f"{i}.{ext}", out))
        first = first or facts
        if facts["conversion"]:
            conversions.append(facts["conversion"])
    renamed = {old: new for old, (new, _) in zip(names, members)}
    updates = {**_image_updates(first), "media": [m for m, _ in members],
               "num_bytes": sum(len(b) for _, b in members), "num_images": len(members),
               "conversion": ",".join(conversions) if conversions else None,
               "doc": _rewrite_doc(row.get("doc"), renamed)}
    return members, updates


def image_tier_members(row: dict, files: dict[str, bytes], max_pixels: int) -> tuple[list[tuple[str, bytes]], dict]:
    """An image_text sample's one image (tier_members)."""
    names = _image_names(row)
    ext, out, facts = _tier_image(_member(files, names[0]), max_pixels, validate=False)
    return [(ext, out)], {**_image_updates(facts), "media": [ext], "num_bytes": len(out)}


def _rewrite_doc(doc, renamed: dict) -> dict:
    """The document (the sidecar's doc struct) with its image items naming the tier's members."""
    if not isinstance(doc, dict):
        raise MediaError("bad_document", "doc is not an object")
    items = doc.get("items")
    items = [{**item, "member": renamed.get(item["member"]) if isinstance(item.get("member"), str) else None}
             if isinstance(item, dict) and item.get("member") is not None else item
             for item in (items if isinstance(items, list) else [])]
    return {**doc, "items": items}


# --------------------------------------------------------------------------- video
def probe_video(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """The file's own facts, with PyAV: ext (mp4 | webm, by container), duration, fps,
    width, height, num_frames, codec. Bounded: the container header, the first decodable
    frame within VIDEO_PROBE_PACKETS packets, and (only when the header lacks the frame
    count or duration) one demux pass over the packets, nothing decoded. A frame larger
    than the pixel cap is refused before it is decoded. Raises MediaError."""
    if not data:
        raise MediaError("no_video", "no video bytes")
    try:
        import av

        with av.open(io.BytesIO(bytes(data)), mode="r") as container:
            names = set(container.format.name.split(","))
            if names & {"mp4", "mov"}:
                ext = "mp4"
            elif names & {"webm", "matroska"}:
                ext = "webm"
            else:
                raise MediaError("unsupported_video", f"container {container.format.name} is not mp4 or webm")
            if not container.streams.video:
                raise MediaError("corrupt_video", "no video stream")
            stream = container.streams.video[0]
            cc = stream.codec_context
            if (cc.width or 0) * (cc.height or 0) > max_pixels:
                raise MediaError("too_many_pixels", f"video frames {cc.width}x{cc.height} exceed {max_pixels} pixels")
            frame = None
            for n, packet in enumerate(container.demux(stream)):
                frames = packet.decode()
                if frames:
                    frame = frames[0]
                    break
                if n >= VIDEO_PROBE_PACKETS:
                    break
            if frame is None:
                raise MediaError("corrupt_video", "no decodable video frame")
            if frame.width * frame.height > max_pixels:
                raise MediaError("too_many_pixels", f"video frames {frame.width}x{frame.height} exceed {max_pixels} pixels")
            tb = stream.time_base
            duration = (float(container.duration) / av.time_base if container.duration
                        else float(stream.duration * tb) if stream.duration and tb else None)
            rate = stream.average_rate or stream.guessed_rate
            probe = {"ext": ext, "duration": duration, "fps": float(rate) if rate else None,
                     "width": frame.width, "height": frame.height, "num_frames": stream.frames or None,
                     "codec": cc.name}
        if probe["num_frames"] is None or probe["duration"] is None:
            with av.open(io.BytesIO(bytes(data)), mode="r") as container:
                stream = container.streams.video[0]
                stamps = [(p.pts, p.duration or 0) for p in container.demux(stream) if p.size and p.pts is not None]
                if stamps and probe["num_frames"] is None:
                    probe["num_frames"] = len(stamps)
                if stamps and probe["duration"] is None and stream.time_base:
                    start = stream.start_time or 0
                    probe["duration"] = float((max(p + d for p, d in stamps) - start) * stream.time_base)
        return probe
    except MediaError:
        raise
    except Exception as exc:  # PyAV/FFmpeg raise many types for bad media
        raise MediaError("corrupt_video", _describe(exc)) from None
