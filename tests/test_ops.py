"""The pure layout ops: exact inverses, and the layouts the formats doc (§2.4) states, checked row by row."""

from __future__ import annotations

import pytest
import torch

from hubexport.mapping import ops


@pytest.mark.parametrize(("groups", "per_group", "head_dim"), [(2, 2, 4), (1, 4, 3), (4, 1, 2), (3, 7, 5)])
def test_qkv_split_follows_the_row_formula(groups: int, per_group: int, head_dim: int) -> None:
    hidden = 6
    rows = groups * (per_group + 2) * head_dim
    qkv = torch.arange(rows * hidden, dtype=torch.float64).reshape(rows, hidden)
    q, k, v = ops.qkv_to_hf(qkv, num_query_groups=groups, heads_per_group=per_group, head_dim=head_dim)
    block = (per_group + 2) * head_dim
    for r in range(rows):  # formats doc §2.4: g = r // B, o = r % B
        g, o = divmod(r, block)
        if o < per_group * head_dim:
            assert torch.equal(q[g * per_group * head_dim + o], qkv[r])
        elif o < (per_group + 1) * head_dim:
            assert torch.equal(k[g * head_dim + o - per_group * head_dim], qkv[r])
        else:
            assert torch.equal(v[g * head_dim + o - (per_group + 1) * head_dim], qkv[r])
    assert q.shape == (groups * per_group * head_dim, hidden) and k.shape == v.shape == (groups * head_dim, hidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_qkv_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    g, p, d, h = 2, 3, 4, 8
    w = torch.randn(g * (p + 2) * d, h).to(dtype)
    b = torch.randn(g * (p + 2) * d).to(dtype)
    for x in (w, b):
        parts = ops.qkv_to_hf(x, num_query_groups=g, heads_per_group=p, head_dim=d)
        (back,) = ops.qkv_to_mcore(*parts, num_query_groups=g)
        assert back.dtype == dtype and torch.equal(back.view(torch.uint8), x.view(torch.uint8))
    q, k, v = torch.randn(g * p * d, h), torch.randn(g * d, h), torch.randn(g * d, h)
    (qkv,) = ops.qkv_to_mcore(q, k, v, num_query_groups=g)
    q2, k2, v2 = ops.qkv_to_hf(qkv, num_query_groups=g, heads_per_group=p, head_dim=d)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)


def test_qkv_bias_layout() -> None:
    # two groups, one q head each, head_dim 1: [q0, k0, v0, q1, k1, v1]
    q, k, v = ops.qkv_to_hf(torch.tensor([10.0, 20, 30, 11, 21, 31]), num_query_groups=2, heads_per_group=1,
                            head_dim=1)
    assert q.tolist() == [10, 11] and k.tolist() == [20, 21] and v.tolist() == [30, 31]


def test_gate_up_round_trip_and_layout() -> None:
    fc1 = torch.randn(10, 3)
    gate, up = ops.gate_up_to_hf(fc1)
    assert torch.equal(gate, fc1[:5]) and torch.equal(up, fc1[5:])
    (back,) = ops.gate_up_to_mcore(gate, up)
    assert torch.equal(back, fc1)


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_experts_round_trip_and_layout(transposed: bool) -> None:
    """transformers 5 holds [E, out, in]; the published Qwen3-VL-MoE checkpoints [E, in, out]."""
    experts = [torch.randn(6, 4) for _ in range(3)]  # mcore [out, in] each
    (fused,) = ops.experts_to_hf(*experts, transposed=transposed)
    assert fused.shape == ((3, 4, 6) if transposed else (3, 6, 4))
    for e, w in enumerate(experts):
        assert torch.equal(fused[e].T if transposed else fused[e], w)
    back = ops.experts_to_mcore(fused, transposed=transposed)
    assert len(back) == 3 and all(torch.equal(a, b) for a, b in zip(back, experts, strict=True))
    (again,) = ops.experts_to_hf(*back, transposed=transposed)
    assert torch.equal(again, fused)


def test_vocab_trim_and_pad_are_inverse() -> None:
    w = torch.randn(100, 4)
    assert ops.padded_vocab_size(100, 128, 1) == 128 and ops.padded_vocab_size(100, 128, 2) == 256
    (padded,) = ops.pad_vocab(w, padded_size=128)
    assert padded.shape == (128, 4) and not padded[100:].any()
    (trimmed,) = ops.trim_vocab(padded, vocab_size=100)
    assert torch.equal(trimmed, w)
    (again,) = ops.pad_vocab(trimmed, padded_size=128)
    assert torch.equal(again, padded)
    with pytest.raises(ValueError):
        ops.trim_vocab(w, vocab_size=101)


@pytest.mark.parametrize(("heads", "head_dim"), [(2, 4), (1, 3), (16, 2)])
def test_fused_vision_qkv_follows_the_head_formula_and_inverts(heads: int, head_dim: int) -> None:
    """mbridge's Qwen-VL vision layout: mcore row block h holds [q_h; k_h; v_h]; HF's fused qkv is [q; k; v]."""
    hidden = 5
    rows = 3 * heads * head_dim
    qkv = torch.arange(rows * hidden, dtype=torch.float64).reshape(rows, hidden)
    (hf,) = ops.fused_qkv_to_hf(qkv, num_heads=heads)
    for r in range(rows):
        h, o = divmod(r, 3 * head_dim)
        part, i = divmod(o, head_dim)  # 0 q, 1 k, 2 v
        assert torch.equal(hf[part * heads * head_dim + h * head_dim + i], qkv[r])
    for x in (qkv, torch.randn(rows).to(torch.bfloat16)):
        (h_,) = ops.fused_qkv_to_hf(x, num_heads=heads)
        (back,) = ops.fused_qkv_to_mcore(h_, num_heads=heads)
        assert back.dtype == x.dtype and torch.equal(back, x)
