"""The vision encoder: a ViT from timm (built from code for tiny configs), open_clip, or a
transformers CLIP/SigLIP vision tower.

`vision_id` picks a real encoder: "timm:NAME" (e.g. timm:vit_so400m_patch14_siglip_384),
"open_clip:NAME[@PRETRAINED]" (e.g. open_clip:ViT-SO400M-14-SigLIP-384@webli),
"hf:ID_OR_PATH" (e.g. hf:google/siglip-so400m-patch14-384, a CLIP or SigLIP model or its
vision tower), or a local folder: an open_clip one (`open_clip_config.json`, what `curate
train-filter` writes, so the demo's own CLIP filter can be the encoder), a transformers
CLIP/SigLIP one (its config.json says so), otherwise a timm checkpoint folder. Every variant returns patch tokens (no
class token) of chosen blocks.

Which features: LLaVA reads "vision_feature_layer -2": the output of the second-to-last
block, without the encoder's final norm. `feature_block` turns that hidden-states index
(0 = embeddings, -1 = the last block) into a block index; `forward` returns block outputs,
never normalised, for every backend alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CurationError
from .config import ModelConfig

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HF_TYPES = {"clip", "clip_vision_model", "siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"}


def feature_block(layer: int, depth: int) -> int:
    """Block index for a hidden-states index as LLaVA counts them (depth + 1 states: the
    embeddings, then each block's output): -1 is the last block, -2 the one before."""
    index = layer + depth + 1 if layer < 0 else layer
    if not 1 <= index <= depth:
        raise CurationError(f"--vision-feature-layer {layer} is outside the encoder's blocks "
                            f"(1..{depth} or -{depth}..-1 for a {depth}-block encoder)")
    return index - 1


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mean, self.std = SIGLIP_MEAN, SIGLIP_STD
        self.drop_prefix = 0  # leading non-patch tokens in a hidden state (CLIP's class token)
        vision_id = cfg.vision_id
        if vision_id is None:
            from timm.models.vision_transformer import VisionTransformer

            # SigLIP-style: no class token, patch tokens only
            self.vit = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_dim,
                                         depth=cfg.vision_depth, num_heads=cfg.vision_heads, class_token=False,
                                         global_pool="avg", num_classes=0)
            self.backend = "timm"
        elif vision_id.startswith("open_clip:"):
            self._load_open_clip(vision_id.removeprefix("open_clip:"))
        elif (Path(vision_id) / "open_clip_config.json").is_file():
            self._load_open_clip(f"local-dir:{vision_id}")  # open_clip reads a local folder only by this prefix
        elif vision_id.startswith("hf:") or _is_hf_folder(vision_id):
            self._load_hf(vision_id.removeprefix("hf:"))
        elif not vision_id.startswith("timm:") and Path(vision_id).is_dir():
            self._load_timm(f"local-dir:{vision_id}")  # timm reads a local folder only by this prefix
        else:
            self._load_timm(vision_id.removeprefix("timm:"))
        self.depth = {"timm": lambda: len(self.vit.blocks), "open_clip": lambda: len(self.vit.transformer.resblocks),
                      "hf": lambda: self.vit.config.num_hidden_layers}[self.backend]()
        self._sync_config(cfg)

    def _load_timm(self, name: str) -> None:
        import timm

        self.vit = timm.create_model(name, pretrained=True, num_classes=0)
        self.backend = "timm"
        pcfg = getattr(self.vit, "pretrained_cfg", {}) or {}
        self.mean, self.std = tuple(pcfg.get("mean", SIGLIP_MEAN)), tuple(pcfg.get("std", SIGLIP_STD))

    def _load_open_clip(self, spec: str) -> None:
        import open_clip

        name, _, pretrained = spec.partition("@")
        self.vit = open_clip.create_model(name, pretrained=pretrained or None).visual
        self.backend = "open_clip"
        pcfg = getattr(self.vit, "preprocess_cfg", {}) or {}
        self.mean, self.std = tuple(pcfg.get("mean", SIGLIP_MEAN)), tuple(pcfg.get("std", SIGLIP_STD))

    def _load_hf(self, name: str) -> None:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(name, dtype=torch.float32)
        self.vit = getattr(model, "vision_model", model)  # a full CLIP/SigLIP: its vision tower only
        self.backend = "hf"
        clip = self.vit.config.model_type.startswith("clip")
        self.drop_prefix = 1 if clip else 0
        self.mean, self.std = (CLIP_MEAN, CLIP_STD) if clip else (SIGLIP_MEAN, SIGLIP_STD)
        try:  # the model's own preprocessing constants, when it ships them
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(name)
            self.mean, self.std = tuple(proc.image_mean), tuple(proc.image_std)
        except Exception:  # noqa: BLE001 - no preprocessor config: the family's constants above
            pass

    def _sync_config(self, cfg: ModelConfig) -> None:
        """A loaded encoder's geometry overrides the preset's."""
        if cfg.vision_id is None:
            return
        if self.backend == "timm":
            cfg.image_size, cfg.patch_size = self.vit.patch_embed.img_size[0], self.vit.patch_embed.patch_size[0]
            cfg.vision_dim = self.vit.embed_dim
            cfg.vision_heads = self.vit.blocks[0].attn.num_heads
        elif self.backend == "hf":
            c = self.vit.config
            cfg.image_size, cfg.patch_size = c.image_size, c.patch_size
            cfg.vision_dim, cfg.vision_heads = c.hidden_size, c.num_attention_heads
        else:
            size, patch = self.vit.image_size, self.vit.patch_size
            cfg.image_size = size[0] if isinstance(size, tuple) else size
            cfg.patch_size = patch[0] if isinstance(patch, tuple) else patch
            cfg.vision_dim = self.vit.transformer.width
            cfg.vision_heads = self.vit.transformer.resblocks[0].attn.num_heads
        cfg.vision_depth = self.depth

    def forward(self, pixels: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """Patch tokens [N, T, D] output by each requested block (0-based), without the
        encoder's final norm."""
        if self.backend == "hf":
            states = self.vit(pixel_values=pixels, output_hidden_states=True).hidden_states
            return [states[b + 1][:, self.drop_prefix:] for b in blocks]
        if self.backend == "timm":
            return self.vit.forward_intermediates(pixels, indices=list(blocks), output_fmt="NLC",
                                                  intermediates_only=True, norm=False)
        out = self.vit.forward_intermediates(pixels, indices=list(blocks), output_fmt="NLC", intermediates_only=True,
                                             normalize_intermediates=False)
        return out["image_intermediates"]


def _is_hf_folder(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in HF_TYPES
    except (OSError, ValueError):
        return False
