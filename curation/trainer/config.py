"""Model configurations: one dataclass, a preset per size, overrides from the CLI.

`tiny` and `small` build every module from code with random weights (no hub needed);
setting `vision_id` / `lm_id` loads a real encoder / LM by hub id or local path instead,
and the dimensions of the loaded models replace the preset's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import CurationError
from . import ARCHS, SIZES


@dataclass
class ModelConfig:
    arch: str = "llava"
    size: str = "tiny"
    # vision encoder: built from code unless vision_id ("timm:NAME", "open_clip:NAME", or a path) is set
    vision_id: str | None = None
    image_size: int = 48  # base (tile) resolution
    patch_size: int = 12
    vision_dim: int = 64
    vision_depth: int = 4
    vision_heads: int = 4
    # language model: a Qwen2 config built from code unless lm_id (hub id or path) is set
    lm_id: str | None = None
    lm_hidden: int = 96
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_ffn: int = 256
    vocab_size: int = 0  # set from the tokenizer
    # llava: AnyRes-Max tiling (LLaVA-OneVision uses max_grid 6, max_tiles 9)
    max_grid: int = 2
    max_tiles: int = 2
    # omnifusion: encode a 2x2 grid of tiles plus the whole image instead of the whole image only
    omni_tiled: bool = False
    # evlm: gated cross-attention before these LM layers, features from these encoder layers
    evlm_lm_layers: list[int] = field(default_factory=lambda: [1, 3])
    evlm_feature_layers: list[int] = field(default_factory=lambda: [1, 3])
    evlm_queries: int = 16
    # owl3: hyper-attention inside these LM layers
    owl3_lm_layers: list[int] = field(default_factory=lambda: [1, 3])
    # data side
    frames_per_video: int = 4
    max_len: int = 512  # tokens per packed row

    @property
    def unit(self) -> int:
        """Feature tokens per tile side."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS = {
    "tiny": {},
    "small": dict(image_size=64, patch_size=8, vision_dim=192, vision_depth=6, vision_heads=6, lm_hidden=256,
                  lm_layers=6, lm_heads=8, lm_kv_heads=4, lm_ffn=768, max_grid=3, max_tiles=4, evlm_lm_layers=[1, 3, 5],
                  evlm_feature_layers=[1, 3, 5], evlm_queries=32, owl3_lm_layers=[1, 3, 5], frames_per_video=8,
                  max_len=1024),
}


def model_config(arch: str, size: str = "tiny", **overrides) -> ModelConfig:
    if arch not in ARCHS:
        raise CurationError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise CurationError(f"unknown --size {size!r}; choose one of {', '.join(SIZES)}")
    values = {**PRESETS[size], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(arch=arch, size=size, **values)
