"""The language model: a transformers Qwen2ForCausalLM (built from a config for tiny and
small sizes, loaded by hub id or path otherwise). The VLM runs its decoder layers one by
one (model.py) so that connectors can add blocks between or inside them, and so that
packed rows attend within their own sample only.

Packed attention has three backends, all giving the same result (tests/test_trainer_engine.py):
* "flex": FlexAttention with a document mask (torch.nn.attention.flex_attention): a block
  mask of (L/128)^2 entries, never an L x L tensor; compiled, on CUDA only (its backward
  does not run on CPU in torch 2.13).
* "documents": each packed sample is gathered into its own row of a [documents, longest, ...]
  tensor and runs plain causal SDPA (is_causal, so flash/efficient kernels on GPU): the cost
  is sum-of-squares of sample lengths padded to the longest, never L x L.
* "dense": the boolean block-diagonal L x L mask (the reference the other two are tested against).
"auto" picks flex on CUDA (documents if FlexAttention is unavailable) and documents on CPU.
If FlexAttention fails to compile on the device (no Triton, say), it warns once and the run
goes on with the documents backend, which a flex PackedAttention carries too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..errors import CurationError
from .config import ModelConfig

ATTENTION_BACKENDS = ("auto", "flex", "documents", "dense")
PACKED_ATTENTION = "curation_packed"  # the LM's attention implementation name (registered below)


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
    # the decoder layers take a PackedAttention as their attention_mask; anything else goes to SDPA
    lm.config._attn_implementation = PACKED_ATTENTION
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


# ---------------------------------------------------------------- packed attention

@dataclass
class PackedAttention:
    """Who attends to whom in a packed batch, prepared once per batch for one backend."""
    backend: str  # flex | documents | dense
    segment_ids: torch.Tensor  # [R, L]: 1, 2, ... per sample in a row; 0 = padding
    dense_mask: torch.Tensor | None = None  # dense: [R, 1, L, L]
    block_mask: object = None  # flex: a BlockMask
    token_index: torch.Tensor | None = None  # documents: flat (row * L + col) index of each real token
    document: torch.Tensor | None = None  # documents: which sample each real token belongs to
    offset: torch.Tensor | None = None  # documents: its place within that sample
    documents: int = 0
    longest: int = 0


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise CurationError(f"--attention must be one of {', '.join(ATTENTION_BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "documents"
    return backend


def packed_attention(segment_ids: torch.Tensor, backend: str = "auto") -> PackedAttention:
    backend = resolve_backend(backend, segment_ids.device)
    if backend == "dense":
        return PackedAttention("dense", segment_ids, dense_mask=packed_causal_mask(segment_ids))
    att = _documents(segment_ids)
    if backend == "flex":
        att.backend, att.block_mask = "flex", _document_block_mask(segment_ids)
    return att


def _documents(segment_ids: torch.Tensor) -> PackedAttention:
    """Where each real token sits in a [documents, longest] layout of the packed samples."""
    rows, length = segment_ids.shape
    flat = segment_ids.flatten()
    token_index = (flat > 0).nonzero().squeeze(1)
    # a sample is a run of equal (row, segment) keys; segments are contiguous within a row
    keys = (token_index // length) * (int(segment_ids.max()) + 1) + flat[token_index]
    _, lengths = torch.unique_consecutive(keys, return_counts=True)
    document = torch.repeat_interleave(torch.arange(len(lengths), device=flat.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(len(token_index), device=flat.device) - starts[document]
    return PackedAttention("documents", segment_ids, token_index=token_index, document=document, offset=offset,
                           documents=len(lengths), longest=int(lengths.max()) if len(lengths) else 0)


def _document_block_mask(segment_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sample_causal(b, h, q, kv):  # the dense mask's rule, evaluated block by block
        return ((segment_ids[b, q] == segment_ids[b, kv]) & (q >= kv) & (segment_ids[b, q] > 0)) | (q == kv)

    rows, length = segment_ids.shape
    return create_block_mask(same_sample_causal, rows, None, length, length, device=segment_ids.device)


_compiled_flex = None
_flex_failed = False


def _flex(q, k, v, att: PackedAttention, scale):
    """Compiled on CUDA (eager FlexAttention materialises the scores); eager elsewhere."""
    global _compiled_flex, _flex_failed
    from torch.nn.attention.flex_attention import flex_attention

    if not q.is_cuda:
        return flex_attention(q, k, v, block_mask=att.block_mask, scale=scale, enable_gqa=True)
    if _flex_failed:
        return _attend_documents(q, k, v, att, scale)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    try:
        return _compiled_flex(q, k, v, block_mask=att.block_mask, scale=scale, enable_gqa=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a compiler failure: same result from the documents path
        _flex_failed = True
        warnings.warn(f"FlexAttention failed on {q.device} ({type(exc).__name__}: {str(exc)[:200]}); "
                      f"using --attention documents instead")
        return _attend_documents(q, k, v, att, scale)


def attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, att: PackedAttention,
                  scale: float | None = None) -> torch.Tensor:
    """Causal self-attention within each packed sample: q [R, H, L, d], k/v [R, Hkv, L, d]
    (grouped-query heads allowed) -> [R, H, L, d]. Padding positions attend to themselves."""
    if att.backend == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=att.dense_mask, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    if att.backend == "flex":
        return _flex(q, k, v, att, scale)
    return _attend_documents(q, k, v, att, scale)


def _attend_documents(q, k, v, att: PackedAttention, scale):
    rows, heads, length, dim = q.shape
    groups = heads // k.shape[1]

    def to_documents(x):  # [R, h, L, d] -> [documents, h, longest, d], zero padded at the end
        tokens = x.transpose(1, 2).flatten(0, 1)[att.token_index]  # [N, h, d]
        grid = x.new_zeros(att.documents, att.longest, x.shape[1], dim)
        return grid.index_put((att.document, att.offset), tokens).transpose(1, 2)

    # right padding is harmless under is_causal: a real query only sees keys before it
    out = F.scaled_dot_product_attention(to_documents(q), to_documents(k), to_documents(v), is_causal=True,
                                         scale=scale, enable_gqa=groups > 1)
    per_token = out.transpose(1, 2)[att.document, att.offset]  # [N, H, d]
    padding = v.repeat_interleave(groups, dim=1).transpose(1, 2).flatten(0, 1)  # what the dense mask gives padding
    merged = padding.index_put((att.token_index,), per_token)
    return merged.view(rows, length, heads, dim).transpose(1, 2)


def _lm_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: [R, L, H, d] out. A PackedAttention comes from the
    VLM; a plain mask (the bare LM called on its own) goes to transformers' SDPA."""
    if isinstance(attention_mask, PackedAttention):
        return attend_packed(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(PACKED_ATTENTION, _lm_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
