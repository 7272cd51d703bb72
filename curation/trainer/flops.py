"""Training FLOPs of a packed batch, for throughput in FLOP/s and MFU (bench/bench_trainer.py).

Model FLOPs, counted as PaLM's MFU counts them (Chowdhery et al. 2022, appendix B): matmul
work of one forward and one backward pass; recomputation (activation checkpointing) and
padding are not work done for the model, so they do not count.

* Weights: a weight matrix of N parameters applied to one token costs 2N forward. The
  backward costs 2N for the gradient of its input (needed when anything before it trains)
  and 2N for its own gradient (when it trains). Per token: 6N trainable (the familiar 6N),
  4N frozen but with a trainable part before it (the LM while only the connector trains),
  2N frozen with nothing trainable before it (a frozen encoder). The order is encoder ->
  connector -> LM. Only matmul weights count (linear, convolution, the LM head;
  embeddings are lookups, norms and biases are negligible).
* Tokens: the LM's weights act on every real token of the packed rows; the encoder's on
  every patch of every view (only the blocks up to the deepest one read); each
  connector's on what it transforms (per arch, `_connector_terms`).
* Attention: QK^T and AV cost 4 * d_attn per (query, key) pair forward, 3x that trained
  (or frozen on the gradient path), 1x in a frozen encoder. Pairs: causal within each
  packed sample for the LM (n(n+1)/2 for a sample of n tokens, never across samples), all
  pairs within a view for the encoder, text token x visible visual tokens for the evlm
  and owl3 cross-/hyper-attention layers.

`flops_per_token` = batch FLOPs / real LM tokens, so tokens/s x flops_per_token = FLOP/s.
"""

from __future__ import annotations

import torch
from torch import nn

from .views import num_views

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
# Checked in order: the PCIe/NVL variants of H100 before plain "H100" (SXM).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None when the name is not in the table (MFU omitted)."""
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def matmul_params(module: nn.Module) -> int:
    total = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += m.weight.numel()
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            total += m.in_proj_weight.numel()  # its out_proj is an nn.Linear, counted above
    return total


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _multiplier(trains: bool, grad_flows_in: bool) -> int:
    return 6 if trains else (4 if grad_flows_in else 2)


def batch_flops(model, batch: dict) -> float:
    """Training FLOPs of one forward + backward of `model` (a VLM) on `batch`."""
    parts = flops_breakdown(model, batch)
    return parts["weights"] + parts["attention"]


def flops_breakdown(model, batch: dict) -> dict[str, float]:
    """{"weights": ..., "attention": ...}: the two kinds of work counted above."""
    cfg = model.cfg
    segment_ids = batch["segment_ids"]
    text_tokens = int((segment_ids > 0).sum())
    views = sum(num_views(layout) for layout in batch["layouts"])
    patches = cfg.unit ** 2 + model.vision.drop_prefix

    vision_trains = _trains(model.vision)
    connector_trains = _trains(model.connector)
    lm_trains = _trains(model.lm)
    grad_into_connector = vision_trains
    grad_into_lm = vision_trains or connector_trains

    # encoder: blocks up to the deepest one the connector reads
    used = (max(model.connector.feature_blocks) + 1) / cfg.vision_depth
    vision_mult = _multiplier(vision_trains, False)
    weights = vision_mult * matmul_params(model.vision) * used * views * patches
    attention = (3 if vision_trains else 1) * 4 * cfg.vision_dim * patches ** 2 * views * cfg.vision_depth * used

    connector_weights, connector_attention = _connector_terms(
        model, batch, views, patches, _multiplier(connector_trains, grad_into_connector),
        3 if (connector_trains or grad_into_connector) else 1)
    weights += connector_weights
    attention += connector_attention

    weights += _multiplier(lm_trains, grad_into_lm) * matmul_params(model.lm) * text_tokens
    rows = torch.arange(segment_ids.shape[0], device=segment_ids.device)[:, None].expand_as(segment_ids)
    sample_keys = rows * (int(segment_ids.max()) + 1) + segment_ids
    lengths = torch.bincount(sample_keys[segment_ids > 0])
    lengths = lengths[lengths > 0].double()
    causal_pairs = float((lengths * (lengths + 1) / 2).sum())
    attn_width = cfg.lm_heads * (cfg.lm_hidden // cfg.lm_heads)
    attention += (3 if (lm_trains or grad_into_lm) else 1) * 4 * attn_width * causal_pairs * cfg.lm_layers
    return {"weights": float(weights), "attention": float(attention)}


def _connector_terms(model, batch: dict, views: int, patches: int, mult: int, attn_mult: int) -> tuple[float, float]:
    """The connector's own (weight, attention) FLOPs: its weights on the tokens each part transforms."""
    cfg, connector = model.cfg, model.connector
    visual_tokens = views * patches
    if cfg.arch == "llava":
        return mult * matmul_params(connector) * visual_tokens, 0.0
    if cfg.arch == "omnifusion":  # one transformer layer over each view's patches, then the map to the LM
        return (mult * matmul_params(connector) * visual_tokens,
                attn_mult * 4 * cfg.vision_dim * patches ** 2 * views)
    text_tokens = int((batch["segment_ids"] > 0).sum())
    pairs = _visible_visual_pairs(batch, model.image_id,
                                  cfg.evlm_queries if cfg.arch == "evlm" else patches)
    layers = len(cfg.cross_layers)
    if cfg.arch == "evlm":
        merged = mult * matmul_params(connector.merge) * visual_tokens
        resampler = (mult * (matmul_params(connector.resampler) + matmul_params(connector.resampler_ffn))
                     * cfg.evlm_queries * views)
        # each gated block: q, o and the FFN on every text token; k, v on the visual tokens
        per_block_kv = sum(matmul_params(m) for m in (connector.blocks[str(cfg.cross_layers[0])].k,
                                                      connector.blocks[str(cfg.cross_layers[0])].v))
        blocks = matmul_params(connector.blocks)
        return (merged + resampler + mult * (blocks - per_block_kv * layers) * text_tokens
                + mult * per_block_kv * layers * cfg.evlm_queries * views,
                attn_mult * 4 * cfg.lm_hidden * (cfg.evlm_queries * patches * views + pairs * layers))
    # owl3: the projection on every patch; per hyper layer, k, v on the visual tokens, the gate on text
    hyper = connector.hyper[str(cfg.cross_layers[0])]
    kv = matmul_params(hyper.k) + matmul_params(hyper.v)
    return (mult * matmul_params(connector.project) * visual_tokens
            + mult * layers * (kv * visual_tokens + matmul_params(hyper.gate) * text_tokens),
            attn_mult * 4 * cfg.lm_hidden * pairs * layers)


def _visible_visual_pairs(batch: dict, image_id: int, tokens_per_image: int) -> float:
    """Sum over text tokens of the visual tokens each may attend to: the images whose
    placeholder is at or before it in its own packed sample."""
    slots = (batch["input_ids"] == image_id).long()
    segment_ids = batch["segment_ids"]
    seen = torch.zeros_like(slots)
    for segment in segment_ids.unique():
        if segment == 0:
            continue
        inside = segment_ids == segment
        seen += torch.cumsum(slots * inside, dim=1) * inside
    return float(seen.sum()) * tokens_per_image


def flops_per_token(model, batch: dict) -> float:
    return batch_flops(model, batch) / max(1, int((batch["segment_ids"] > 0).sum()))
