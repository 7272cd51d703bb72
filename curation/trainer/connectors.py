"""Connectors: how visual features reach the language model.

Two families:
* token insertion (llava, omnifusion): visual tokens replace the `<image>` placeholder
  positions in the LM's input sequence;
* attention (evlm, owl3): the sequence keeps one placeholder per image and chosen LM
  layers attend to the visual tokens through extra blocks, which live here too, so that
  "the connector" is exactly what stage 1 (alignment) trains for every architecture.

Every connector maps encoder features of the views of a batch to one [tokens, D_lm]
tensor per image, and runs each LM decoder layer (`run_layer`), by default unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb, repeat_kv, rotate_half

from .config import ModelConfig
from .lm import PackedAttention, attend_packed
from .vision import feature_block
from .views import anyres_features, frame_feature_side, num_views


@dataclass
class VisualMemory:
    """Visual tokens that text in each packed row may attend to (evlm, owl3)."""
    tokens: torch.Tensor  # [R, K, D]: the row's images, one after another, zero padded
    allowed: torch.Tensor  # [R, L, K]: text position may see this visual token
    positions: torch.Tensor  # [R, K]: position id of each token's image placeholder (for MI-Rope)

    @property
    def sees_any(self) -> torch.Tensor:  # [R, L, 1]: the token has at least one image before it
        return self.allowed.any(-1, keepdim=True)


@dataclass
class LayerInputs:
    attention: PackedAttention  # who attends to whom in the packed rows (lm.py)
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin for the text positions
    position_ids: torch.Tensor
    rotary: Callable  # (x, position_ids) -> cos, sin: the LM's rotary embedding
    memory: VisualMemory | None


class Connector(nn.Module):
    inserts_tokens = True  # visual tokens go into the sequence

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.feature_blocks = self.blocks_read(cfg)

    @staticmethod
    def blocks_read(cfg: ModelConfig) -> list[int]:
        """Encoder blocks whose outputs (not normalised) the connector reads: LLaVA's
        vision_feature_layer."""
        return [feature_block(cfg.vision_feature_layer, cfg.vision_depth)]

    def run_layer(self, index: int, layer: nn.Module, hidden: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        return layer(hidden, attention_mask=inp.attention, position_ids=inp.position_ids, position_embeddings=inp.rope)


class LlavaConnector(Connector):
    """2-layer GELU MLP; AnyRes-Max arrangement of tile features with a learned newline."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.cfg = cfg
        self.mlp = nn.Sequential(nn.Linear(cfg.vision_dim, cfg.lm_hidden), nn.GELU(),
                                 nn.Linear(cfg.lm_hidden, cfg.lm_hidden))
        self.image_newline = nn.Parameter(torch.randn(cfg.lm_hidden) * cfg.lm_hidden ** -0.5)

    def forward(self, features: list[torch.Tensor], layouts: list[tuple]) -> list[torch.Tensor]:
        projected = self.mlp(features[-1])  # [V, unit*unit, D]
        out, v = [], 0
        for layout in layouts:
            n = num_views(layout)
            views = projected[v:v + n]
            v += n
            if layout[0] == "anyres":
                out.append(torch.cat([views[0], self._tile_grid(views[1:], layout)]))
            elif layout[0] == "frame":
                side = frame_feature_side(self.cfg)
                out.append(self._resize(self._as_grid(views[0]), side, side).flatten(0, 1))
            else:
                out.append(views[0])
        return out

    def _as_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.view(self.cfg.unit, self.cfg.unit, -1)

    @staticmethod
    def _resize(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if grid.shape[:2] == (h, w):
            return grid
        resized = F.interpolate(grid.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False)
        return resized[0].permute(1, 2, 0)

    def _tile_grid(self, tiles: torch.Tensor, layout: tuple) -> torch.Tensor:
        u, d, cols, rows = self.cfg.unit, tiles.shape[-1], layout[1], layout[2]
        grid = tiles.view(rows, cols, u, u, d).permute(0, 2, 1, 3, 4).reshape(rows * u, cols * u, d)
        (top, left, kept_h, kept_w), (h, w) = anyres_features(self.cfg, layout)
        grid = grid[top:top + kept_h, left:left + kept_w]  # unpad: drop rows/columns of padding only
        grid = self._resize(grid, h, w)  # AnyRes-Max: bilinear downsampling above the token budget
        newline = self.image_newline.to(grid.dtype).expand(h, 1, d)
        return torch.cat([grid, newline], dim=1).flatten(0, 1)


class OmniFusionConnector(Connector):
    """One transformer encoder layer then a linear map to the LM width, framed by learned
    image start/end embeddings; whole-image or tiled views."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.adapter = nn.TransformerEncoderLayer(cfg.vision_dim, adapter_heads(cfg.vision_dim, cfg.vision_heads),
                                                  4 * cfg.vision_dim, dropout=0.0, activation="gelu", batch_first=True,
                                                  norm_first=True)
        self.to_lm = nn.Linear(cfg.vision_dim, cfg.lm_hidden)
        self.image_start = nn.Parameter(torch.randn(cfg.lm_hidden) * cfg.lm_hidden ** -0.5)
        self.image_end = nn.Parameter(torch.randn(cfg.lm_hidden) * cfg.lm_hidden ** -0.5)

    def forward(self, features: list[torch.Tensor], layouts: list[tuple]) -> list[torch.Tensor]:
        mapped = self.to_lm(self.adapter(features[-1]))
        out, v = [], 0
        for layout in layouts:
            n = num_views(layout)
            body = mapped[v:v + n].flatten(0, 1)
            v += n
            out.append(torch.cat([self.image_start[None].to(body.dtype), body, self.image_end[None].to(body.dtype)]))
        return out


def adapter_heads(dim: int, wanted: int) -> int:
    """The encoder's head count (synced from a loaded encoder), or the nearest count below
    it that divides the width, so any encoder width builds."""
    return next(h for h in range(max(1, min(wanted, dim)), 0, -1) if dim % h == 0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """q [R, H, L, hd], k/v [R, H, K, hd], allowed [R, L, K] -> [R, H, L, hd]. A query
    that may see nothing attends everywhere instead (softmax over nothing is NaN); callers
    zero those rows out."""
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])


class GatedCrossAttention(nn.Module):
    """EVLM/Flamingo block before an LM layer:
    x = x + tanh(a) * xattn(x, visual);  x = x + tanh(b) * ffn(x);  a = b = 0 at init."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.ffn_norm = Qwen2RMSNorm(dim), Qwen2RMSNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: VisualMemory) -> torch.Tensor:
        h = self.attn_norm(x)
        ctx = attend(self._heads(self.q(h)), self._heads(self.k(memory.tokens)), self._heads(self.v(memory.tokens)),
                     memory.allowed)
        ctx = self.o(ctx.transpose(1, 2).flatten(2)) * memory.sees_any  # text before any image attends to nothing
        x = x + torch.tanh(self.attn_gate) * ctx
        return x + torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(x))


class EvlmConnector(Connector):
    """Features from several encoder layers, summarised by learned visual query tokens,
    read by gated cross-attention blocks placed before chosen LM layers."""

    inserts_tokens = False

    @staticmethod
    def blocks_read(cfg: ModelConfig) -> list[int]:
        return list(cfg.evlm_feature_layers)  # hierarchical: resolved from the encoder's depth (config.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        d = cfg.lm_hidden
        self.merge = nn.Linear(cfg.vision_dim * len(self.feature_blocks), d)  # hierarchical features, concatenated
        self.queries = nn.Parameter(torch.randn(cfg.evlm_queries, d) * d ** -0.5)
        self.query_norm, self.feature_norm, self.out_norm = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.resampler = nn.MultiheadAttention(d, cfg.lm_heads, batch_first=True)
        self.resampler_ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.blocks = nn.ModuleDict({str(i): GatedCrossAttention(d, cfg.lm_heads) for i in cfg.cross_layers})

    def forward(self, features: list[torch.Tensor], layouts: list[tuple]) -> list[torch.Tensor]:
        feats = self.feature_norm(self.merge(torch.cat(features, dim=-1)))  # [V, T, D]
        q = self.query_norm(self.queries).expand(feats.shape[0], -1, -1)
        tokens = q + self.resampler(q, feats, feats, need_weights=False)[0]
        tokens = self.out_norm(tokens + self.resampler_ffn(tokens))
        return list(tokens)  # one view per image in this family

    def run_layer(self, index, layer, hidden, inp):
        if inp.memory is not None and str(index) in self.blocks:
            hidden = self.blocks[str(index)](hidden, inp.memory)
        return super().run_layer(index, layer, hidden, inp)


class HyperAttention(nn.Module):
    """mPLUG-Owl3 hyper-attention's own weights for one LM layer: visual key/value
    projections (initialised from the layer's own) and a per-head sigmoid gate."""

    def __init__(self, layer: nn.Module, dim: int, heads: int):
        super().__init__()
        attn = layer.self_attn
        self.k = nn.Linear(dim, attn.k_proj.out_features, bias=True)
        self.v = nn.Linear(dim, attn.v_proj.out_features, bias=True)
        with torch.no_grad():  # start from the text projections so a pretrained LM reads images sensibly
            for mine, theirs in ((self.k, attn.k_proj), (self.v, attn.v_proj)):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
        self.gate = nn.Linear(dim, heads)


class Owl3Connector(Connector):
    """Linear projection of patch tokens; hyper-attention inside chosen LM layers."""

    inserts_tokens = False

    def __init__(self, cfg: ModelConfig, lm_layers: nn.ModuleList):
        super().__init__(cfg)
        self.project = nn.Linear(cfg.vision_dim, cfg.lm_hidden)
        self.hyper = nn.ModuleDict({str(i): HyperAttention(lm_layers[i], cfg.lm_hidden, cfg.lm_heads)
                                    for i in cfg.cross_layers})

    def forward(self, features: list[torch.Tensor], layouts: list[tuple]) -> list[torch.Tensor]:
        return list(self.project(features[-1]))

    def run_layer(self, index, layer, hidden, inp):
        if inp.memory is None or str(index) not in self.hyper:
            return super().run_layer(index, layer, hidden, inp)
        hyper, attn, memory = self.hyper[str(index)], layer.self_attn, inp.memory
        heads_of = lambda x: x.view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)  # noqa: E731

        residual = hidden
        h = layer.input_layernorm(hidden)
        q, k, v = heads_of(attn.q_proj(h)), heads_of(attn.k_proj(h)), heads_of(attn.v_proj(h))
        cos, sin = inp.rope
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        text_ctx = attend_packed(q, k, v, inp.attention, attn.scaling)
        groups = attn.num_key_value_groups

        # visual branch: same input norm and the same text queries; own keys/values
        vis = layer.input_layernorm(memory.tokens)
        vk, vv = heads_of(hyper.k(vis)), heads_of(hyper.v(vis))
        vcos, vsin = inp.rotary(vis, memory.positions)
        # MI-Rope: each image's keys are rotated to the position of its placeholder
        vk = vk * vcos.unsqueeze(1) + rotate_half(vk) * vsin.unsqueeze(1)
        vis_ctx = attend(q, repeat_kv(vk, groups), repeat_kv(vv, groups), memory.allowed)

        gate = torch.sigmoid(hyper.gate(h)).transpose(1, 2)[..., None]  # [R, H, L, 1]
        gate = gate * memory.sees_any[:, None].to(gate.dtype)  # no image before the token: text only
        mixed = text_ctx * (1 - gate) + vis_ctx * gate
        hidden = residual + attn.o_proj(mixed.transpose(1, 2).flatten(2))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def build_connector(cfg: ModelConfig, lm) -> Connector:
    if cfg.arch == "llava":
        return LlavaConnector(cfg)
    if cfg.arch == "omnifusion":
        return OmniFusionConnector(cfg)
    if cfg.arch == "evlm":
        return EvlmConnector(cfg)
    return Owl3Connector(cfg, lm.model.layers)
