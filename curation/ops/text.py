"""Caption filters."""

from __future__ import annotations

import dataclasses

import pandas as pd

from ..errors import ConfigError
from .base import MapOp, register


@register
class CaptionLength(MapOp):
    """Drop samples whose caption is missing, or shorter/longer than the word limits."""

    name = "caption_length"
    reasons = ("no_caption", "caption_too_short", "caption_too_long")
    version = "1"
    kinds = ("image_text", "video")  # documents carry long text by nature

    @dataclasses.dataclass
    class Params:
        min_words: int = 3
        max_words: int = 256

    @classmethod
    def check_params(cls, params, where):
        if params.min_words < 0 or params.max_words < params.min_words:
            raise ConfigError(f"{where} (caption_length): need 0 <= min_words <= max_words")

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        text = live["text"].fillna("").astype(str).str.strip()
        words = text.str.split().str.len()
        self.drop(live, text == "", "no_caption")
        self.drop(live, words < self.params.min_words, "caption_too_short")
        self.drop(live, words > self.params.max_words, "caption_too_long")
        return live
