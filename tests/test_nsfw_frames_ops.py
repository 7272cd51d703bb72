"""NSFW scoring with nudenet's bundled detector, and video frame sampling / scene
splitting on small mp4s generated here with PyAV."""

import io
import random
from fractions import Fraction

import pandas as pd
import pytest
from PIL import Image, ImageDraw

from curation.demo import scenes
from curation.errors import ConfigError
from curation.ops.frames import VideoFrames
from curation.ops.nsfw import Nsfw


def rows(media, kind="image_text"):
    n = len(media)
    return pd.DataFrame({"uid": [f"{i:016x}" for i in range(n)], "kind": [kind] * n, "image_bytes": media,
                         "status": ["kept"] * n, "reason": [None] * n, "error": [None] * n})


# ------------------------------------------------------------------------------ nsfw
@pytest.fixture(scope="module")
def shapes():
    rng = random.Random(3)
    return [scenes.encode_jpeg(scenes.render(scenes.random_scene(rng, with_word=i % 2 == 0))) for i in range(8)]


@pytest.fixture(scope="module")
def nsfw_annotate():
    return Nsfw(Nsfw.Params(action="annotate"))


def test_nsfw_scores_clean_shapes_low(nsfw_annotate, shapes):
    out = nsfw_annotate(rows(shapes))
    scores = out["nsfw"].astype(float)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores.max() < 0.2  # nudenet reports nothing below 0.2; rendered shapes are far below
    assert (out["status"] == "kept").all()
    assert out["nsfw_model"].iloc[0].startswith("nudenet-") and "sha256:" in out["nsfw_model"].iloc[0]


def test_nsfw_drop_action_and_broken_image(shapes):
    media = shapes[:3] + [b"\xff\xd8 broken jpeg"]
    out = Nsfw(Nsfw.Params(threshold=1e-9, action="drop"))(rows(media))  # every real image scores above 1e-9
    assert out["status"].tolist() == ["dropped"] * 3 + ["failed"]
    assert out["reason"].tolist() == ["nsfw"] * 3 + ["nsfw_input_error"]
    assert pd.isna(out["nsfw"].iloc[3]) and out["nsfw"].iloc[:3].astype(float).gt(1e-9).all()
    kept = Nsfw(Nsfw.Params(action="drop"))(rows(shapes[:3]))  # the default threshold keeps them
    assert (kept["status"] == "kept").all()


def test_nsfw_options_are_checked():
    with pytest.raises(ConfigError, match="action"):
        Nsfw.parse_params({"action": "blur"}, "p.yaml: ops[4]")
    with pytest.raises(ConfigError, match="unknown option"):
        Nsfw.parse_params({"threshold": 0.5, "classes": []}, "p.yaml: ops[4]")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        Nsfw.parse_params({"threshold": 1.5}, "p.yaml: ops[4]")


# ---------------------------------------------------------------------------- frames
def clip(colours, fps=8, seconds=1.0, size=64, codec="mpeg4", ball=False) -> bytes:
    """`seconds` of each background colour in turn; with `ball`, a dot moves across."""
    import av

    buf = io.BytesIO()
    n = int(fps * seconds)
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(n * len(colours)):
            img = Image.new("RGB", (size, size), colours[t // n])
            if ball:
                x = 8 + (size - 16) * t // (n * len(colours))
                ImageDraw.Draw(img).ellipse((x - 6, size // 2 - 6, x + 6, size // 2 + 6), fill=(240, 200, 30))
            frame = av.VideoFrame.from_image(img)
            frame.pts, frame.time_base = t, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


RED, BLUE, GREY = (220, 40, 40), (40, 80, 220), (128, 128, 128)


def frames(media, **params):
    return VideoFrames(VideoFrames.Params(**params))(rows(media, kind="video"))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_hard_cut_is_found_within_one_sampled_frame(backend):
    out = frames([clip([RED, BLUE])], backend=backend)
    times = out["frame_times"].iloc[0]
    assert len(times) == 8 and len(set(times)) == 8 and times == sorted(times)
    (a0, cut), (cut2, end) = [(s["start"], s["end"]) for s in out["scenes"].iloc[0]]
    assert a0 == 0 and cut == cut2 and end == pytest.approx(2.0)
    step = times[1] - times[0]
    assert abs(cut - 1.0) <= step  # the colour changes at 1.0 s
    assert out["frames_backend"].iloc[0].startswith(backend)


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])  # libx264: B-frames, packets out of order
@pytest.mark.parametrize("sampling", ["uniform", "keyframe"])
def test_decord_and_pyav_agree(codec, sampling):
    media = [clip([RED, GREY, BLUE], codec=codec, ball=True)]
    by_backend = [frames(media, backend=b, sampling=sampling, max_frames=6) for b in ("decord", "pyav")]
    for col in ("frame_times", "scenes"):
        assert by_backend[0][col].iloc[0] == by_backend[1][col].iloc[0]
    if sampling == "uniform":  # keyframes are as sparse as the encoder made them (x264: one here)
        assert len(by_backend[0]["scenes"].iloc[0]) == 3


def test_uniform_sampling_counts_and_short_clips():
    assert len(frames([clip([RED, BLUE])], max_frames=5)["frame_times"].iloc[0]) == 5
    short = frames([clip([RED], seconds=0.5)], max_frames=8)  # 4 frames only: all of them
    assert short["frame_times"].iloc[0] == [0.0, 0.125, 0.25, 0.375]


def test_motion_inside_one_shot_is_not_a_cut():
    out = frames([clip([GREY, GREY], ball=True)])
    assert out["scenes"].iloc[0] == [{"start": 0.0, "end": 2.0}]


def test_corrupt_video_fails_alone():
    good = clip([RED, BLUE])
    out = frames([good, good[: len(good) // 3], b"", b"\x00" * 500])
    assert out["status"].tolist() == ["kept", "failed", "failed", "failed"]
    assert (out["reason"].iloc[1:] == "video_decode_error").all()
    assert "no video bytes" in out["error"].iloc[2] and out["error"].iloc[1]
    assert out["frame_times"].iloc[1:].isna().all()


def test_frames_options_are_checked():
    with pytest.raises(ConfigError, match="sampling"):
        VideoFrames.parse_params({"sampling": "random"}, "p.yaml: ops[5]")
    with pytest.raises(ConfigError, match="backend"):
        VideoFrames.parse_params({"backend": "opencv"}, "p.yaml: ops[5]")
    with pytest.raises(ConfigError, match="unknown option"):
        VideoFrames.parse_params({"frame_rate": 2}, "p.yaml: ops[5]")
