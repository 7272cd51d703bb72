"""NSFW scoring with nudenet's bundled detector (a YOLOv8n ONNX model, 320x320 input,
shipped in the nudenet wheel, so it runs offline).

`nsfw` is the highest confidence the detector gives any exposed-content class
(exposed breasts, genitalia, buttocks, anus) anywhere in the image: a number in [0, 1].
NudeDetector.detect only reports boxes above 0.2 confidence; we read the detector's
raw per-anchor class scores from its ONNX session instead, so a clean image gets a
small but real score rather than a flat 0, and images are scored in batches from
in-memory arrays (no temp files). The letterbox preprocessing follows NudeDetector's
(pad right/bottom to a square, resize, scale to [0, 1]).

`action: drop` drops rows scoring above `threshold` with reason `nsfw`;
`action: annotate` only writes the score. Note: the detector's weights carry the
AGPL-3.0 licence (Ultralytics), recorded in the ONNX metadata.
"""

from __future__ import annotations

import ast
import dataclasses
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import ConfigError
from ..fsutil import file_sha256
from ._media import row_image
from .base import MapOp, Resources, describe_error, register

EXPOSED = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
           "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
ACTIONS = ("drop", "annotate")


class NudeNetScorer:
    def __init__(self):
        import nudenet

        self.detector = nudenet.NudeDetector()
        session = self.detector.onnx_session
        # Class names in output order, from the model's own metadata (a Python dict literal).
        names = ast.literal_eval(session.get_modelmeta().custom_metadata_map["names"])
        self.columns = [4 + i for i, n in sorted(names.items()) if n in EXPOSED]  # rows 0-3 are the box
        if len(self.columns) != len(EXPOSED):
            raise RuntimeError(f"nudenet model classes changed: {sorted(names.values())}")
        self.size = self.detector.input_width
        weights = Path(nudenet.__file__).parent / "320n.onnx"
        digest = file_sha256(weights)[:12]
        self.model = f"nudenet-{version('nudenet')}:320n.onnx@sha256:{digest}"

    def _blob(self, image: Image.Image) -> np.ndarray:
        side = max(image.size)
        square = Image.new("RGB", (side, side))
        square.paste(image, (0, 0))  # pad right and bottom, as NudeDetector does
        square = square.resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(square, dtype=np.float32).transpose(2, 0, 1) / 255.0

    def scores(self, images: list[Image.Image]) -> list[float]:
        if not images:
            return []
        batch = np.stack([self._blob(im) for im in images])
        out = self.detector.onnx_session.run(None, {self.detector.input_name: batch})[0]  # (n, 4 + classes, anchors)
        # Rounded so a score never depends on how Ray happened to batch the rows.
        return [round(float(np.clip(s, 0.0, 1.0)), 4) for s in out[:, self.columns, :].max(axis=(1, 2))]


@register
class Nsfw(MapOp):
    name = "nsfw"
    reasons = ("nsfw", "nsfw_input_error")
    version = "1"
    kinds = ("image_text", "interleaved")  # a document's first image
    fusable = False  # a model: its own actor pool, built once per actor
    resources = Resources(num_cpus=0.25, batch_size=32)  # onnxruntime CPU build: no GPU use
    outputs = ("nsfw", "nsfw_model")

    @dataclasses.dataclass
    class Params:
        threshold: float = 0.6
        action: str = "drop"

    @classmethod
    def check_params(cls, params, where):
        if params.action not in ACTIONS:
            raise ConfigError(f"{where} (nsfw): action must be one of {list(ACTIONS)}")
        if not 0 <= params.threshold <= 1:
            raise ConfigError(f"{where} (nsfw): threshold must be in [0, 1]")

    def __init__(self, params):
        super().__init__(params)
        self.scorer = NudeNetScorer()

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        images, ok = [], []
        for idx, row in live.iterrows():
            try:
                images.append(row_image(row))
                ok.append(idx)
            except Exception as exc:  # an image that cannot be read fails alone
                self.fail(live, [idx], "nsfw_input_error", describe_error(exc))
        scored = dict(zip(ok, self.scorer.scores(images)))
        live["nsfw"] = [scored.get(i) for i in live.index]
        live["nsfw_model"] = [self.scorer.model if i in scored else None for i in live.index]
        if self.params.action == "drop":
            self.drop(live, [i in scored and scored[i] > self.params.threshold for i in live.index], "nsfw")
        return live
