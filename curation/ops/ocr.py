"""OCR: read the text in images (signs, documents, screenshots).

Backends behind one interface: rapidocr (default; the PP-OCR det/rec ONNX models ship
inside its wheel, so it runs offline) and paddleocr (optional: `pip install paddleocr`).
The detector runs first; recognition only runs on the boxes it finds, so images without
text cost a detection pass only. Writes `ocr_text` (lines in reading order, joined by
newlines), `ocr_boxes` ([{box, text, score}]: box is the four [x, y] corners) and `ocr_model`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .base import MapOp, Resources, register
from .image import images_of


class RapidOcrBackend:
    def __init__(self, det_limit_side: int):
        import logging

        from rapidocr import RapidOCR

        self.engine = RapidOCR(params={"Global.use_cls": False, "Global.log_level": "error",
                                       "Det.limit_side_len": det_limit_side})
        from importlib.metadata import version

        logging.getLogger("RapidOCR").setLevel(logging.ERROR)  # it warns on every image without text

        self.model = f"rapidocr-{version('rapidocr')}:PP-OCR det+rec (onnxruntime)"

    def read(self, image: np.ndarray) -> list[tuple[str, list, float]]:
        out = self.engine(image)
        if out.txts is None:
            return []
        return [(t, np.asarray(b).round(1).tolist(), float(s)) for t, b, s in zip(out.txts, out.boxes, out.scores)]


class PaddleOcrBackend:  # pragma: no cover - optional dependency, not installed in CI
    def __init__(self, det_limit_side: int):
        try:
            from paddleocr import PaddleOCR
        except ImportError:
            raise ConfigError("ocr backend 'paddleocr' needs `pip install paddleocr`") from None
        self.engine = PaddleOCR(use_textline_orientation=False, text_det_limit_side_len=det_limit_side)
        self.model = "paddleocr:PP-OCR"

    def read(self, image: np.ndarray) -> list[tuple[str, list, float]]:
        results = []
        for page in self.engine.predict(image):
            for text, box, score in zip(page["rec_texts"], page["rec_polys"], page["rec_scores"]):
                results.append((text, np.asarray(box).round(1).tolist(), float(score)))
        return results


BACKENDS = {"rapidocr": RapidOcrBackend, "paddleocr": PaddleOcrBackend}


@register
class Ocr(MapOp):
    name = "ocr"
    version = "1"
    kinds = ("image_text", "interleaved")
    fusable = False  # a model: its own actor pool, built once per actor
    resources = Resources(num_cpus=0.5, batch_size=16)
    outputs = ("ocr_text", "ocr_boxes", "ocr_model")

    @dataclasses.dataclass
    class Params:
        backend: str = "rapidocr"
        min_confidence: float = 0.5
        det_limit_side: int = 480  # the detector's input size: small images need no upscaling

    @classmethod
    def check_params(cls, params, where):
        if params.backend not in BACKENDS:
            raise ConfigError(f"{where} (ocr): backend must be one of {sorted(BACKENDS)}")
        if not 0 <= params.min_confidence <= 1 or params.det_limit_side < 32:
            raise ConfigError(f"{where} (ocr): need 0 <= min_confidence <= 1 and det_limit_side >= 32")

    def __init__(self, params):
        super().__init__(params)
        self.backend = BACKENDS[params.backend](params.det_limit_side)

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        texts, boxes = [], []
        for img in images_of(live):
            found = [r for r in self.backend.read(np.asarray(img)[:, :, ::-1]) if r[2] >= self.params.min_confidence]
            texts.append("\n".join(t for t, _, _ in found))
            boxes.append([{"box": b, "text": t, "score": round(s, 4)} for t, b, s in found])
        live["ocr_text"], live["ocr_boxes"], live["ocr_model"] = texts, boxes, self.backend.model
        return live
