"""Video frames: sample frames from each clip and split it into scenes.

Sampling is `uniform` (max_frames frames evenly spread over the clip, each taken from
the middle of its 1/max_frames slice), `fps` (`fps` frames per second of video, at the
middle of each 1/fps interval, so a clip's frame count follows its length; Apollo,
arXiv 2412.10360, found this better than a fixed count; a clip longer than
max_frames / fps gets max_frames frames spread evenly) or `keyframe` (the encoder's
keyframes, thinned evenly to max_frames). Scene splitting compares consecutive sampled frames by colour
histogram: half the L1 distance between the two normalised histograms, a number in
[0, 1] (0 = same colours, 1 = no colour in common). Above `scene_threshold` the clip
is cut halfway between the two frames, so a cut is placed to within half a sampling
interval; sample more frames for finer cuts. With keyframe sampling, cuts are only as
fine as the encoder's keyframes (many encoders put one at each cut, x264 often does not
in short clips). Histograms ignore motion inside a shot, which is why they are used
instead of a pixel difference.

decord decodes by default; PyAV (its own FFmpeg) is the fallback, per clip, when
decord is missing or fails on a file. Writes `frame_times` (seconds, a list),
`scenes` ([{start, end}, ...] seconds) and `frames_backend`.

Pixels are not carried to later operators (they would travel through the object
store between actor pools); a later operator that needs frames (caption) decodes the
few it needs at the recorded times with `open_video`, which costs milliseconds.

Video rows must carry their mp4 bytes (see _media.video_bytes_of).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ._media import video_bytes_of
from .base import MapOp, Resources, describe_error, register

BACKENDS = ("auto", "decord", "pyav")
SAMPLING = ("uniform", "fps", "keyframe")


class DecordVideo:
    def __init__(self, data: bytes):
        import decord

        self.reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        stamps = self.reader.get_frame_timestamp(list(range(len(self.reader))))
        self.times = stamps[:, 0].astype(float)
        self.end = float(stamps[-1, 1])
        self.key_indices = [int(i) for i in self.reader.get_key_indices()]
        self.backend = f"decord-{decord.__version__}"

    def frames(self, indices: list[int]) -> list[np.ndarray]:
        return list(self.reader.get_batch(list(indices)).asnumpy())


class PyAvVideo:
    """Frame times come from the demuxed packets (no decoding); frames are decoded by
    seeking to the keyframe before each wanted one."""

    def __init__(self, data: bytes):
        import av

        self.data = data
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            packets = [(p.pts, p.duration or 0, p.is_keyframe) for p in container.demux(stream)
                       if p.pts is not None and p.size]
            tb, start = stream.time_base, stream.start_time or 0
        if not packets:
            raise ValueError("no video frames in the stream")
        packets.sort()  # presentation order (B-frames arrive out of order)
        self.pts = [p for p, _, _ in packets]
        self.times = np.array([float((p - start) * tb) for p in self.pts])
        self.end = float((packets[-1][0] + packets[-1][1] - start) * tb)
        self.key_indices = [i for i, (_, _, key) in enumerate(packets) if key]
        self.backend = f"pyav-{av.__version__}"

    def frames(self, indices: list[int]) -> list[np.ndarray]:
        import av

        out: dict[int, np.ndarray] = {}
        with av.open(io.BytesIO(self.data)) as container:
            stream = container.streams.video[0]
            for i in sorted(set(indices)):
                target = self.pts[i]
                container.seek(target, stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if frame.pts is not None and frame.pts >= target:
                        out[i] = frame.to_ndarray(format="rgb24")
                        break
                else:
                    raise ValueError(f"frame {i} (pts {target}) could not be decoded")
        return [out[i] for i in indices]


def open_video(data: bytes, backend: str = "auto"):
    """A decoded-on-demand view of an mp4: .times, .end, .key_indices, .frames(indices)."""
    return PyAvVideo(data) if backend == "pyav" else DecordVideo(data)


def with_fallback(data: bytes, backend: str, work):
    """work(video) with the chosen backend; under `auto`, decord first and PyAV again
    if decord is missing or fails anywhere on this clip (PyAV reads more formats)."""
    if backend != "auto":
        return work(open_video(data, backend))
    try:
        return work(open_video(data, "decord"))
    except Exception:
        return work(open_video(data, "pyav"))


def sample_indices(times, key_indices: list[int], sampling: str, max_frames: int, fps: float = 1.0,
                   end: float | None = None) -> list[int]:
    """Frame indices to sample, ascending and distinct. `times`: each frame's start in
    seconds (presentation order); `end`: the clip's end (default: the last frame's start)."""
    n_frames = len(times)
    if sampling == "fps" and n_frames:
        end = float(times[-1]) if end is None else end
        wanted = max(1, min(max_frames, int(end * fps)))  # at least one frame, even for a clip under 1/fps
        targets = [(i + 0.5) * end / wanted for i in range(wanted)]
        # The frame showing at each target time: the last one that starts at or before it.
        picked = [max(0, int(np.searchsorted(times, t, side="right")) - 1) for t in targets]
        return sorted(set(picked))
    pool = key_indices if sampling == "keyframe" and key_indices else list(range(n_frames))
    k = min(max_frames, len(pool))
    return [pool[int((i + 0.5) * len(pool) / k)] for i in range(k)]


def colour_histogram(frame: np.ndarray, bins: int = 16) -> np.ndarray:
    """Per-channel histogram, normalised so each channel sums to 1."""
    q = (frame.reshape(-1, 3).astype(np.int64) * bins) // 256
    hist = np.stack([np.bincount(q[:, c], minlength=bins) for c in range(3)]).astype(float)
    return hist / hist.sum(axis=1, keepdims=True)


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(0.5 * np.abs(a - b).sum(axis=1).mean())


def split_scenes(times: list[float], frames: list[np.ndarray], end: float, threshold: float) -> list[list[float]]:
    hists = [colour_histogram(f) for f in frames]
    cuts = [(times[i] + times[i + 1]) / 2 for i in range(len(frames) - 1)
            if histogram_distance(hists[i], hists[i + 1]) > threshold]
    bounds = [0.0, *cuts, end]
    return [[round(a, 3), round(b, 3)] for a, b in zip(bounds, bounds[1:])]


@register
class VideoFrames(MapOp):
    name = "video_frames"
    reasons = ("video_decode_error",)
    version = "1"
    kinds = ("video",)
    fusable = False  # decoding is heavy: its own actor pool
    resources = Resources(num_cpus=0.25, batch_size=8)
    outputs = ("frame_times", "scenes", "frames_backend")

    @dataclasses.dataclass
    class Params:
        sampling: str = "uniform"
        max_frames: int = 8
        fps: float = 1.0  # frames per second of video, for sampling: fps
        scene_threshold: float = 0.3
        backend: str = "auto"

    @classmethod
    def check_params(cls, params, where):
        if params.sampling not in SAMPLING:
            raise ConfigError(f"{where} (video_frames): sampling must be one of {list(SAMPLING)}")
        if params.backend not in BACKENDS:
            raise ConfigError(f"{where} (video_frames): backend must be one of {list(BACKENDS)}")
        if not params.fps > 0:
            raise ConfigError(f"{where} (video_frames): fps must be > 0")
        if params.max_frames < 1 or not 0 <= params.scene_threshold <= 1:
            raise ConfigError(f"{where} (video_frames): need max_frames >= 1 and 0 <= scene_threshold <= 1")

    def __init__(self, params):
        super().__init__(params)
        if params.backend == "decord":  # fail once at build time, not on every row
            import decord  # noqa: F401

    def _analyse(self, video) -> tuple[list[float], list[list[float]], str]:
        picked = sample_indices(video.times, video.key_indices, self.params.sampling, self.params.max_frames,
                                self.params.fps, video.end)
        times = [round(float(video.times[i]), 3) for i in picked]
        scenes = split_scenes(times, video.frames(picked), video.end, self.params.scene_threshold)
        return times, scenes, video.backend

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        times_col, scenes_col, backend_col = [], [], []
        for idx, row in live.iterrows():
            try:
                times, scenes, backend = with_fallback(video_bytes_of(row), self.params.backend, self._analyse)
                times_col.append(times)
                scenes_col.append([{"start": a, "end": b} for a, b in scenes])
                backend_col.append(backend)
            except Exception as exc:  # corrupt or unreadable clip: this row fails, the batch goes on
                self.fail(live, [idx], "video_decode_error", describe_error(exc))
                times_col.append(None)
                scenes_col.append(None)
                backend_col.append(None)
        live["frame_times"], live["scenes"], live["frames_backend"] = times_col, scenes_col, backend_col
        return live
