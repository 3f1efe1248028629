"""Pure, invertible tensor ops between megatron-core and Hugging Face layouts (formats doc §2.3, §2.4).

No I/O, no config objects: plain tensors and integers. Every `to_hf` op has an exact `to_mcore` inverse; both only
view, slice and concatenate, so a round trip is bit-exact.
"""

from __future__ import annotations

import torch

TensorTuple = tuple[torch.Tensor, ...]


def identity(*xs: torch.Tensor) -> TensorTuple:
    return xs


def qkv_to_hf(qkv: torch.Tensor, *, num_query_groups: int, heads_per_group: int, head_dim: int) -> TensorTuple:
    """mcore stores q, k, v interleaved per query group: [g0: q×p, k, v | g1: ...]; HF keeps them apart.
    Works on weights [rows, H] and biases [rows]."""
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_query_groups, (heads_per_group + 2) * head_dim, *rest)
    qd = heads_per_group * head_dim
    q, k, v = grouped.split([qd, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_query_groups: int) -> TensorTuple:
    rest = q.shape[1:]
    g = num_query_groups
    stacked = torch.cat([q.reshape(g, -1, *rest), k.reshape(g, -1, *rest), v.reshape(g, -1, *rest)], dim=1)
    return (stacked.reshape(-1, *rest),)


def fused_qkv_to_hf(qkv: torch.Tensor, *, num_heads: int) -> TensorTuple:
    """Vision towers without GQA (Qwen2.5-VL, Qwen3-VL): mcore interleaves per head [h0: q, k, v | h1: ...], HF keeps
    one fused `attn.qkv` tensor [q (all heads); k; v]. Weights [3·heads·d, H] and biases alike."""
    q, k, v = qkv_to_hf(qkv, num_query_groups=num_heads, heads_per_group=1, head_dim=qkv.shape[0] // (3 * num_heads))
    return (torch.cat([q, k, v], dim=0),)


def fused_qkv_to_mcore(qkv: torch.Tensor, *, num_heads: int) -> TensorTuple:
    return qkv_to_mcore(*qkv.chunk(3, dim=0), num_query_groups=num_heads)


def gate_up_to_hf(fc1: torch.Tensor) -> TensorTuple:
    """A global (dist_ckpt) SwiGLU fc1 is [gate; up] along dim 0."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def gate_up_to_mcore(gate: torch.Tensor, up: torch.Tensor) -> TensorTuple:
    return (torch.cat([gate, up], dim=0),)


def experts_to_hf(*experts: torch.Tensor, transposed: bool = False) -> TensorTuple:
    """A layer's E expert weights [out, in] as one fused tensor: transformers 5 holds [E, out, in] (what
    save_pretrained writes for Qwen3-VL-MoE); published Qwen3-VL-MoE checkpoints hold [E, in, out] (`transposed`).
    mcore's fc1 [gate; up] is the fused gate_up_proj's row order, so fc1 and fc2 need nothing else."""
    fused = torch.stack(experts)
    return (fused.transpose(1, 2) if transposed else fused,)


def experts_to_mcore(fused: torch.Tensor, *, transposed: bool = False) -> TensorTuple:
    return tuple((fused.transpose(1, 2) if transposed else fused).unbind(0))


def trim_vocab(w: torch.Tensor, *, vocab_size: int) -> TensorTuple:
    """megatron pads the vocabulary (make_vocab_size_divisible_by × TP); HF has exactly vocab_size rows."""
    if w.shape[0] < vocab_size:
        raise ValueError(f"{w.shape[0]} rows is fewer than vocab_size {vocab_size}")
    return (w[:vocab_size],)


def pad_vocab(w: torch.Tensor, *, padded_size: int) -> TensorTuple:
    """Inverse of trim_vocab: zero rows up to padded_size (what megatron's initialisation leaves unused)."""
    if w.shape[0] > padded_size:
        raise ValueError(f"{w.shape[0]} rows is more than the padded vocabulary {padded_size}")
    out = w.new_zeros((padded_size, *w.shape[1:]))  # new_zeros: same device, so shapes can be planned on meta
    out[: w.shape[0]] = w
    return (out,)


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """megatron's `_vocab_size_with_padding`."""
    m = divisible_by * tp
    return -(-vocab_size // m) * m


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits (NaN equals the same NaN, -0.0 differs from 0.0): what a copy of a tensor is, and
    what the fast merge path compares without torch."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
