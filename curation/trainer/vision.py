"""The vision encoder: a ViT from timm (built from code for tiny configs) or open_clip.

`vision_id` picks a real encoder: "timm:NAME" (e.g. timm:vit_so400m_patch14_siglip_384),
"open_clip:NAME[@PRETRAINED]" (e.g. open_clip:ViT-SO400M-14-SigLIP-384@webli), or a
local path to a timm checkpoint folder. Every variant returns patch tokens (no class
token) from any chosen layers, which is all the connectors need.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mean, self.std = SIGLIP_MEAN, SIGLIP_STD
        if cfg.vision_id is None:
            from timm.models.vision_transformer import VisionTransformer

            # SigLIP-style: no class token, patch tokens only
            self.vit = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_dim,
                                         depth=cfg.vision_depth, num_heads=cfg.vision_heads, class_token=False,
                                         global_pool="avg", num_classes=0)
            self.backend = "timm"
        elif cfg.vision_id.startswith("open_clip:"):
            self._load_open_clip(cfg.vision_id.removeprefix("open_clip:"))
        else:
            self._load_timm(cfg.vision_id.removeprefix("timm:"))
        self.depth = len(self.vit.blocks) if self.backend == "timm" else len(self.vit.transformer.resblocks)
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

    def _sync_config(self, cfg: ModelConfig) -> None:
        """A loaded encoder's geometry overrides the preset's."""
        if cfg.vision_id is None:
            return
        if self.backend == "timm":
            cfg.image_size, cfg.patch_size = self.vit.patch_embed.img_size[0], self.vit.patch_embed.patch_size[0]
            cfg.vision_dim = self.vit.embed_dim
        else:
            size, patch = self.vit.image_size, self.vit.patch_size
            cfg.image_size = size[0] if isinstance(size, tuple) else size
            cfg.patch_size = patch[0] if isinstance(patch, tuple) else patch
            cfg.vision_dim = self.vit.transformer.width
        cfg.vision_depth = self.depth

    def forward(self, pixels: torch.Tensor, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Patch tokens [N, T, D] of each requested layer (default: the last, normalised)."""
        indices = layers if layers is not None else [self.depth - 1]
        if self.backend == "timm":
            return self.vit.forward_intermediates(pixels, indices=indices, output_fmt="NLC", intermediates_only=True,
                                                  norm=layers is None)
        out = self.vit.forward_intermediates(pixels, indices=indices, output_fmt="NLC", intermediates_only=True,
                                             normalize_intermediates=layers is None)
        return out["image_intermediates"]
