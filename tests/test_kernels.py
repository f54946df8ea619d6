"""The project's kernels (models/rope.py, cpu/swiglu.py, the decoder's packed GEMM in cpu/kernels.py)
against plain loops and products written here.

Model-level agreement is tested elsewhere: the local SDPA spec (RopeSelfAttention + SwiGLU) against
megatron-core's DotProductAttention + RoPE (tests/test_attention.py), against transformers
(tests/test_convert.py), packed against unpacked (tests/test_packing.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_qrm.models import rope
from megatron_qrm.cpu.swiglu import swiglu


def _table(seq: int, rot: int, base: float = 10000.0) -> torch.Tensor:
    """megatron-core's non-interleaved table: [seq, 1, 1, rot], both halves the same angles."""
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    f = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    return torch.cat((f, f), dim=-1)[:, None, None, :]


def _rope_loop(x: torch.Tensor, positions: list[list[int]], rot: int, base: float = 10000.0) -> torch.Tensor:
    """x [s, b, h, d]: channel i < rot/2 is paired with i + rot/2 and the pair rotated by position * theta_i."""
    out = x.clone()
    s, b, h, d = x.shape
    half = rot // 2
    for t in range(s):
        for j in range(b):
            p = positions[t][j]
            for i in range(half):
                a = p / base ** (2 * i / rot)
                c, sn = math.cos(a), math.sin(a)
                x1, x2 = x[t, j, :, i], x[t, j, :, i + half]
                out[t, j, :, i] = x1 * c - x2 * sn
                out[t, j, :, i + half] = x2 * c + x1 * sn
    return out


@pytest.mark.parametrize("rot", [8, 6])  # all channels, and a pass-through tail (rotary percent < 1)
@pytest.mark.parametrize("heads_first", [False, True])
def test_rope_matches_plain_loop_values_and_gradients(rot, heads_first):
    torch.manual_seed(0)
    s, b, h, d = 5, 2, 3, 8
    base = torch.randn(s, b, 2 * h, d, dtype=torch.float64)
    x = base[:, :, ::2].requires_grad_(False).clone().requires_grad_(True)  # strided input like a QKV split
    x_view = base[:, :, ::2]
    cos, sin = rope.half_cos_sin(_table(s, rot), torch.float64)
    got = rope.apply_rope(x_view, cos, sin, heads_first=heads_first)
    want = _rope_loop(x_view, [[t] * b for t in range(s)], rot)
    assert torch.allclose(got, want, atol=1e-12)
    if heads_first:
        assert got.permute(1, 2, 0, 3).is_contiguous()
    else:
        assert got.is_contiguous()
    # gradient: the loop is differentiable by autograd (independent of the hand-written backward)
    g = torch.randn(s, b, h, d, dtype=torch.float64)
    (ours,) = torch.autograd.grad(rope.apply_rope(x, cos, sin, heads_first), x, g)
    x2 = x.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(_rope_loop(x2, [[t] * b for t in range(s)], rot), x2, g)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_rope_table_is_cached_per_dtype():
    freqs = _table(4, 8)
    a = rope.half_cos_sin(freqs, torch.float64)
    assert rope.half_cos_sin(freqs, torch.float64)[0] is a[0]
    assert rope.half_cos_sin(freqs, torch.float32)[0].dtype == torch.float32


def test_packed_positions_restart_at_every_sequence():
    lengths = [3, 1, 5, 2]
    cu = torch.tensor([0, 3, 4, 9, 11], dtype=torch.int32)
    want = [j for n in lengths for j in range(n)]
    assert rope.packed_positions(cu, 11).tolist() == want


def test_packed_rope_equals_each_sequence_rotated_alone():
    torch.manual_seed(1)
    lengths = [4, 2, 6]
    total, rot = sum(lengths), 8
    cu = torch.tensor([0, 4, 6, 12], dtype=torch.int32)
    x = torch.randn(total, 1, 2, 8, dtype=torch.float64)
    freqs = _table(max(lengths), rot)  # megatron-core passes the longest sequence's table

    class Holder:  # stands for the micro-batch's PackedSeqParams (the cache lives on it)
        pass

    holder = Holder()
    cos, sin = rope.packed_cos_sin(freqs, cu, holder, torch.float64)
    assert rope.packed_cos_sin(freqs, cu, holder, torch.float64)[0] is cos  # computed once per micro-batch
    got = rope.apply_rope(x, cos, sin)
    positions = [[j] for n in lengths for j in range(n)]
    assert torch.allclose(got, _rope_loop(x, positions, rot), atol=1e-12)
    # a table with one row per packed token is used as it is (megatron-core's exact-mapping case)
    cos_t, _ = rope.packed_cos_sin(_table(total, rot), cu, holder, torch.float64)
    assert torch.equal(cos_t, rope.half_cos_sin(_table(total, rot), torch.float64)[0])


def test_rope_supported_says_why_not():
    class Cfg:
        rotary_interleaved = False
        multi_latent_attention = False
        rope_type = "rope"
        mrope_section = None
        apply_rope_fusion = False

    assert rope.supported(Cfg()) is None
    assert "context" in rope.supported(Cfg(), cp_size=2)
    cfg = Cfg()
    cfg.rotary_interleaved = True
    assert "interleaved" in rope.supported(cfg)


def test_swiglu_matches_plain_formula_values_and_gradients():
    torch.manual_seed(2)
    x = torch.randn(3, 2, 10, dtype=torch.float64, requires_grad=True)
    f = 5
    a, b = x[..., :f], x[..., f:]
    want = a * torch.sigmoid(a) * b  # silu(a) * b, written out
    got = swiglu(x)
    assert torch.allclose(got, want, atol=1e-12)
    g = torch.randn_like(want)
    (ours,) = torch.autograd.grad(got, x, g)
    (ref,) = torch.autograd.grad(want, x, g)
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.autograd.gradcheck(swiglu, (x,))
    with torch.no_grad():
        assert torch.allclose(swiglu(x), want, atol=1e-12)


# ----------------------------------------------------------------------------- packed GEMM for decode steps
@pytest.mark.parametrize("rows", [1, 4, 17, 32, 64, 200])
def test_cpu_packed_linear_equals_a_plain_product(rows):
    """The decoder's small-batch products: MKL's pre-packed GEMM in its row range, F.linear outside it; either
    way the product of x and the weight (checked against a float64 matmul), with bias, for 2-D and 3-D x."""
    from megatron_qrm.cpu.kernels import PACKED_GEMM_ROWS, CpuPackedLinear

    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 48, generator=g), torch.randn(96, generator=g)
    linear = CpuPackedLinear()
    for x in (torch.randn(rows, 48, generator=g), torch.randn(1, rows, 48, generator=g)):
        want = (x.double() @ w.double().T + b.double()).float()
        torch.testing.assert_close(linear(x, w, b), want, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(linear(x, w), want - b, atol=1e-4, rtol=1e-5)
    in_range = PACKED_GEMM_ROWS[0] <= rows <= PACKED_GEMM_ROWS[1]
    assert bool(linear._packed) == (in_range and linear.enabled)  # packed once, only where it pays
    if linear.enabled and in_range:
        assert len(linear._packed) == 1
        # another weight is packed on its own (a decoder's weights do not change during its generate call)
        assert linear(torch.randn(rows, 48), torch.ones(96, 48)).shape == (rows, 96)
        assert len(linear._packed) == 2


def test_cpu_packed_linear_leaves_other_dtypes_to_f_linear():
    from megatron_qrm.cpu.kernels import CpuPackedLinear

    linear = CpuPackedLinear()
    x, w = torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w))
    assert not linear._packed
    assert not CpuPackedLinear(enabled=False).enabled
