"""Video clips: cut each video at its scene boundaries into clips that are samples of
their own.

Scenes are found as video_frames finds them (frames.split_scenes over frames sampled
at `scene_fps`, decoded with PyAV so every run cuts the same way). They become clips:

* a scene shorter than `min_seconds` is merged into the clip before it (the first
  scene into the one after it), so no footage is dropped for being short;
* a clip longer than `max_seconds` is split into equal pieces of at most that length
  (each at least max_seconds / 2, which is why max_seconds >= 2 * min_seconds);
* a cut within half a sampling interval of a keyframe moves onto it (the scene cut is
  no more precise than that), then every cut falls on a frame boundary.

A clip whose first frame is a keyframe, in a stream without reordered (B-) frames, is
remuxed: its packets are copied as they are. Any other clip is re-encoded with x264
(one thread, no B-frames or lookahead: the same bytes on every run). Clips carry the
video stream only. At most `max_clips` clips, and `max_clip_bytes` of clips, per video:
the video's first clips, in order (a video whose first clip is over the cap stays whole).

A video that is one scene no longer than max_seconds (or shorter than min_seconds) is
left as it is. A video that is cut ends in the ledger `dropped` as `split_into_clips`;
each clip is a new row of kind video with its own uid (derived from the parent's uid
and the clip's index), `parent_uid`, `clip_start` and `clip_end` (seconds in the
parent), its probe, and `raw_key` `<parent key>.clipNNN`. A clip's bytes travel with
the annotated rows (annotate.CLIP_BYTES_COLUMN), not in the raw shards. A video that
cannot be cut fails as `clip_cut_error`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..ids import make_uid
from ._media import video_bytes_of
from .base import LIVE, MapOp, Resources, describe_error, register
from .frames import PyAvVideo, sample_indices, split_scenes

# What an encoder needs to write the same bytes every run, with no B-frames (the demo's
# videos use it too). FFmpeg's name for x264's bframes is `bf`: an unknown key is ignored.
X264_OPTIONS = {"threads": "1", "bf": "0", "rc-lookahead": "0", "sync-lookahead": "0"}
# Where a kept clip's mp4 travels from stage A to stage C (it is in no raw shard).
CLIP_BYTES_COLUMN = "video_clip_bytes"
# On a video that was cut: how many clip rows it made (stage A commits a raw shard only
# once all of them are written, wherever Ray's batching put them).
NUM_CLIPS_COLUMN = "num_clips"
# Columns that describe the parent's frames, not a clip's: a clip starts without them.
PARENT_ONLY_COLUMNS = ("frame_times", "scenes", "frames_backend")


def clip_uid(parent_uid: str, index: int) -> str:
    """A clip's uid: from its parent's uid and its index, so a re-run gives the same one."""
    return make_uid(f"clip/{parent_uid}", index)


def clip_key(parent_key: str, index: int) -> str:
    """A clip's raw_key. A tar key's last part never holds a '.', so no raw key is one."""
    return f"{parent_key}.clip{index:03d}"


def plan_bounds(scenes: list[tuple[float, float]], min_seconds: float, max_seconds: float) -> list[tuple[float, float]]:
    """Scenes -> clip bounds in seconds: short scenes merged into a neighbour, long
    clips split evenly (see the module doc)."""
    merged: list[list[float]] = []
    for a, b in scenes:
        if merged and (b - a < min_seconds or merged[-1][1] - merged[-1][0] < min_seconds):
            merged[-1][1] = b  # a short scene joins the clip before it; a short first clip takes this one
        else:
            merged.append([a, b])
    out = []
    for a, b in merged:
        pieces = max(1, int(np.ceil((b - a) / max_seconds - 1e-9)))
        step = (b - a) / pieces
        out += [(a + i * step, a + (i + 1) * step) for i in range(pieces)]
    return out


def frame_ranges(bounds: list[tuple[float, float]], times: np.ndarray, key_times: list[float],
                 snap: float) -> list[tuple[int, int]]:
    """Clip bounds -> frame index ranges [first, last + 1), cuts snapped to a keyframe
    within `snap` seconds, then to the first frame starting at or after the cut."""
    cuts = [a for a, _ in bounds[1:]]
    if key_times:
        keys = np.asarray(key_times)
        cuts = [float(keys[np.abs(keys - c).argmin()]) if np.abs(keys - c).min() <= snap else c for c in cuts]
    edges = [0, *(int(np.searchsorted(times, c - 1e-6, side="left")) for c in cuts), len(times)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _packets(data: bytes) -> list[tuple[int, int | None, bool]]:
    """(pts, dts, keyframe) of the video packets in decode order."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        return [(p.pts, p.dts, p.is_keyframe) for p in container.demux(stream) if p.pts is not None and p.size]


def can_remux(packets: list[tuple[int, int | None, bool]], first_pts: int) -> bool:
    """Copying packets makes a whole clip when it starts on a keyframe and no frame is
    stored before one it is shown after (no B-frames: nothing refers past the cut)."""
    order = [p for p, _, _ in packets]
    return any(p == first_pts and key for p, _, key in packets) and order == sorted(order)


def cut(video: PyAvVideo, first: int, stop: int, packets: list | None = None) -> tuple[bytes, str]:
    """Frames [first, stop) of `video` as an mp4 (video stream only): ("remux" | "reencode").
    `packets`: the video's _packets, when several clips are cut from it."""
    import av

    p0 = video.pts[first]
    p1 = video.pts[stop] if stop < len(video.pts) else None
    inside = (lambda pts: pts >= p0 and (p1 is None or pts < p1))
    buf = io.BytesIO()
    if can_remux(packets if packets is not None else _packets(video.data), p0):
        with av.open(io.BytesIO(video.data)) as src, av.open(buf, mode="w", format="mp4") as dst:
            ist = src.streams.video[0]
            ost = dst.add_stream_from_template(ist)
            for packet in src.demux(ist):
                if packet.pts is None or not packet.size or not inside(packet.pts):
                    continue
                packet.pts -= p0
                packet.dts = packet.pts if packet.dts is None else packet.dts - p0
                packet.stream = ost
                dst.mux(packet)
        return buf.getvalue(), "remux"
    with av.open(io.BytesIO(video.data)) as src, av.open(buf, mode="w", format="mp4") as dst:
        ist = src.streams.video[0]
        rate = ist.average_rate or ist.guessed_rate or 25
        ost = dst.add_stream("libx264", rate=rate, options=dict(X264_OPTIONS))
        # x264's 4:2:0 needs even sides: an odd one loses its last pixel (scaled, not cropped).
        width, height = ist.codec_context.width // 2 * 2, ist.codec_context.height // 2 * 2
        ost.width, ost.height, ost.pix_fmt = width, height, "yuv420p"
        ost.codec_context.time_base = ist.time_base
        src.seek(p0, stream=ist, backward=True, any_frame=False)
        for frame in src.decode(ist):
            if frame.pts is None or frame.pts < p0:
                continue
            if not inside(frame.pts):
                break
            out = frame.reformat(format="yuv420p", width=width, height=height)
            out.pts, out.time_base = frame.pts - p0, ist.time_base
            for packet in ost.encode(out):
                dst.mux(packet)
        for packet in ost.encode():
            dst.mux(packet)
    return buf.getvalue(), "reencode"


@register
class VideoClips(MapOp):
    name = "video_clips"
    reasons = ("split_into_clips", "clip_cut_error")
    version = "1"
    kinds = ("video",)
    fusable = False  # decoding and encoding are heavy: its own actor pool
    resources = Resources(num_cpus=0.5, batch_size=4)
    outputs = ("parent_uid", "clip_start", "clip_end")

    @dataclasses.dataclass
    class Params:
        min_seconds: float = 1.0
        max_seconds: float = 30.0
        scene_fps: float = 4.0  # frames per second compared for scene cuts
        max_scene_frames: int = 256
        scene_threshold: float = 0.3
        max_clips: int = 16
        max_clip_bytes: int = 64 << 20  # all of one video's clips together

    @classmethod
    def check_params(cls, params, where):
        p = params
        if not (p.min_seconds > 0 and p.max_seconds >= 2 * p.min_seconds):
            raise ConfigError(f"{where} (video_clips): need min_seconds > 0 and max_seconds >= 2 * min_seconds")
        if not (p.scene_fps > 0 and p.max_scene_frames >= 2 and 0 <= p.scene_threshold <= 1):
            raise ConfigError(f"{where} (video_clips): need scene_fps > 0, max_scene_frames >= 2, 0 <= scene_threshold <= 1")
        if p.max_clips < 1 or p.max_clip_bytes < 1:
            raise ConfigError(f"{where} (video_clips): need max_clips >= 1 and max_clip_bytes >= 1")

    def clips_of(self, data: bytes) -> list[dict]:
        """The clips of one video (empty: leave it whole)."""
        from ..media import probe_video

        p = self.params
        video = PyAvVideo(data)
        picked = sample_indices(video.times, video.key_indices, "fps", p.max_scene_frames, p.scene_fps, video.end)
        times = [float(video.times[i]) for i in picked]
        scenes = split_scenes(times, video.frames(picked), video.end, p.scene_threshold)
        bounds = plan_bounds([tuple(s) for s in scenes], p.min_seconds, p.max_seconds)
        if len(bounds) < 2:
            return []
        step = video.end / max(1, len(picked))
        ranges = frame_ranges(bounds, video.times, [float(video.times[i]) for i in video.key_indices], step / 2)
        if len(ranges) < 2:  # the cuts fell on one frame: nothing to cut
            return []
        packets = _packets(data)
        clips, total = [], 0
        for first, stop in ranges[: p.max_clips]:
            data_out, method = cut(video, first, stop, packets)
            if total + len(data_out) > p.max_clip_bytes:
                break
            total += len(data_out)
            probe = probe_video(data_out)
            end = float(video.times[stop]) if stop < len(video.times) else video.end
            clips.append({"bytes": data_out, "method": method, "start": round(float(video.times[first]), 3),
                          "end": round(end, 3), "probe": probe})
        return clips

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        made = []
        for idx, row in live.iterrows():
            try:
                clips = self.clips_of(video_bytes_of(row))
            except Exception as exc:  # a video we cannot cut fails alone
                self.fail(live, [idx], "clip_cut_error", describe_error(exc))
                clips = []
            if clips:
                live.loc[idx, "status"] = "dropped"
                live.loc[idx, "reason"] = "split_into_clips"
            made.append(clips or None)
        live["_clips"] = made
        live[NUM_CLIPS_COLUMN] = [len(c) if c else None for c in made]
        return live

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = super().__call__(batch)
        if "_clips" not in batch.columns:
            return batch
        new = [clip_row(row, i, c) for _, row in batch.iterrows() if isinstance(row["_clips"], list)
               for i, c in enumerate(row["_clips"])]
        batch = batch.drop(columns="_clips")
        if not new:
            return batch
        out = pd.concat([batch, pd.DataFrame(new)], ignore_index=True)
        for col in self.outputs:  # null (not NaN) on the rows that are not clips
            out[col] = out[col].astype(object).where(out[col].notna(), None)
        return out


def clip_row(parent: pd.Series, index: int, clip: dict) -> dict:
    """A clip's row: the parent's (its text, url, source) with its own identity and facts."""
    row = {k: v for k, v in parent.items() if k not in ("_clips", NUM_CLIPS_COLUMN)}
    probe = clip["probe"]
    row.update(uid=clip_uid(parent["uid"], index), raw_key=clip_key(str(parent.get("raw_key")), index),
               parent_uid=parent["uid"], clip_start=clip["start"], clip_end=clip["end"], status=LIVE, reason=None,
               error=None, image_bytes=clip["bytes"], media=[probe["ext"]], num_bytes=len(clip["bytes"]),
               sha256=hashlib.sha256(clip["bytes"]).hexdigest(), duration=probe["duration"], fps=probe["fps"],
               width=probe["width"], height=probe["height"], num_frames=probe["num_frames"], codec=probe["codec"])
    for col in PARENT_ONLY_COLUMNS:
        if col in row:
            row[col] = None
    return row
