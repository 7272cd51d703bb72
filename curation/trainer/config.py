"""Model configurations: one dataclass, a preset per size, overrides from the CLI.

`tiny` and `small` build every module from code with random weights (no hub needed);
setting `vision_id` / `lm_id` loads a real encoder / LM by hub id or local path instead,
and the dimensions of the loaded models replace the preset's. Layer lists left unset
(None) are derived from the depths of the models actually built (`resolve_layers`), so a
real 28-layer LM gets mPLUG-Owl3's own hyper layers, not the tiny preset's.

Per-paper stage defaults (what trains, at which rate) live here too: `STAGE_DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
    # encoder features for llava/omnifusion/owl3, as LLaVA counts hidden states (1 = first block,
    # -1 = last): -2 is "vision_feature_layer -2", the block before the last, never the final norm
    vision_feature_layer: int = -2
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
    # evlm: gated cross-attention before these LM layers; owl3: hyper-attention inside them.
    # 0-based; None: derived from the LM's depth (cross_layers_for)
    cross_layers: list[int] | None = None
    # evlm: features from these encoder blocks (0-based); None: 8 (at most) spread evenly over the encoder
    evlm_feature_layers: list[int] | None = None
    evlm_queries: int = 16
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
        d = dict(d)
        old = d.pop("evlm_lm_layers" if d.get("arch") == "evlm" else "owl3_lm_layers", None)  # older checkpoints
        if old is not None and d.get("cross_layers") is None:
            d["cross_layers"] = old
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS = {
    "tiny": {},
    "small": dict(image_size=64, patch_size=8, vision_dim=192, vision_depth=6, vision_heads=6, lm_hidden=256,
                  lm_layers=6, lm_heads=8, lm_kv_heads=4, lm_ffn=768, max_grid=3, max_tiles=4, evlm_queries=32,
                  frames_per_video=8, max_len=1024),
}


def model_config(arch: str, size: str = "tiny", **overrides) -> ModelConfig:
    if arch not in ARCHS:
        raise CurationError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise CurationError(f"unknown --size {size!r}; choose one of {', '.join(SIZES)}")
    values = {**PRESETS[size], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(arch=arch, size=size, **values)


# ---------------------------------------------------------------- layer lists

def spread(depth: int, count: int) -> list[int]:
    """`count` 0-based layer indices spread evenly over `depth` layers, the last included."""
    count = max(1, min(count, depth))
    return [(i + 1) * depth // count - 1 for i in range(count)]


def cross_layers_for(arch: str, lm_depth: int) -> list[int]:
    """Where the LM reads the image, derived from its depth.
    owl3: from layer 1, every (depth // 4 + 1)-th layer: mPLUG-Owl3's 28-layer Qwen2 has
    hyper-attention in layers 1, 9, 17, 25 (the tiny 4-layer LM: 1, 3).
    evlm: Flamingo-style gated cross-attention before every other layer, at most 8 blocks,
    spread evenly (the tiny 4-layer LM: 1, 3; a 28-layer LM: 2, 6, 9, 13, 16, 20, 23, 27)."""
    if arch == "owl3":
        return list(range(1, lm_depth, lm_depth // 4 + 1)) or [0]
    return spread(lm_depth, min(8, max(1, lm_depth // 2)))


def evlm_feature_layers_for(encoder_depth: int) -> list[int]:
    """EVLM's hierarchical features: 8 of EVA2-CLIP-E's 40 blocks, evenly spaced; fewer for a
    shallow encoder (half its blocks; the tiny 4-block ViT: 1, 3)."""
    return spread(encoder_depth, min(8, max(1, encoder_depth // 2)))


def _check_layers(flag: str, layers: list[int], depth: int, what: str) -> list[int]:
    if not layers:
        raise CurationError(f"{flag} needs at least one layer")
    if len(set(layers)) != len(layers) or any(not 0 <= i < depth for i in layers):
        raise CurationError(f"{flag} {','.join(map(str, layers))}: each layer once, within 0..{depth - 1} "
                            f"(the {what} has {depth} layers)")
    return sorted(layers)


def resolve_layers(cfg: ModelConfig) -> None:
    """Fill the unset layer lists from the depths of the encoder and LM actually built, and
    check the set ones against them. Called once both are built (vision.py and lm.py have
    synced the depths of loaded models into cfg)."""
    if cfg.arch in ("evlm", "owl3"):
        layers = cfg.cross_layers if cfg.cross_layers is not None else cross_layers_for(cfg.arch, cfg.lm_layers)
        cfg.cross_layers = _check_layers("--cross-layers", list(layers), cfg.lm_layers, "language model")
    if cfg.arch == "evlm":
        layers = cfg.evlm_feature_layers if cfg.evlm_feature_layers is not None \
            else evlm_feature_layers_for(cfg.vision_depth)
        cfg.evlm_feature_layers = _check_layers("--encoder-layers", list(layers), cfg.vision_depth, "encoder")


def parse_layers(text: str | None, flag: str) -> list[int] | None:
    """"2,5,8" -> [2, 5, 8] (a CLI value)."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CurationError(f"{flag} takes comma-separated layer numbers, e.g. 2,5,8; got {text!r}") from None


# ---------------------------------------------------------------- stage defaults per paper

# Encoder learning rate as a fraction of --lr in the stages after alignment (alignment trains
# the connector only, every arch). 0 keeps the encoder frozen.
STAGE_DEFAULTS = {
    "llava": {"vision_lr_scale": 0.2},  # LLaVA-OneVision: SigLIP at 2e-6 beside the LM's 1e-5
    "omnifusion": {"vision_lr_scale": 0.0},  # OmniFusion: CLIP stays frozen, SFT trains adapter + LM
    "owl3": {"vision_lr_scale": 0.0},  # mPLUG-Owl3: the SigLIP encoder stays frozen
    "evlm": {"vision_lr_scale": 0.0},  # Flamingo's frozen encoder, which EVLM builds on (EVLM's own: unstated)
}
# A from-code encoder has random weights: there is nothing to preserve, and frozen it would be
# a fixed random projection. It trains with the rest unless --vision-lr-scale says otherwise.
RANDOM_ENCODER_VISION_LR_SCALE = 1.0


def default_vision_lr_scale(arch: str, mode: str, pretrained_encoder: bool) -> float:
    """The encoder's LR scale when --vision-lr-scale is not given (mode: connector | full)."""
    if mode == "connector":
        return 0.0  # alignment: only the connector trains
    return STAGE_DEFAULTS[arch]["vision_lr_scale"] if pretrained_encoder else RANDOM_ENCODER_VISION_LR_SCALE
