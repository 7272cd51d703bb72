"""Language identification of captions and OCR text with py3langid (its model ships in
the package; no download). Writes `language` (ISO 639-1) and `language_score` (a
normalised probability); with `keep`, samples in other languages are dropped."""

from __future__ import annotations

import dataclasses
import re

import pandas as pd

from ..errors import ConfigError
from .base import MapOp, Resources, register

LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")


@register
class LanguageId(MapOp):
    name = "language"
    reasons = ("language",)
    version = "1"
    resources = Resources(num_cpus=0.25, batch_size=256)  # cheap: leaves CPU to model stages
    outputs = ("language", "language_score")

    @dataclasses.dataclass
    class Params:
        min_chars: int = 12  # shorter text is too little evidence: language stays null
        keep: list[str] = dataclasses.field(default_factory=list)  # e.g. [en]; empty keeps every language
        include_ocr: bool = True

    @classmethod
    def check_params(cls, params, where):
        if params.min_chars < 0:
            raise ConfigError(f"{where} (language): min_chars must be >= 0")
        bad = [code for code in params.keep if not LANGUAGE_CODE.match(code)]
        if bad:  # py3langid names languages by lower-case ISO 639-1 codes: 'EN' would keep nothing
            raise ConfigError(f"{where} (language): keep takes lower-case ISO 639-1 codes such as en, de, zh; "
                              f"got {bad[:5]}")

    def __init__(self, params):
        super().__init__(params)
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        text = live["text"].fillna("").astype(str)
        if self.params.include_ocr and "ocr_text" in live.columns:
            text = text + " " + live["ocr_text"].fillna("").astype(str)
        langs, scores = [], []
        for t in text.str.strip():
            if len(t) < self.params.min_chars:
                langs.append(None)
                scores.append(None)
                continue
            lang, score = self.identifier.classify(t)
            langs.append(lang)
            scores.append(round(float(score), 4))
        live["language"], live["language_score"] = langs, scores
        if self.params.keep:
            self.drop(live, live["language"].notna() & ~live["language"].isin(self.params.keep), "language")
        return live
