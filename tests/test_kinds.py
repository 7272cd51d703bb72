"""curation.kinds: the one home of the sample kinds. Member finding and inference on
member dicts, unknown kinds refused, per-kind facts, and a grep that no module outside
kinds.py branches on a kind's name again."""

import re
from pathlib import Path

import pytest

from curation import kinds
from curation.kinds import IMAGE_TEXT, INTERLEAVED, VIDEO, UnknownKind, infer, kind_of, tier_sample_kind
from curation.tiers.export.core import UnsafeSample
from curation.tokens import MAX_FRAMES, TOKENS_PER_FRAME, TOKENS_PER_IMAGE_MULTI, anyres_tokens, visual_tokens

B = b"x"


def members(*names):
    return {n: B for n in names}


def test_registry_names_and_lookup():
    assert kinds.names() == ("image_text", "interleaved", "video")
    assert [k.name for k in kinds.registered()] == list(kinds.names())
    assert kind_of("video") is VIDEO and kind_of("interleaved") is INTERLEAVED and kind_of("image_text") is IMAGE_TEXT
    for bad in ("Video", "audio", "", None, 3, ["video"], "video "):
        with pytest.raises(UnknownKind, match="unknown kind"):
            kind_of(bad)
        assert kinds.is_kind(bad) is False
        assert kind_of(bad, default=IMAGE_TEXT) is IMAGE_TEXT
    with pytest.raises(ValueError):
        kinds.register(kinds.Video())  # a name is registered once


@pytest.mark.parametrize("files, kind, media", [
    (members("jpg", "txt", "json"), IMAGE_TEXT, ["jpg"]),
    (members("png"), IMAGE_TEXT, ["png"]),
    (members("0.jpg"), IMAGE_TEXT, ["0.jpg"]),  # one numbered image is still one image
    (members("txt"), IMAGE_TEXT, []),
    (members("1.png", "0.jpg", "10.webp", "2.jpg"), INTERLEAVED, ["0.jpg", "1.png", "2.jpg", "10.webp"]),
    (members("img0.jpg", "image_1.png", "page-2.webp"), INTERLEAVED, ["img0.jpg", "image_1.png", "page-2.webp"]),
    (members("png", "jpg"), INTERLEAVED, ["jpg", "png"]),  # plain images, in extension order
    (members("webm", "mp4", "jpg"), VIDEO, ["mp4"]),  # a clip with a still is a video; one clip
    (members("mov"), VIDEO, ["mov"]),
])
def test_inference_and_media_members(files, kind, media):
    assert infer(files) is kind
    assert kind.media_members(files) == media


def test_media_members_per_kind_on_one_sample():
    files = members("jpg", "0.png", "1.png", "mkv", "json")
    assert IMAGE_TEXT.media_members(files) == ["jpg"]  # plain before numbered, one
    assert INTERLEAVED.media_members(files) == ["0.png", "1.png"]  # numbered before plain
    assert VIDEO.media_members(files) == ["mkv"]
    assert VIDEO.media_members(members("jpg")) == []
    assert INTERLEAVED.media_members(members("..0.jpg", "0.jpg/x", "0.gif")) == []  # not numbered image names


def test_tier_sample_kind_as_the_trainer_reads_it():
    assert tier_sample_kind(members("mp4", "json"), {"kind": "image_text"}) is VIDEO  # the clip decides
    assert tier_sample_kind(members("0.jpg", "json"), {"kind": "interleaved"}) is INTERLEAVED
    assert tier_sample_kind(members("jpg", "json"), {"doc": {"items": []}}) is INTERLEAVED
    assert tier_sample_kind(members("jpg", "json"), {"kind": "image_text", "doc": None}) is IMAGE_TEXT


def test_per_kind_facts():
    assert (IMAGE_TEXT.part, INTERLEAVED.part, VIDEO.part) == ("image", "image", "video")
    assert [k.multi for k in kinds.registered()] == [False, True, False]
    assert [k.doc_layout for k in kinds.registered()] == [False, True, False]
    assert VIDEO.tier_exts == ("mp4", "webm") and IMAGE_TEXT.tier_exts == ("jpg", "png", "webp")
    from curation.rawshards import READ_COLUMNS

    for k in kinds.registered():
        assert set(k.columns) <= set(READ_COLUMNS), k
    assert visual_tokens("video", 0, 0, 0, None) == (0, MAX_FRAMES, MAX_FRAMES * TOKENS_PER_FRAME)
    assert visual_tokens("interleaved", 0, 0, 3, 0) == (3, 0, 3 * TOKENS_PER_IMAGE_MULTI)
    assert visual_tokens("image_text", 640, 480, 1, 0) == (1, 0, anyres_tokens(640, 480))
    assert visual_tokens("bogus", 640, 480, 1, 0) == visual_tokens("image_text", 640, 480, 1, 0)  # as before


def test_export_media_checks_names_and_counts():
    assert VIDEO.export_media("t", "k1", ["webm"]) == [("video", "webm", "videos/t/k1.webm")]
    assert INTERLEAVED.export_media("t", "k1", ["0.jpg", "1.png"]) == [
        ("image", "0.jpg", "images/t/k1_0.jpg"), ("image", "1.png", "images/t/k1_1.png")]
    assert IMAGE_TEXT.export_media("t", "k1", ["png"]) == [("image", "png", "images/t/k1.png")]
    for kind, names in ((VIDEO, ["mkv"]), (VIDEO, ["mp4", "mp4"]), (IMAGE_TEXT, ["jpg", "png"]),
                        (IMAGE_TEXT, ["mp4"]), (INTERLEAVED, ["../0.jpg"]), (INTERLEAVED, ["0.jpg", "mp4"])):
        with pytest.raises(UnsafeSample):
            kind.export_media("t", "k1", names)


def test_crawlers():
    from curation.errors import InputError

    # (the crawlers themselves import img2dataset and the fetch stack, seconds; the crawl tests run them)
    with pytest.raises(InputError, match="unknown crawl kind"):
        IMAGE_TEXT.crawl_items("x", None)


# Branches on a kind's name outside curation/kinds.py. Each allowed one says why.
KIND_NAME = r"""["'](?:image_text|interleaved|video)["']"""
BRANCH = re.compile(
    rf"""(?:kind["'\])]*|\.get\(["']kind["']\))\s*(?:==|!=)\s*{KIND_NAME}"""  # kind == "video"
    rf"""|{KIND_NAME}\s*(?:==|!=)"""                                           # "video" == kind
    rf"""|kind\s+(?:not\s+)?in\s+[(\[{{]\s*{KIND_NAME}"""                      # kind in ("video", ...)
    rf"""|\bkind\s*=\s*'(?:image_text|interleaved|video)'"""                   # SQL: kind = 'video'
    rf"""|^\s*{KIND_NAME}\s*:""")                                              # {"video": ...} keyed by kind
ALLOWED = {
    # Media parts, not sample kinds: an export's "image" / "video" placeholders, and what
    # one fetched url should be ("image" / "video" / "any": its size cap and check).
    ("curation/tiers/export/sharegpt.py", 'm.kind == "video"'),
    ("curation/crawl/fetch.py", 'kind == "video"'),
    # SQL text of the report's video duration histogram (DuckDB filters; the report helper's area).
    ("curation/report/html.py", "kind = 'video'"),
}


def test_no_kind_name_branches_outside_kinds():
    root = Path(__file__).resolve().parents[1] / "curation"
    found = set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        if rel == "curation/kinds.py":
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            m = BRANCH.search(line)
            if m:
                allowed = [a for f, a in ALLOWED if f == rel and a in line]
                assert allowed, f"{rel}: branches on a kind's name, ask curation.kinds instead: {line.strip()}"
                found.add((rel, allowed[0]))
    assert found == ALLOWED  # an allowance nothing needs any more goes
