"""Video filters over the probe the crawl recorded (PyAV: duration, fps, size, codec)."""

from __future__ import annotations

import dataclasses

import pandas as pd

from ..errors import ConfigError
from .base import MapOp, register


@register
class VideoQuality(MapOp):
    """Drop clips that are too short, too long or too small to train on."""

    name = "video_quality"
    reasons = ("unknown_duration", "video_too_short", "video_too_long", "too_small")
    version = "1"
    kinds = ("video",)
    requires = ("duration",)  # the crawl's probe (width and height too, for videos)

    @dataclasses.dataclass
    class Params:
        min_duration: float = 0.5
        max_duration: float = 3600.0
        min_side: int = 32

    @classmethod
    def check_params(cls, params, where):
        if params.min_duration < 0 or params.max_duration < params.min_duration or params.min_side < 1:
            raise ConfigError(f"{where} (video_quality): need 0 <= min_duration <= max_duration and min_side >= 1")

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        duration = pd.to_numeric(live["duration"], errors="coerce")
        side = pd.concat([pd.to_numeric(live["width"], errors="coerce"),
                          pd.to_numeric(live["height"], errors="coerce")], axis=1).min(axis=1)
        self.drop(live, duration.isna(), "unknown_duration")
        self.drop(live, duration < self.params.min_duration, "video_too_short")
        self.drop(live, duration > self.params.max_duration, "video_too_long")
        self.drop(live, side < self.params.min_side, "too_small")
        return live
