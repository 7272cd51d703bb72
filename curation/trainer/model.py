"""The VLM: vision encoder -> connector -> causal LM, over packed batches (see data.py for
the batch layout).

Two engine settings, attributes rather than config (they change speed and memory, never the
result, so a checkpoint does not carry them): `attention`, the packed-attention backend
(lm.py: auto | flex | documents | dense), and `activation_checkpointing`, which recomputes
each decoder layer (with the connector's blocks around it) in the backward pass instead of
keeping its activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, resolve_layers
from .connectors import LayerInputs, VisualMemory, build_connector
from .lm import build_lm, packed_attention
from .vision import VisionEncoder


@dataclass
class Output:
    loss: torch.Tensor  # mean over labelled (answer) tokens
    logits: torch.Tensor  # [R, L, vocab]
    token_loss: torch.Tensor  # [R, L]: loss of predicting the token at each position (0 where unlabelled)


class VLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, image_id: int):
        super().__init__()
        self.cfg = cfg
        self.image_id = image_id
        self.vision = VisionEncoder(cfg)
        self.lm = build_lm(cfg, vocab_size)
        resolve_layers(cfg)  # layer lists from the depths just built (a loaded model's, not the preset's)
        self.connector = build_connector(cfg, self.lm)
        self.attention = "auto"
        self.activation_checkpointing = False

    def encode_images(self, pixels: torch.Tensor, layouts: list[tuple]) -> list[torch.Tensor]:
        if not layouts:
            return []
        features = self.vision(pixels, self.connector.feature_blocks)
        return self.connector(features, layouts)

    def forward(self, batch: dict) -> Output:
        input_ids, position_ids, segment_ids = batch["input_ids"], batch["position_ids"], batch["segment_ids"]
        embeds = self.lm.get_input_embeddings()(input_ids)
        visual = self.encode_images(batch["pixels"], batch["layouts"])
        slots = input_ids == self.image_id
        memory = None
        if visual and self.connector.inserts_tokens:
            flat = torch.cat(visual).to(embeds.dtype)
            if flat.shape[0] != int(slots.sum()):
                raise ValueError(f"{int(slots.sum())} image positions but {flat.shape[0]} visual tokens")
            embeds = embeds.masked_scatter(slots[..., None], flat)
        elif visual:
            memory = visual_memory(torch.stack(visual).to(embeds.dtype), slots, position_ids, segment_ids)

        rope = self.lm.model.rotary_emb(embeds, position_ids)
        inputs = LayerInputs(packed_attention(segment_ids, self.attention), rope, position_ids,
                             self.lm.model.rotary_emb, memory)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        hidden = embeds
        for index, layer in enumerate(self.lm.model.layers):
            if recompute:  # non-reentrant: keyword inputs and frozen layers are fine
                hidden = checkpoint(self.connector.run_layer, index, layer, hidden, inputs, use_reentrant=False)
            else:
                hidden = self.connector.run_layer(index, layer, hidden, inputs)
        logits = self.lm.lm_head(self.lm.model.norm(hidden)).float()
        return _loss(logits, batch["labels"])


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> Output:
    """Next-token loss where labels are set (answer tokens); -100 elsewhere."""
    targets = labels[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    token_loss = F.pad(per_token, (1, 0))
    count = (targets != -100).sum()
    return Output(per_token.sum() / count.clamp(min=1), logits, token_loss)


def visual_memory(tokens: torch.Tensor, slots: torch.Tensor, position_ids: torch.Tensor,
                  segment_ids: torch.Tensor) -> VisualMemory:
    """Arrange per-image tokens [M, T, D] (images in placeholder order, row by row) into
    per-row memories, and decide who sees what: a text token sees the images whose
    placeholder precedes it (or is it) within its own packed sample."""
    rows, cols = slots.nonzero(as_tuple=True)  # row-major: the images' order
    n_rows, length = slots.shape
    per_row = torch.bincount(rows, minlength=n_rows)
    slot_in_row = torch.arange(len(rows), device=rows.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
    m_max, t, d = int(per_row.max()), tokens.shape[1], tokens.shape[2]

    grid = tokens.new_zeros(n_rows, m_max, t, d)
    grid[rows, slot_in_row] = tokens
    place = torch.full((n_rows, m_max), length, dtype=torch.long, device=slots.device)  # past the end: unseen
    place[rows, slot_in_row] = cols
    valid = place < length
    safe_place = place.clamp(max=length - 1)
    image_segment = segment_ids.gather(1, safe_place)
    text_pos = torch.arange(length, device=slots.device)
    allowed = (valid[:, None, :] & (place[:, None, :] <= text_pos[None, :, None])
               & (image_segment[:, None, :] == segment_ids[:, :, None]))  # [R, L, M]
    positions = position_ids.gather(1, safe_place)
    return VisualMemory(tokens=grid.flatten(1, 2), allowed=allowed.repeat_interleave(t, dim=2),
                        positions=positions.repeat_interleave(t, dim=1))
