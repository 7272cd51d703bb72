"""Video clips and fps frame sampling: the frame indices fps sampling picks, clip
planning, cutting (remux and re-encode, the same bytes every time), and the bundled
video_clips recipe through the engine without Ray: stage A's operators and part writer
(a clip written apart from its parent), the commit that waits for every clip, stage B's
accounting, stage C taking the clips' bytes from the parts, and the ledger."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import annotate, config, decide
from curation.errors import ConfigError
from curation.ops.clips import CLIP_BYTES_COLUMN, VideoClips, clip_uid, frame_ranges, plan_bounds
from curation.ops.frames import PyAvVideo, VideoFrames, sample_indices
from curation.tiers.build import read_picked

from .test_nsfw_frames_ops import BLUE, GREY, RED, clip, frames, rows


# ------------------------------------------------------------------ fps sampling
@pytest.mark.parametrize("seconds, fps, max_frames, expected", [
    (2.0, 1.0, 32, [4, 12]),  # 8 fps video: one frame per second, mid-second
    (2.0, 2.0, 32, [2, 6, 10, 14]),
    (4.0, 0.5, 32, [8, 24]),  # one frame per 2 s
    (0.25, 1.0, 32, [1]),  # shorter than 1/fps: still one frame
    (10.0, 2.0, 5, [8, 24, 40, 56, 72]),  # 20 wanted, capped at 5, spread evenly
    (2.0, 100.0, 64, list(range(16))),  # more than the video has: every frame once
])
def test_fps_sampling_indices(seconds, fps, max_frames, expected):
    times = np.arange(int(seconds * 8)) / 8  # an 8 fps video
    assert sample_indices(times, [0], "fps", max_frames, fps, seconds) == expected


def test_fps_sampling_on_a_real_clip_and_its_options():
    out = frames([clip([RED, BLUE], seconds=1.5)], sampling="fps", fps=2.0, max_frames=32)  # 3 s
    assert out["frame_times"].iloc[0] == [0.25, 0.75, 1.25, 1.75, 2.25, 2.75]
    assert len(out["scenes"].iloc[0]) == 2
    with pytest.raises(ConfigError, match="fps must be > 0"):
        VideoFrames.parse_params({"sampling": "fps", "fps": 0}, "p.yaml: ops[3]")


# ------------------------------------------------------------------ planning and cutting
def test_plan_merges_short_scenes_and_splits_long_ones():
    # 0-0.4 s is short: the next scene joins it; 3-3.5 s is short: it joins the clip before it.
    assert plan_bounds([(0, 0.4), (0.4, 3), (3, 3.5), (3.5, 6)], 1.0, 10.0) == [(0, 3.5), (3.5, 6)]
    assert plan_bounds([(0, 25.0)], 1.0, 10.0) == [(0, 25 / 3), (25 / 3, 50 / 3), (50 / 3, 25.0)]
    times = np.arange(48) / 8
    # The cut at 2.9 s moves to the keyframe at 3.0 s (within 0.125 s), 4.45 s to the next frame.
    assert frame_ranges([(0, 2.9), (2.9, 4.45), (4.45, 6)], times, [0.0, 3.0], 0.125) == [(0, 24), (24, 36), (36, 48)]
    with pytest.raises(ConfigError, match="max_seconds >= 2"):
        VideoClips.parse_params({"min_seconds": 2.0, "max_seconds": 3.0}, "p.yaml: ops[1]")


def clip_rows(media, keys):
    out = rows(media, kind="video")
    out["raw_key"] = keys
    return out


def test_clips_remux_on_a_keyframe_reencode_elsewhere_and_repeat_exactly():
    x264 = clip([RED, BLUE, GREY], seconds=2.0, codec="libx264")  # B-frames: always re-encoded
    mpeg4 = clip([RED, BLUE], seconds=2.0, codec="mpeg4")  # keyframe at the cut: remuxed
    one_scene = clip([GREY], seconds=2.0, ball=True)
    op = VideoClips(VideoClips.Params(min_seconds=0.5, max_seconds=3.0))
    out = op(clip_rows([x264, mpeg4, one_scene, b"junk"], ["a", "b", "c", "d"]))
    assert out["status"].tolist()[:4] == ["dropped", "dropped", "kept", "failed"]
    assert out["reason"].tolist()[:4] == ["split_into_clips", "split_into_clips", None, "clip_cut_error"]
    made = out.iloc[4:]
    assert made["raw_key"].tolist() == ["a.clip000", "a.clip001", "a.clip002", "b.clip000", "b.clip001"]
    assert made["parent_uid"].tolist() == [out["uid"][0]] * 3 + [out["uid"][1]] * 2
    assert made["uid"].tolist()[3] == clip_uid(out["uid"][1], 0)
    assert made["clip_start"].tolist() == [0.0, 2.0, 4.0, 0.0, 2.0]
    assert made["clip_end"].tolist() == [2.0, 4.0, 6.0, 2.0, 4.0]
    assert made["codec"].tolist() == ["h264"] * 3 + ["mpeg4"] * 2  # mpeg4 copied as it is
    for data, colour, sha in zip(made["image_bytes"], [RED, BLUE, GREY, RED, BLUE], made["sha256"]):
        video = PyAvVideo(data)
        assert len(video.times) == 16 and video.end == pytest.approx(2.0)
        first, last = video.frames([0, 15])
        assert np.abs(first[32, 32].astype(int) - colour).max() < 8 and np.abs(last[32, 32].astype(int) - colour).max() < 8
        assert sha == hashlib.sha256(data).hexdigest()
    assert out["parent_uid"].tolist()[:4] == [None] * 4 and out["num_clips"].tolist()[:2] == [3, 2]
    again = op(clip_rows([x264, mpeg4], ["a", "b"]))
    assert again["image_bytes"].iloc[2:].tolist() == made["image_bytes"].tolist()  # resume: the same bytes
    capped = VideoClips(VideoClips.Params(min_seconds=0.5, max_seconds=3.0, max_clips=2))(clip_rows([x264], ["a"]))
    assert capped["raw_key"].tolist() == ["a", "a.clip000", "a.clip001"]


def test_a_cut_off_a_keyframe_is_reencoded_with_even_sides():
    from curation.media import probe_video
    from curation.ops.clips import cut

    data, how = cut(PyAvVideo(clip([RED, BLUE], seconds=2.0, size=65)), 3, 10)  # frame 3: no keyframe
    probe = probe_video(data)
    assert how == "reencode" and (probe["width"], probe["height"], probe["num_frames"]) == (64, 64, 7)
    assert probe["duration"] == pytest.approx(7 / 8)


# ------------------------------------------------------------------ the recipe through the engine
def raw_tar(path: Path, videos: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, data in videos.items():
            for name, blob in ((f"{key}.mp4", data), (f"{key}.txt", f"video {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path


class Acks:
    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, **_):
        yield from self.batches


def test_video_clips_recipe_through_stages_a_b_c(tmp_path, monkeypatch):
    cfg = config.load("video_clips")
    shard = raw_tar(tmp_path / "raw.tar", {"a": clip([RED, BLUE, GREY], seconds=2.0, codec="libx264"),
                                            "c": clip([GREY], seconds=2.0, ball=True), "d": b"junk"})
    # Stage A without Ray: read, run the recipe's operators, then write the rows as two
    # parts, the second holding clips of a video in the first (Ray may batch them so).
    (table,) = annotate.read_raw_shards({"path": [str(shard)], "source": ["test"]})
    for stage in annotate.fuse(cfg.map_ops):
        table = annotate.StageActor(stage, cfg.declared_columns)(table.to_pandas())
    assert table.num_rows == 6
    annotated = tmp_path / "annotated"
    first, second = (annotate.write_parts(t, str(annotated), cfg.tiers, cfg.seed, cfg.declared_columns)
                     for t in (table.slice(0, 4), table.slice(4)))
    assert first["rows"].to_pylist() == [3] and second["rows"].to_pylist() == [0]
    annotate._collect(Acks([first]), {"raw.tar": 3}, annotated, bar=type("B", (), {"update": lambda *_: None})())
    assert not annotate.marker_path(annotated, "raw.tar").exists()  # a clip of `a` is not written yet
    annotate._collect(Acks([first, second]), {"raw.tar": 3}, annotated, bar=type("B", (), {"update": lambda *_: None})())
    parts = annotate.committed_parts(annotated, Path("raw.tar"))
    assert json.loads(annotate.marker_path(annotated, "raw.tar").read_text())["rows"] == 3 and len(parts) == 2

    decision = decide.decide(cfg, parts, ["raw.tar"], tmp_path / "work", binary_columns=annotate.BINARY_COLUMNS)
    assert decide.check_accounting(decision.counts, 3) == {"dropped": 1, "failed": 1, "kept": 1}
    assert decision.derived == {"kept": 3}
    assert {s["tier"]: s["samples"] for s in decision.shards} == {"video_clips": 3, "video_whole": 1}

    stats = tmp_path / "stats"
    stats.mkdir()
    media = pa.concat_tables(read_picked({"raw_path": [str(shard)], "picks": [str(decision.picks_path(0))],
                                          "source": ["test"], "parts": [json.dumps([str(p) for p in parts])]},
                                         None, str(stats)))
    sidecars = pq.read_table(decision.sidecars).to_pandas().set_index(["shard_id", "pos"])
    for shard_id, pos, names, datas in zip(*(media.column(c).to_pylist() for c in ("shard_id", "pos", "names", "datas"))):
        row = sidecars.loc[(shard_id, pos)]
        assert names == ["mp4"] and hashlib.sha256(datas[0]).hexdigest() == row["sha256"]
        assert (row["parent_uid"] is None) == (row["tier"] == "video_whole")
    assert media.num_rows == 4 and json.loads((stats / "raw.tar.json").read_text())["raw_bytes_read"] > 0

    crawl = tmp_path / "crawl_ledger.parquet"  # the crawl kept the three inputs, never the clips
    duckdb.sql(f"COPY (SELECT uid, source, 'crawl' AS stage, 'kept' AS status FROM '{decision.ledger}' "
               f"WHERE parent_uid IS NULL) TO '{crawl}' (FORMAT parquet)")
    assert decide.finalize_ledger(decision.ledger, [crawl], tmp_path / "ledger.parquet") == 6
    ledger = duckdb.sql(f"SELECT raw_key, status, reason, parent_uid IS NOT NULL AS derived "
                        f"FROM '{tmp_path / 'ledger.parquet'}' ORDER BY raw_key").fetchall()
    assert ledger == [("a", "dropped", "split_into_clips", False), ("a.clip000", "kept", None, True),
                      ("a.clip001", "kept", None, True), ("a.clip002", "kept", None, True),
                      ("c", "kept", None, False), ("d", "failed", "corrupt_video", False)]


def test_the_report_funnel_counts_inputs_not_the_clips_derived_from_them():
    from curation.report.html import Recipe, funnel

    con = duckdb.connect()
    con.execute("""CREATE TABLE ledger AS SELECT * FROM (VALUES
        ('a', NULL, 'curate', 'kept', NULL),
        ('b', NULL, 'curate', 'dropped', 'split_into_clips'),
        ('b.c0', 'b', 'curate', 'kept', NULL),
        ('b.c1', 'b', 'curate', 'kept', NULL),
        ('b.c2', 'b', 'curate', 'dropped', 'too_short')) AS t(uid, parent_uid, stage, status, reason)""")
    rows = funnel(con, Recipe({"ops": [{"op": "video_clips"}]}))
    assert rows[0] == {"step": "inputs", "status": "inputs", "reason": "", "samples": 2, "remaining": 2}
    assert [(r["reason"], r["samples"]) for r in rows[1:-1]] == [("split_into_clips", 1)]
    assert rows[-1]["samples"] == 1  # the one input kept whole; its sibling went on as clips
