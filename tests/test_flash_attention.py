"""
Tests for flash_attention.py, on CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported, so the kernels run with the fixed 16 x 16 blocks).

Everything is compared against softmax(Q K^T * scale + causal mask) V computed in float64.
Inputs are fresh random numbers on every run; each test draws its seed from os.urandom and puts
it in its assertion messages, so a failure can be replayed with torch.Generator().manual_seed.

bf16: the interpreter computes bf16 tl.dot wrongly (garbage), so under the interpreter
flash_attention.py widens bf16 matmul operands to fp32 (exactly what bf16 tensor cores compute).
The bf16 tests below therefore check everything bf16-specific (loads, the casts of P and dS to
bf16, bf16 stores) except the hardware bf16 matmul itself, which is exercised by gpu_check.py on GPU.
"""

import contextlib
import math
import os

import pytest
import torch

from safety import flash_attention as fa
from safety.flash_attention import flash_attention

# Relative-error bounds, ||x - ref|| / ||ref||, against the float64 reference.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def new_seed():
    return int.from_bytes(os.urandom(8), "little") & (2**63 - 1)


def randn(shape, gen, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def reference(q, k, v, sm_scale=None):
    """Causal attention in float64, the plain way: materialise the T x T scores and mask them."""
    q, k, v = q.double(), k.double(), v.double()
    T, D = q.shape[-2], q.shape[-1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-2, -1)) * sm_scale
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def rel_err(x, ref):
    """||x - ref|| / ||ref||; when the reference is exactly zero (dQ, dK at T=1: a softmax over one
    key has zero gradient) the absolute error ||x|| is returned instead."""
    err = (x.double() - ref).norm().item()
    denom = ref.norm().item()
    return err / denom if denom > 0 else err


@contextlib.contextmanager
def poisoned_allocations(monkeypatch):
    """Make torch.empty / torch.empty_like return NaN-filled float tensors, so any element of an
    output (or of the lse/delta scratch buffers) that a kernel fails to write shows up as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    calls = []

    def poison(t):
        calls.append(tuple(t.shape))
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
        m.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
        yield calls


def run_flash(q, k, v, do, sm_scale=None):
    """Output and input gradients of flash_attention for the upstream gradient do."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = flash_attention(q, k, v, sm_scale)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def run_reference(q, k, v, do, sm_scale=None):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    o = reference(q, k, v, sm_scale)
    o.backward(do.double())
    return o.detach(), q.grad, k.grad, v.grad


def check_against_reference(B, H, T, D, dtype, monkeypatch, sm_scale=None, q_scale=1.0, tol=None):
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    # q_scale > 1 makes the softmax peaky, so the running max really moves between blocks.
    q = randn((B, H, T, D), gen, dtype, q_scale)
    k = randn((B, H, T, D), gen, dtype)
    v = randn((B, H, T, D), gen, dtype)
    do = randn((B, H, T, D), gen, dtype)
    with poisoned_allocations(monkeypatch) as calls:
        got = run_flash(q, k, v, do, sm_scale)
    assert calls, "poisoning never applied: flash_attention no longer allocates with torch.empty*"
    want = run_reference(q, k, v, do, sm_scale)
    tol = TOL[dtype] if tol is None else tol
    where = f"(B,H,T,D)=({B},{H},{T},{D}) {dtype} sm_scale={sm_scale} q_scale={q_scale} seed={seed}"
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.dtype == dtype and x.shape == (B, H, T, D), f"{name}: {x.dtype} {tuple(x.shape)} {where}"
        assert torch.isfinite(x).all(), f"{name} has non-finite values (unwritten or NaN) {where}"
        err = rel_err(x, ref)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol} {where}"


# (B, H, T, D): T=1, T below one block, exactly one block, block + 1, ragged tails, and whole
# multiples of the 16-wide blocks; all four head dims; B*H <= 4.
SHAPES = [
    (1, 1, 1, 16),
    (2, 2, 7, 32),
    (2, 1, 16, 64),
    (1, 2, 17, 128),
    (1, 3, 37, 16),
    (2, 2, 80, 32),
    (1, 2, 50, 64),
    (1, 1, 64, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, monkeypatch):
    check_against_reference(*shape, dtype, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_custom_scale_and_peaky_softmax(dtype, monkeypatch):
    check_against_reference(1, 2, 45, 32, dtype, monkeypatch, sm_scale=0.3, q_scale=4.0)
    check_against_reference(1, 1, 33, 64, dtype, monkeypatch, q_scale=6.0)


# BLOCK_M != BLOCK_N: the diagonal is then several inner blocks, some fully masked for some rows.
@pytest.mark.parametrize("blocks", [(32, 16), (64, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("T", [1, 29, 80])
def test_unequal_blocks(blocks, T, monkeypatch):
    outer, inner = blocks
    monkeypatch.setattr(fa, "INTERPRET_BLOCKS", {
        "fwd": dict(BLOCK_M=outer, BLOCK_N=inner),
        "dkdv": dict(BLOCK_M=inner, BLOCK_N=outer),  # dK/dV: the key block is the outer one
        "dq": dict(BLOCK_M=outer, BLOCK_N=inner),
    })
    check_against_reference(1, 2, T, 32, torch.float32, monkeypatch)


def test_strided_inputs_and_grad(monkeypatch):
    # The usual GPT layout: one (B, T, 3C) projection split into q, k, v and viewed as
    # (B, T, H, D) -> (B, H, T, D). No copy is needed (shared strides); also try a mix of layouts
    # (forces a copy) and upstream gradients that are not contiguous.
    B, T, H, D = 2, 21, 2, 32
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    qkv = randn((B, T, 3 * H * D), gen, torch.float32)
    q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=2))
    do_bthd = randn((B, T, H, D), gen, torch.float32).transpose(1, 2)    # head dim contiguous
    do_bhdt = randn((B, H, D, T), gen, torch.float32).transpose(2, 3)    # head dim strided
    cases = [("split views", q, k, v, do_bthd),
             ("mixed layouts", q.contiguous(), k, v, do_bhdt)]
    for name, q_, k_, v_, do in cases:
        got = run_flash(q_, k_, v_, do)
        want = run_reference(q_, k_, v_, do)
        for what, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
            err = rel_err(x, ref)
            assert err < TOL[torch.float32], f"{name} {what}: rel err {err:.3g} seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_causality(dtype):
    # Changing q, k, v at positions > t must not change outputs at positions <= t (bit for bit),
    # and a loss on outputs <= t must give exactly zero gradient at positions > t.
    B, H, T, D = 1, 2, 40, 32
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (randn((B, H, T, D), gen, dtype) for _ in range(4))
    for t in sorted({0, 15, 16, int(torch.randint(0, T - 1, (1,), generator=gen)), T - 2}):
        where = f"t={t} {dtype} seed={seed}"
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t + 1:] = randn(x[:, :, t + 1:].shape, gen, dtype, 3.0)
        do_past = do.clone()
        do_past[:, :, t + 1:] = 0  # == a loss on outputs <= t only
        o1, dq1, dk1, dv1 = run_flash(q, k, v, do_past)
        o2, dq2, dk2, dv2 = run_flash(q2, k2, v2, do_past)
        assert torch.equal(o1[:, :, :t + 1], o2[:, :, :t + 1]), f"future leaked into output {where}"
        assert not torch.equal(o1[:, :, t + 1:], o2[:, :, t + 1:]), f"test is vacuous {where}"
        for name, g1, g2 in (("dq", dq1, dq2), ("dk", dk1, dk2), ("dv", dv1, dv2)):
            assert torch.all(g1[:, :, t + 1:] == 0), f"{name} nonzero at positions > t {where}"
            assert torch.all(g2[:, :, t + 1:] == 0), f"{name} nonzero at positions > t {where}"
            assert torch.equal(g1[:, :, :t + 1], g2[:, :, :t + 1]), f"{name} depends on the future {where}"
        assert dv1[:, :, :t + 1].abs().sum() > 0, f"test is vacuous {where}"


def test_bad_inputs_raise_value_error():
    x = torch.randn(1, 2, 8, 32)
    cases = [
        ((torch.randn(1, 2, 8, 48),) * 3, "head dim"),
        ((torch.randn(1, 2, 8, 8),) * 3, "head dim"),
        ((torch.randn(1, 2, 8, 256),) * 3, "head dim"),
        ((x, torch.randn(1, 2, 9, 32), x), "shapes"),
        ((x, x, torch.randn(1, 1, 8, 32)), "shapes"),
        ((x, x.half(), x), "dtypes"),
        ((x.double(),) * 3, "dtype"),
        ((torch.randn(2, 8, 32),) * 3, "4-d"),
        ((torch.randn(1, 2, 0, 32),) * 3, "empty"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            flash_attention(*args)
    with pytest.raises(ValueError, match="sm_scale"):
        flash_attention(x, x, x, sm_scale=-1.0)
