"""CLIP image-text scoring and the two CLIP filters DataComp describes.

* `clip_score` (map): cosine similarity of each image_text sample's image and caption
  under an open_clip model, batched. Optional absolute filter `min_score` (DataComp's
  LAION-style baseline is ViT-B/32 >= 0.28), or `calibrated` for a model written by
  `curate train-filter`, which carries the threshold it calibrated on held-out trusted
  pairs. `keep_embeddings: true` keeps the image embeddings for `semantic_dedup` and
  writes them next to each tier shard as `<shard>.clip.npy` (float16, sidecar order).
* `clip_top_fraction` (global): keeps the best `fraction` of scored samples over the
  whole run, not per batch (DataComp's best simple baseline keeps the top 30%).

The model is named the way open_clip names it: `ViT-B-32` plus `pretrained:
laion2b_s34b_b79k` (a hub download on a cluster), `hf-hub:org/repo`, or a local
directory (`local-dir:PATH`, or just the path) such as train-filter's output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .base import LIVE, GlobalOp, MapOp, Resources, register
from .image import images_of

EMBEDDING_COLUMN = "clip_embedding"  # float16 bytes; never in the sidecar, saved as .npy


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


@register
class ClipScore(MapOp):
    name = "clip_score"
    reasons = ("clip_score_low",)
    version = "1"
    kinds = ("image_text",)
    fusable = False  # a model: its own actor pool, loaded once per actor
    resources = Resources(num_cpus=0.5, num_gpus=0.25, batch_size=64)  # GPU share used only where GPUs exist
    outputs = ("clip_score", "clip_model")
    provides_hint = {EMBEDDING_COLUMN: "with keep_embeddings: true"}  # config's error hint

    @dataclasses.dataclass
    class Params:
        model: str = ""
        pretrained: str | None = None
        min_score: float | Literal["calibrated"] | None = None  # a number, "calibrated", or null (score only)
        keep_embeddings: bool = False
        device: str = "auto"
        threads: int = 0  # torch threads per actor on CPU; 0 keeps Ray's (1 for a fractional-CPU actor)

    @classmethod
    def provides(cls, params):
        """The image embeddings too (for semantic_dedup) with keep_embeddings: true."""
        if params is None or params.keep_embeddings:
            return (*cls.outputs, EMBEDDING_COLUMN)
        return cls.outputs

    @classmethod
    def check_params(cls, params, where):
        if not isinstance(params.model, str) or not params.model:
            raise ConfigError(f"{where} (clip_score): 'model' is required, e.g. ViT-B-32 (with pretrained: "
                              f"laion2b_s34b_b79k), hf-hub:org/repo, or a train-filter output directory")
        if params.pretrained is not None and not isinstance(params.pretrained, str):
            raise ConfigError(f"{where} (clip_score): 'pretrained' must be a tag or a checkpoint path")
        ms = params.min_score
        if not (ms is None or ms == "calibrated" or (isinstance(ms, (int, float)) and not isinstance(ms, bool)
                                                      and -1 <= ms <= 1)):
            raise ConfigError(f"{where} (clip_score): min_score must be a number in [-1, 1], 'calibrated' or null")
        if ms == "calibrated":  # a folder that is here but was not written by train-filter: say so now
            from ..clipfilter import CALIBRATION_FILE

            folder = Path(params.model.removeprefix("local-dir:"))
            if folder.is_dir() and not (folder / CALIBRATION_FILE).is_file():
                raise ConfigError(f"{where} (clip_score): min_score 'calibrated' needs a model folder written by "
                                  f"`curate train-filter` (with {CALIBRATION_FILE}); the 'model' folder has none")
        if not isinstance(params.keep_embeddings, bool):
            raise ConfigError(f"{where} (clip_score): keep_embeddings must be true or false")
        if params.threads < 0:
            raise ConfigError(f"{where} (clip_score): threads must be >= 0")
        if params.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{where} (clip_score): device must be auto, cpu or cuda")

    def __init__(self, params):
        super().__init__(params)
        from ..clipfilter import load_clip

        if params.threads:
            import torch

            torch.set_num_threads(params.threads)
        self.clip = load_clip(params.model, params.pretrained, _device(params.device))
        self.min_score = params.min_score
        if self.min_score == "calibrated":
            if self.clip.calibrated_min_score is None:
                raise ConfigError(f"clip_score: min_score 'calibrated' needs a model written by `curate "
                                  f"train-filter` (with calibration.json); {params.model} has none")
            self.min_score = self.clip.calibrated_min_score

    def process(self, live: pd.DataFrame) -> pd.DataFrame:
        from ..clipfilter import embed_images, embed_texts

        images = list(images_of(live))
        texts = [t if isinstance(t, str) else "" for t in live["text"]]
        img, txt = embed_images(self.clip, images), embed_texts(self.clip, texts)
        # Rounded so a score never depends on how Ray happened to batch the rows.
        live["clip_score"] = np.round((img * txt).sum(axis=1).astype(np.float64), 4)
        live["clip_model"] = self.clip.name
        if self.params.keep_embeddings:
            live[EMBEDDING_COLUMN] = [row.astype(np.float16).tobytes() for row in img]
        if self.min_score is not None:
            self.drop(live, live["clip_score"] < self.min_score, "clip_score_low")
        return live


@register
class ClipTopFraction(GlobalOp):
    """Keep the top `fraction` of live, scored samples by clip_score over the whole run;
    ties at the cut are broken by uid so the result never depends on row order."""

    name = "clip_top_fraction"
    reasons = ("clip_score_rank",)
    version = "1"
    requires = ("clip_score",)

    @dataclasses.dataclass
    class Params:
        fraction: float = 0.3

    @classmethod
    def check_params(cls, params, where):
        if not 0 < params.fraction <= 1:
            raise ConfigError(f"{where} (clip_top_fraction): fraction must be in (0, 1]")

    def decide(self, ctx) -> None:
        if "clip_score" not in ctx.columns:
            raise ConfigError("clip_top_fraction needs clip_score: put a clip_score operator in ops")
        ctx.con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _cut AS
            SELECT uid, NULL::VARCHAR AS dup_of FROM samples WHERE status = 'kept' AND clip_score IS NOT NULL
            QUALIFY row_number() OVER (ORDER BY clip_score DESC, uid) > ceil(count(*) OVER () * {float(self.params.fraction)!r})""")
        ctx.drop("_cut", "clip_score_rank")
