"""The language model: a transformers Qwen2ForCausalLM (built from a config for tiny and
small sizes, loaded by hub id or path otherwise). The VLM runs its decoder layers one by
one (model.py) so that connectors can add blocks between or inside them, and so that a
packed row gets a block-diagonal causal mask.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from .config import ModelConfig


def build_lm(cfg: ModelConfig, vocab_size: int) -> Qwen2ForCausalLM:
    if cfg.lm_id:
        lm = Qwen2ForCausalLM.from_pretrained(cfg.lm_id, attn_implementation="sdpa", dtype=torch.float32)
        if lm.get_input_embeddings().num_embeddings < vocab_size:
            lm.resize_token_embeddings(vocab_size)  # room for <image>
        c = lm.config
        cfg.lm_hidden, cfg.lm_layers, cfg.lm_heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
        cfg.lm_kv_heads, cfg.lm_ffn = c.num_key_value_heads, c.intermediate_size
    else:
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=cfg.lm_hidden, intermediate_size=cfg.lm_ffn,
                             num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads,
                             num_key_value_heads=cfg.lm_kv_heads, max_position_embeddings=8192,
                             tie_word_embeddings=True, use_cache=False)
        config._attn_implementation = "sdpa"
        lm = Qwen2ForCausalLM(config)
    cfg.vocab_size = vocab_size
    return lm


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[R, 1, L, L] boolean (True = may attend): a token sees earlier tokens of its own
    sample only, so samples packed into one row never attend to each other. Padding
    (segment 0) sees only itself, which keeps softmax finite. Boolean rather than additive,
    so it works unchanged under bf16 autocast."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = same & causal & (segment_ids[:, :, None] > 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return allowed[:, None]
