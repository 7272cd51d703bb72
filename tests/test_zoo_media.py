"""A zoo of hostile and unusual media through curation.media: every image decoded is
capped before decompression, decoded to the right colours, and what a tier stores is
faithful to what the operators saw and described truly by its row updates."""

import hashlib
import io
import resource
import struct
import time
import tracemalloc
import zlib

import av
import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curation import media
from curation.media import DEFAULT_MAX_PIXELS, MediaError, image_facts, open_image, tier_members
from curation.ops.image import THUMBNAIL_SIDE, DecodeImage, PerceptualHash, images_of
from curation.tiers.writer import tier_media


# ---------------------------------------------------------------- builders
def save(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(w=64, h=48, colour=(200, 30, 30), **kw):
    return save(Image.new("RGB", (w, h), colour), "JPEG", **kw)


def _chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_raw(w, h, depth, colour_type, idat: bytes):
    """A PNG from its parts, for headers and payloads PIL would never write."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def zeros_zlib(n: int) -> bytes:
    comp, block = zlib.compressobj(6), bytes(1 << 20)
    out = [comp.compress(block) for _ in range(n >> 20)] + [comp.compress(bytes(n & ((1 << 20) - 1))), comp.flush()]
    return b"".join(out)


def exif_jpeg(orientation, w=40, h=20):
    img = Image.new("RGB", (w, h), (220, 20, 20))
    img.paste((20, 20, 220), (w // 2, 0, w, h))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(img, "JPEG", quality=95, exif=exif.tobytes())


def video(codec="mpeg4", fmt="mp4", frames=16, fps=8, size=(64, 48)):
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            img = Image.new("RGB", size, (i * 15 % 256, 80, 160))
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def image_row(ext="jpg"):
    return {"kind": "image_text", "media": [ext]}


def doc_row(names, items=None):
    items = items if items is not None else [{"type": "image", "member": n} for n in names]
    return {"kind": "interleaved", "media": list(names), "doc": {"doc_id": "d", "items": items}, "sha256": "ab" * 32}


def pixel(img, xy=(0, 0)):
    return tuple(int(v) for v in np.asarray(img.convert("RGB"))[xy[1], xy[0]])


def near(a, b, tol=3):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def reread(data):
    """What any plain reader (PIL + convert('RGB'), no colour management) sees."""
    return Image.open(io.BytesIO(data)).convert("RGB")


# ---------------------------------------------------------------- bombs
def test_header_bomb_is_refused_before_decompression():
    bomb = png_raw(30000, 30000, 8, 2, zeros_zlib(1 << 16))  # 900 MP claimed, a few KB on disk
    assert len(bomb) < 10_000
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(MediaError) as err:
        open_image(bomb)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert err.value.reason == "too_many_pixels" and "30000x30000" in str(err.value)
    assert err.value.facts["width"] == 30000
    assert peak < 2_000_000 and elapsed < 0.5  # header only: 2.7 GB were never allocated
    with pytest.raises(MediaError, match="30000x30000"):
        image_facts(bomb)


def test_bomb_refused_even_with_pils_own_limit_in_place(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # PIL's default raises past 2x
    with pytest.raises(MediaError) as err:
        open_image(png_raw(30000, 30000, 8, 0, zeros_zlib(1 << 16)))
    assert err.value.reason == "too_many_pixels"


def test_png_bomb_with_a_real_idat_of_zeros_is_refused_and_rss_stays_flat():
    bomb = png_raw(7000, 7000, 8, 0, zeros_zlib(7000 * 7001))  # 49 MP of real zeros, ~50 KB
    assert len(bomb) < 1_000_000
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    with pytest.raises(MediaError) as err:
        open_image(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert err.value.reason == "too_many_pixels"
    assert peak < 3_000_000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 30_000  # KiB: the 49 MB never came


def test_oversized_idat_behind_a_small_header_decodes_only_what_the_header_says():
    bomb = png_raw(64, 64, 8, 0, zeros_zlib(64 * 1024 * 1024))  # 64 MiB of zeros for a 4 KiB image
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    img = open_image(bomb)
    assert img.size == (64, 64) and pixel(img) == (0, 0, 0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50_000


def test_forged_jpeg_header_of_the_largest_size_is_refused():
    data = jpeg(16, 16)
    sof = data.index(b"\xff\xc0")
    forged = data[:sof + 5] + struct.pack(">HH", 65535, 65535) + data[sof + 9:]
    with pytest.raises(MediaError) as err:
        tier_members(image_row(), {"jpg": forged})
    assert err.value.reason == "too_many_pixels" and err.value.facts["width"] == 65535


def test_wider_than_jpeg_can_hold_never_crashes():
    wide = save(Image.new("RGB", (70000, 1), (10, 200, 10)), "PNG")
    members, updates = tier_members(image_row(), {"jpg": wide})  # a plain PNG: kept as is
    assert members == [("png", wide)] and updates["width"] == 70000 and updates["conversion"] is None
    tif = save(Image.new("RGB", (70000, 2), (10, 200, 10)), "TIFF")
    members, updates = tier_members(image_row(), {"jpg": tif})  # converted: PNG, never JPEG
    assert members[0][0] == "png" and updates["image_format"] == "PNG" and reread(members[0][1]).size == (70000, 2)
    assert reread(media.encode(Image.new("RGB", (70000, 1)), "JPEG")).size == (70000, 1)  # falls back to PNG


# ---------------------------------------------------------------- broken bytes
@pytest.mark.parametrize("data, reason", [
    (b"", "no_image"),
    (b"<html><body>not a picture</body></html>", "not_image"),
    (jpeg(64, 64)[:300], "corrupt_image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not_image"),  # EPS (Ghostscript) is never opened
])
def test_unusable_bytes_raise_media_error_with_a_reason(data, reason):
    with pytest.raises(MediaError) as err:
        open_image(data)
    assert err.value.reason == reason and "\n" not in str(err.value)
    with pytest.raises(MediaError) as err:
        tier_members(image_row(), {"jpg": data})
    assert err.value.reason in (reason, "corrupt_image")


def test_truncated_jpeg_passes_the_header_but_not_decode_image():
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    bad = save(Image.fromarray(noise), "JPEG")[:-2000]
    assert image_facts(bad)["width"] == 64  # the header is fine...
    df = DecodeImage(DecodeImage.Params())(frame([bad]))
    assert df.loc[0, "status"] == "failed" and df.loc[0, "reason"] == "decode_error"
    assert "corrupt_image" in df.loc[0, "error"] and "truncated" in df.loc[0, "error"]


def test_media_error_message_is_one_line():
    err = MediaError("corrupt_image", "line one\nline two at 0x7f00deadbeef")
    assert str(err) == "line one line two at <address>" and err.reason == "corrupt_image"


# ---------------------------------------------------------------- colours
def test_16bit_grey_png_is_scaled_not_clipped_to_white():
    data = save(Image.fromarray(np.full((8, 8), 32768, np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # PIL alone: white
    assert pixel(open_image(data)) == (128, 128, 128)
    members, updates = tier_members(image_row("png"), {"png": data})
    assert updates["conversion"] == "16bit" and updates["image_format"] == "PNG"
    assert pixel(reread(members[0][1])) == (128, 128, 128)  # what the trainer reads is what we scored


def test_16bit_rgb_png_is_converted_to_8_bit():
    row = b"\x00" + struct.pack(">HHH", 32768, 0, 65535) * 4
    data = png_raw(4, 4, 16, 2, zlib.compress(row * 4))
    assert image_facts(data)["bits"] == 16
    members, updates = tier_members(image_row("png"), {"png": data})
    assert updates["conversion"] == "16bit" and near(pixel(reread(members[0][1])), (128, 0, 255), 1)


def test_float_tiff_uses_its_real_range():
    half = save(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF")
    assert pixel(open_image(half)) == (128, 128, 128)
    ramp = save(Image.fromarray(np.array([[0, 500, 1000, 1000]] * 4, np.float32)), "TIFF")
    assert [pixel(open_image(ramp), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    members, updates = tier_members(image_row("jpg"), {"jpg": half})
    assert updates["source_format"] == "TIFF" and updates["conversion"] == "format+float"
    assert members[0][0] == "png" and pixel(reread(members[0][1])) == (128, 128, 128)


def test_cmyk_jpeg_becomes_rgb_of_the_right_colour():
    cyan = save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    assert near(pixel(open_image(cyan)), (0, 255, 255))
    members, updates = tier_members(image_row(), {"jpg": cyan})
    assert updates["conversion"] == "cmyk" and updates["image_format"] == "JPEG" and members[0][0] == "jpg"
    back = Image.open(io.BytesIO(members[0][1]))
    assert back.mode == "RGB" and near(pixel(back), (0, 255, 255), 4)


def test_palette_png_with_transparency_is_composited_on_white():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(0, (0, 0, 4, 8))  # left half: index 0 (black), transparent
    data = save(img, "PNG", transparency=0)
    out = open_image(data)
    assert pixel(out, (0, 0)) == (255, 255, 255) and pixel(out, (7, 0)) == (255, 0, 0)
    members, updates = tier_members(image_row("png"), {"png": data})
    assert updates["conversion"] == "alpha" and pixel(reread(members[0][1])) == (255, 255, 255)
    half = save(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG")
    assert near(pixel(open_image(half)), (127, 127, 127), 1)


def test_grey_and_bilevel_are_expanded_to_rgb():
    assert open_image(save(Image.new("L", (4, 4), 77), "PNG")).mode == "RGB"
    assert pixel(open_image(save(Image.new("1", (4, 4), 1), "PNG"))) == (255, 255, 255)
    grey_jpeg = save(Image.new("L", (8, 8), 90), "JPEG")
    assert tier_members(image_row(), {"jpg": grey_jpeg})[0] == [("jpg", grey_jpeg)]  # any reader opens it


# ---------------------------------------------------------------- orientation, animation, webp
def test_exif_rotated_jpeg_is_applied_and_sizes_are_the_displayed_ones():
    data = exif_jpeg(6)  # stored 40x20, displayed 20x40 (rotate 90 clockwise)
    facts = image_facts(data)
    assert (facts["width"], facts["height"], facts["orientation"]) == (20, 40, 6)
    img = open_image(data)
    assert img.size == (20, 40)
    assert pixel(img, (10, 2))[0] > 150 and pixel(img, (10, 37))[2] > 150  # red on top, blue below
    members, updates = tier_members(image_row(), {"jpg": data})
    assert (updates["width"], updates["height"], updates["conversion"]) == (20, 40, "orientation")
    tiered = Image.open(io.BytesIO(members[0][1]))
    assert tiered.size == (20, 40) and tiered.getexif().get(0x0112) is None  # no reader can rotate it again
    df = DecodeImage(DecodeImage.Params())(frame([data]))
    assert (df.loc[0, "width"], df.loc[0, "height"]) == (20, 40) and df.loc[0, "conversion"] == "orientation"


def test_orientation_one_keeps_the_original_bytes():
    data = exif_jpeg(1)
    assert tier_members(image_row(), {"jpg": data}) == (
        [("jpg", data)], {"image_format": "JPEG", "source_format": "JPEG", "conversion": None, "width": 40,
                          "height": 20, "media": ["jpg"], "num_bytes": len(data)})


def test_animated_gif_and_png_give_their_first_frame_as_a_still_png():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    apng = save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    assert image_facts(apng)["animated"]
    for data, conversion in ((gif, "format"), (apng, "animated")):
        assert near(pixel(open_image(data)), (255, 0, 0))
        members, updates = tier_members(image_row("png"), {"png": data})
        out = Image.open(io.BytesIO(members[0][1]))
        assert members[0][0] == "png" and updates["conversion"] == conversion
        assert not getattr(out, "is_animated", False) and near(pixel(out), (255, 0, 0))


def test_gif_frame_larger_than_its_screen_is_capped():
    gif = save(Image.new("P", (8, 8)), "GIF")
    at = gif.index(b"\x2c")  # image descriptor: left, top, width, height
    forged = gif[:at + 5] + struct.pack("<HH", 2000, 2000) + gif[at + 9:]
    with pytest.raises(MediaError) as err:
        open_image(forged, max_pixels=1_000_000)
    assert err.value.reason == "too_many_pixels" and "2000x2000" in str(err.value)


def test_webp_kept_as_is_unless_it_has_alpha():
    lossy = save(Image.new("RGB", (32, 32), (10, 120, 200)), "WEBP", quality=80)
    members, updates = tier_members(image_row("jpg"), {"jpg": lossy})  # misnamed in the raw shard
    assert members == [("webp", lossy)] and updates["image_format"] == "WEBP" and updates["media"] == ["webp"]
    alpha = save(Image.new("RGBA", (32, 32), (10, 120, 200, 0)), "WEBP", quality=80)
    members, updates = tier_members(image_row("webp"), {"webp": alpha})
    assert updates["conversion"] == "alpha" and members[0][0] == "jpg"  # lossy source: JPEG q95
    assert near(pixel(reread(members[0][1])), (255, 255, 255))
    lossless = save(Image.new("RGBA", (32, 32), (10, 120, 200, 0)), "WEBP", lossless=True)
    assert tier_members(image_row("webp"), {"webp": lossless})[0][0][0] == "png"


def test_png_named_jpg_is_named_by_its_real_format_and_kept():
    data = save(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG")
    row = image_row("jpg")
    assert tier_media(row, {"jpg": data}) == [("png", data)]  # the writer's wrapper updates the row
    assert row["media"] == ["png"] and row["image_format"] == "PNG" and row["num_bytes"] == len(data)


def test_pass_through_is_header_only(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(media, "open_image_with_facts", boom)
    data = jpeg(800, 600)
    assert tier_members(image_row(), {"jpg": data})[0] == [("jpg", data)]


# ---------------------------------------------------------------- documents
def test_document_members_renamed_and_references_rewritten():
    a, b = jpeg(40, 30), save(Image.new("RGB", (30, 40), (0, 9, 0)), "PNG")
    tif = save(Image.new("RGB", (20, 20), (5, 6, 7)), "TIFF")
    items = [{"type": "text", "text": "hi"}, {"type": "image", "member": "0.jpg"}, "stray string", 7, None,
             ["a", "list"], {"type": "image", "member": ["not", "a", "name"]}, {"type": "image", "member": "2.jpg"},
             {"type": "image", "member": "1.jpg"}, {"type": "image", "member": "gone.jpg"}]
    row = doc_row(["0.jpg", "1.jpg", "2.jpg"], items)
    members, updates = tier_members(row, {"0.jpg": a, "1.jpg": b, "2.jpg": tif})
    assert [m for m, _ in members] == ["0.jpg", "1.png", "2.png"]
    assert members[0][1] == a and members[1][1] == b and updates["num_images"] == 3
    doc = updates["doc"]
    assert doc["items"][1]["member"] == "0.jpg" and doc["items"][7]["member"] == "2.png"
    assert doc["items"][8]["member"] == "1.png" and doc["items"][9]["member"] is None
    assert doc["items"][2:6] == ["stray string", 7, None, ["a", "list"]] and doc["items"][6]["member"] is None
    assert updates["media"] == ["0.jpg", "1.png", "2.png"] and updates["conversion"] == "format"
    assert (updates["width"], updates["height"], updates["image_format"]) == (40, 30, "JPEG")  # the first image's
    assert updates["num_bytes"] == sum(len(d) for _, d in members) and "sha256" not in updates


def test_document_with_a_corrupt_second_image_fails():
    good = jpeg(40, 30)
    with pytest.raises(MediaError) as err:
        tier_members(doc_row(["0.jpg", "1.jpg"]), {"0.jpg": good, "1.jpg": good[:-300]})
    assert err.value.reason == "corrupt_image" and "image 1" in str(err.value)


def test_document_whose_second_image_is_a_bomb_fails_before_decompressing():
    bomb = png_raw(30000, 30000, 8, 0, zeros_zlib(1 << 20))  # 900 MP claimed (the header is what counts)
    t0 = time.perf_counter()
    with pytest.raises(MediaError) as err:
        tier_members(doc_row(["0.jpg", "1.png"]), {"0.jpg": jpeg(), "1.png": bomb})
    assert err.value.reason == "too_many_pixels" and time.perf_counter() - t0 < 0.5


def test_document_problems_are_media_errors():
    with pytest.raises(MediaError, match="no member") as err:
        tier_members(doc_row(["0.jpg", "1.jpg"]), {"0.jpg": jpeg()})
    assert err.value.reason == "missing_member"
    with pytest.raises(MediaError) as err:
        tier_members({**doc_row(["0.jpg"]), "doc": "[1, 2]"}, {"0.jpg": jpeg()})
    assert err.value.reason == "bad_document"
    with pytest.raises(MediaError) as err:
        tier_members({**doc_row([]), "media": []}, {})
    assert err.value.reason == "no_image"


# ---------------------------------------------------------------- video
def test_video_probe_comes_from_the_file_not_the_json():
    clip = video(frames=16, fps=8)
    row = {"kind": "video", "media": ["mp4"], "duration": 100.0, "fps": 60.0, "width": 4000, "height": 3000,
           "sha256": "cd" * 32}
    members, updates = tier_members(row, {"mp4": clip})
    assert members == [("mp4", clip)]
    assert updates["duration"] == pytest.approx(2.0, abs=0.2) and updates["fps"] == pytest.approx(8.0)
    assert (updates["width"], updates["height"], updates["num_frames"], updates["codec"]) == (64, 48, 16, "mpeg4")
    assert updates["num_bytes"] == len(clip) and "sha256" not in updates  # a row's own hash is kept


def test_video_without_sha256_gets_the_files_and_webm_is_named_webm():
    clip = video("libvpx", "webm", frames=10, fps=10)
    members, updates = tier_members({"kind": "video", "media": ["mp4"], "sha256": None}, {"mp4": clip})
    assert members[0][0] == "webm" and updates["media"] == ["webm"]
    assert updates["sha256"] == hashlib.sha256(clip).hexdigest()
    assert updates["num_frames"] == 10 and updates["duration"] == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("data", [b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, b"garbage" * 50, None])
def test_corrupt_video_bytes_are_corrupt_video(data):
    data = video()[:400] if data is None else data
    with pytest.raises(MediaError) as err:
        tier_members({"kind": "video", "media": ["mp4"]}, {"mp4": data})
    assert err.value.reason in ("corrupt_video", "unsupported_video") and "\n" not in str(err.value)


# ---------------------------------------------------------------- determinism
def test_same_input_gives_identical_bytes_and_updates():
    cases = [
        (image_row(), {"jpg": exif_jpeg(8)}),
        (image_row(), {"jpg": save(Image.new("CMYK", (30, 20), (0, 200, 30, 10)), "JPEG")}),
        (image_row("png"), {"png": save(Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 999), "PNG")}),
        (doc_row(["0.png", "1.jpg"]), {"0.png": save(Image.new("LA", (9, 9), (3, 100)), "PNG"), "1.jpg": jpeg()}),
        ({"kind": "video", "media": ["mp4"]}, {"mp4": video(frames=4)}),
    ]
    for row, files in cases:
        first = tier_members(dict(row), files)
        assert first == tier_members(dict(row), files)


# ---------------------------------------------------------------- operators
def frame(images):
    n = len(images)
    return pd.DataFrame({"uid": [f"{i:016x}" for i in range(n)], "kind": ["image_text"] * n, "image_bytes": images,
                         "text": ["x"] * n, "status": ["kept"] * n, "reason": [None] * n, "error": [None] * n})


def test_decode_image_keeps_only_a_thumbnail_and_full_images_come_back_on_demand():
    ramp = np.add.outer(np.arange(1200) // 5, np.arange(1600) // 7).astype(np.uint8)
    big = save(Image.fromarray(np.dstack([ramp, ramp[::-1], ramp[:, ::-1]])), "PNG")
    small = jpeg(200, 100)
    df = DecodeImage(DecodeImage.Params())(frame([big, small, big]))
    assert [im.size for im in df["_image"]] == [(THUMBNAIL_SIDE, 384), (200, 100), (THUMBNAIL_SIDE, 384)]
    assert list(df["width"]) == [1600, 200, 1600] and list(df["source_format"]) == ["PNG", "JPEG", "PNG"]
    full = list(images_of(df))
    assert [im.size for im in full] == [(1600, 1200), (200, 100), (1600, 1200)]
    assert full[1] is df["_image"][1]  # small enough: the decoded image itself, no second decode
    hashed = PerceptualHash(PerceptualHash.Params())(df)
    assert hashed.loc[1, "phash"] == str(imagehash.phash(open_image(small)))  # unchanged for small images
    apart = PerceptualHash(PerceptualHash.Params())(frame([big]).assign(width=1600, height=1200))
    assert apart.loc[0, "phash"] == hashed.loc[0, "phash"]  # same hash whether or not the stages were fused


def test_decode_image_cap_cannot_be_raised_past_the_shared_one():
    from curation.errors import ConfigError

    with pytest.raises(ConfigError, match="max_pixels"):
        DecodeImage.check_params(DecodeImage.Params(max_pixels=DEFAULT_MAX_PIXELS + 1), "ops[0]")
