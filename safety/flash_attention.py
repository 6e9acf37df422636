"""
FlashAttention-2 in Triton: causal self-attention, forward and backward, as one autograd op.

    from safety.flash_attention import flash_attention
    y = flash_attention(q, k, v)          # q, k, v: (B, H, T, D) -> y: (B, H, T, D), causal
"""
# Algorithm (Dao 2023, "FlashAttention-2"), and why each piece is there:
# - Forward. One program owns a block of BLOCK_M queries and streams over the key/value blocks that
#   it may see, never materialising the T x T score matrix. It keeps a running row max m, a running
#   row sum l and an unnormalised output acc ("online softmax"): when a new block raises the max,
#   the old l and acc are rescaled by exp(m_old - m_new). All of this is fp32. Exponentials are
#   exp2, with log2(e) folded into the softmax scale, because exp2 is the native GPU instruction.
# - Causality. Key blocks that lie entirely before the query block are fully visible, so they are
#   processed without any mask; only the key blocks on the diagonal get the causal mask (and the
#   load masks for a sequence tail that is not a multiple of the block size). Blocks after the
#   diagonal are skipped, which halves the work.
# - The forward stores one fp32 number per row, the log-sum-exp (base 2) of the scaled scores.
#   With it the backward recomputes the probabilities P = exp2(S - lse) exactly, block by block,
#   instead of saving the T x T matrix P.
# - Backward, three kernels: (1) delta = rowsum(O * dO), the term that the softmax Jacobian
#   subtracts (dS = P * (dP - delta)); (2) one program per key block accumulates dK and dV while
#   looping over the query blocks that see it; (3) one program per query block accumulates dQ
#   while looping over its key blocks. Splitting (2) and (3) recomputes P twice but means every
#   output element is written by exactly one program: no atomics, and autotuning (which reruns
#   kernels) is safe.
#
# Block shapes: every kernel's outer block is a multiple of its inner (loop) block, which keeps the
# diagonal logic simple: the diagonal is then covered by a whole number of inner blocks, and all
# other inner blocks are either fully visible or skipped. (Forward and dQ: BLOCK_M % BLOCK_N == 0;
# dK/dV: BLOCK_N % BLOCK_M == 0, where BLOCK_M is always the query-side block.)
#
# Dtypes: fp32, fp16 or bf16 inputs (the output and gradients come back in the same dtype).
# Matmuls accumulate in fp32; for fp32 inputs they use full IEEE precision (no TF32), so fp32
# results match a float64 reference to ~1e-6. Head dims 16, 32, 64, 128; any T >= 1.
#
# On a GPU the kernels are autotuned over a few block sizes per (T, head dim, dtype). Under
# Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) fixed 16 x 16 blocks are
# used instead, see INTERPRET_BLOCKS.
#
# Tested (on CPU, through the interpreter) against a float64 reference:
#     .venv/bin/python -m pytest tests/test_flash_attention.py
# Benchmarked against torch's scaled_dot_product_attention by gpu_check.py (--bench=kernel, and its check).

import math
import os

import torch
import triton
import triton.language as tl

# Read once, at import: the interpreter has to be switched on before triton is imported anyway.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Block sizes used under the interpreter, where there is nothing to tune and small blocks keep
# the (numpy-emulated) kernels fast. Tests may change these, e.g. to exercise BLOCK_M != BLOCK_N.
INTERPRET_BLOCKS = {
    "fwd": dict(BLOCK_M=16, BLOCK_N=16),   # query block, key block (BLOCK_M % BLOCK_N == 0)
    "dkdv": dict(BLOCK_M=16, BLOCK_N=16),  # query block, key block (BLOCK_N % BLOCK_M == 0)
    "dq": dict(BLOCK_M=16, BLOCK_N=16),    # query block, key block (BLOCK_M % BLOCK_N == 0)
}
DELTA_BLOCK = 16 if INTERPRET else 64  # rows per program of the tiny delta kernel; not tuned

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))
HEAD_DIMS = (16, 32, 64, 128)


def _configs(shapes):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples -> triton.Config list."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


# A handful of configurations that are sensible on Hopper/Ampere for fp16/bf16. They were
# compiled offline for sm_90 (bf16/fp16, D=64 and 128): all compile, and at D=128 the 4-warp
# 128-row forward tiles spill registers (they are kept for D<=64, where they may win). A config
# that does not fit in shared memory fails at launch and the autotuner just skips it.
FWD_CONFIGS = _configs([  # BLOCK_M: the query block a program owns, BLOCK_N: key step
    (64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3),
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
])
DKDV_CONFIGS = _configs([  # BLOCK_M: query step, BLOCK_N: the key block a program owns
    (32, 64, 4, 3), (32, 64, 4, 4), (32, 64, 8, 3), (64, 64, 8, 3),
    (16, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3),
])
DQ_CONFIGS = _configs([  # BLOCK_M: the query block a program owns, BLOCK_N: key step
    (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 8, 3),
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
])
# fp32 inputs get exact IEEE matmuls, which run on CUDA cores rather than tensor cores: the big
# tiles above only spill and take up to a minute each to compile. fp32 is the exactness path, not
# the fast one, so it gets one small config (valid for all three kernels: 32 % 32 == 0).
FP32_CONFIGS = _configs([(32, 32, 4, 2)])


def _fp32_gets_small_blocks(configs, named_args, **kwargs):
    return FP32_CONFIGS if kwargs.get("PRECISION") == "ieee" else configs


def _autotune(configs):
    # Tuned per sequence length and head dim (the autotuner also keys on the tensors' dtypes).
    # Under the interpreter, plain kernels: the caller passes the block sizes.
    if INTERPRET:
        return lambda kernel: kernel
    return triton.autotune(configs=configs, key=["T", "HEAD_DIM"],
                           prune_configs_by={"early_config_prune": _fp32_gets_small_blocks})


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc), accumulated in fp32. PRECISION: "ieee" for fp32 inputs (exact, no TF32),
    "tf32" (the default, ignored for 16-bit inputs) for fp16/bf16, or "emulate": Triton's CPU
    interpreter computes bf16 dots wrongly, so there bf16 operands are widened to fp32 first, which
    is what the tensor cores compute anyway (bf16 products are exact in fp32)."""
    if PRECISION == "emulate":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


# -----------------------------------------------------------------------------
# Forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_t, lo, hi, offs_m, offs_d, T, qk_scale,
               BLOCK_N: tl.constexpr, ON_DIAGONAL: tl.constexpr, PRECISION: tl.constexpr):
    """Fold the key blocks [lo, hi) into the running softmax state of one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ptrs = offs_n[:, None] * stride_t + offs_d[None, :]
        if ON_DIAGONAL:  # only the diagonal blocks can reach past the end of the sequence
            k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(K + kv_ptrs)
            v = tl.load(V + kv_ptrs)
        qk = _dot(q, tl.trans(k), None, PRECISION)
        if ON_DIAGONAL:
            # Causal mask. Keys past T always sit right of the diagonal for real rows (n >= T > m),
            # so this also hides the tail. Every row sees key m0 <= m in the first diagonal block,
            # so m_new below is finite from then on and exp2(-inf - m_new) is a clean 0.
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        # Scale after the max (valid because the scale is > 0), so that the compiler can fuse
        # qk * scale - m into a single FMA.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales the old state; 0 on the first block (m_i=-inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        # P goes into the second matmul in the input dtype (fp16/bf16 tensor cores; a no-op for
        # fp32), the product accumulates in fp32.
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotune(FWD_CONFIGS)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_b, stride_h, stride_t,  # shared by Q, K, V (head dim is contiguous)
                H, T, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    # Late query blocks see the most keys; launching them first evens out the tail of the grid.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    # int64 head offsets: B*H*T*D can exceed 2**31 elements.
    head = off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h
    Q += head
    K += head
    V += head
    O += off_bh.to(tl.int64) * T * HEAD_DIM  # O is allocated contiguous (B, H, T, D)
    LSE += off_bh.to(tl.int64) * T

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    # The query block is loaded once and stays on chip for both loops. Rows past T read zeros: they
    # compute harmless finite values and are never stored.
    q = tl.load(Q + offs_m[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)       # running unnormalised output

    # Keys [0, m0): all before every query of this block, no mask needed (m0 < T, no tail either).
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_t, 0, m0, offs_m, offs_d, T,
                               qk_scale, BLOCK_N, False, PRECISION)
    # Keys [m0, m0 + BLOCK_M): the diagonal, BLOCK_M // BLOCK_N masked blocks (fewer at the tail).
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_t, m0, tl.minimum(m0 + BLOCK_M, T),
                               offs_m, offs_d, T, qk_scale, BLOCK_N, True, PRECISION)

    acc = acc / l_i[:, None]
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    tl.store(O + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None])


# -----------------------------------------------------------------------------
# Backward. With S = scale * Q K^T, P = softmax(S), O = P V:
#   dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta) with delta = rowsum(dO * O),
#   dQ = scale * dS K,   dK = scale * dS^T Q.

@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_dob, stride_doh, stride_dot, H, T,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    O += off_bh.to(tl.int64) * T * HEAD_DIM
    DO += off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    DELTA += off_bh.to(tl.int64) * T
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(O + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    tl.store(DELTA + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_t, stride_dot, lo, hi, offs_n, offs_d,
                    T, qk_scale, BLOCK_M: tl.constexpr, ON_DIAGONAL: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Add the contributions of query blocks [lo, hi) to one key block's dK, dV."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # Query rows can run past T on the last block (diagonal or not). Zero q and dO there make
        # the rows contribute exactly nothing: dV gets P^T * 0 and dS = P * (0 - 0) = 0.
        row_ok = offs_m < T
        q = tl.load(Q + offs_m[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        # Work with transposed tiles (keys along rows) so that dK, dV come out as K-shaped tiles.
        qkT = _dot(k, tl.trans(q), None, PRECISION)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])  # the forward's probabilities, exactly
        if ON_DIAGONAL:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv = _dot(pT.to(do.dtype), do, dv, PRECISION)
        dpT = _dot(v, tl.trans(do), None, PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, PRECISION)
    return dk, dv


@_autotune(DKDV_CONFIGS)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                     stride_b, stride_h, stride_t,        # shared by Q, K, V
                     stride_dob, stride_doh, stride_dot,  # dO
                     H, T, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr):
    # This program owns key block [n0, n0 + BLOCK_N); it steps over queries BLOCK_M at a time.
    # BLOCK_N % BLOCK_M == 0 makes the diagonal exactly BLOCK_N // BLOCK_M query steps.
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    n0 = tl.program_id(0) * BLOCK_N  # block 0 has the most work and is launched first already
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    head = off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h
    Q += head
    K += head
    V += head
    DO += off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    DK += off_bh.to(tl.int64) * T * HEAD_DIM  # dK, dV are allocated contiguous (B, H, T, D)
    DV += off_bh.to(tl.int64) * T * HEAD_DIM
    LSE += off_bh.to(tl.int64) * T
    DELTA += off_bh.to(tl.int64) * T

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T
    k = tl.load(K + offs_n[:, None] * stride_t + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_t + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Queries [n0, n0 + BLOCK_N): the diagonal, masked. Queries before n0 never see these keys.
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_t, stride_dot,
                             n0, tl.minimum(n0 + BLOCK_N, T), offs_n, offs_d, T, qk_scale,
                             BLOCK_M, True, PRECISION)
    # Queries [n0 + BLOCK_N, T): they see every key of the block, no causal mask.
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_t, stride_dot,
                             n0 + BLOCK_N, T, offs_n, offs_d, T, qk_scale,
                             BLOCK_M, False, PRECISION)

    dk *= sm_scale  # dS was taken w.r.t. the scaled scores
    out = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_t, lo, hi, offs_m, offs_d, T, qk_scale,
                  BLOCK_N: tl.constexpr, ON_DIAGONAL: tl.constexpr, PRECISION: tl.constexpr):
    """Add the contributions of key blocks [lo, hi) to one query block's dQ."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ptrs = offs_n[:, None] * stride_t + offs_d[None, :]
        if ON_DIAGONAL:
            k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(K + kv_ptrs)
            v = tl.load(V + kv_ptrs)
        qk = _dot(q, tl.trans(k), None, PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if ON_DIAGONAL:  # as in the forward, this also hides keys past T from real rows
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), None, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PRECISION)
    return dq


@_autotune(DQ_CONFIGS)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                   stride_b, stride_h, stride_t,
                   stride_dob, stride_doh, stride_dot,
                   H, T, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    # Mirror image of the forward: own query block [m0, m0 + BLOCK_M), step over key blocks.
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest blocks first, as in forward
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    head = off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h
    Q += head
    K += head
    V += head
    DO += off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    DQ += off_bh.to(tl.int64) * T * HEAD_DIM
    LSE += off_bh.to(tl.int64) * T
    DELTA += off_bh.to(tl.int64) * T

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    # Rows past T: zero q, dO, lse, delta give dS = 0 there; they are not stored anyway.
    q = tl.load(Q + offs_m[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_t, 0, m0, offs_m, offs_d, T, qk_scale,
                       BLOCK_N, False, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_t, m0, tl.minimum(m0 + BLOCK_M, T),
                       offs_m, offs_d, T, qk_scale, BLOCK_N, True, PRECISION)

    dq *= sm_scale
    tl.store(DQ + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


# -----------------------------------------------------------------------------
# Host side

def _launch(kernel, name, T, BH, *args, **kwargs):
    """Launch over grid (cdiv(T, outer block), B*H). The outer block is BLOCK_M for the query-block
    kernels and BLOCK_N for dK/dV; autotuned kernels pick their own block sizes."""
    outer = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
    if INTERPRET:
        blocks = INTERPRET_BLOCKS[name]
        kernel[(triton.cdiv(T, blocks[outer]), BH)](*args, **kwargs, **blocks)
    else:
        kernel[lambda meta: (triton.cdiv(T, meta[outer]), BH)](*args, **kwargs)


def _check_inputs(q, k, v, sm_scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be a 4-d tensor (B, H, T, D), "
                             f"got {getattr(x, 'shape', type(x))}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"flash_attention: q, k, v shapes must match (causal self-attention), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention: dtype must be float32, float16 or bfloat16, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v devices must match, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"flash_attention: needs CUDA tensors (or TRITON_INTERPRET=1 to run on CPU), "
                         f"got device {q.device}")
    B, H, T, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim D={D} is not supported, must be one of {HEAD_DIMS}")
    if B == 0 or H == 0 or T == 0:
        raise ValueError(f"flash_attention: empty input, shape (B, H, T, D) = {tuple(q.shape)}")
    if sm_scale is not None and not sm_scale > 0:
        raise ValueError(f"flash_attention: sm_scale must be > 0, got {sm_scale}")


def _dot_precision(dtype):
    """The PRECISION mode of _dot for this input dtype."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and INTERPRET:
        return "emulate"
    return "tf32"


def _common_layout(q, k, v):
    """Return q, k, v sharing one set of strides with a contiguous head dim, copying only if needed.
    Views like qkv.split(...)[i].view(B, T, H, D).transpose(1, 2) already qualify: no copy."""
    if q.stride() == k.stride() == v.stride() and q.stride(3) == 1:
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


class FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, sm_scale):
        B, H, T, D = q.shape
        q, k, v = _common_layout(q, k, v)
        o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B * H, T), dtype=torch.float32, device=q.device)
        precision = _dot_precision(q.dtype)
        _launch(_fwd_kernel, "fwd", T, B * H,
                q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2),
                H, T, sm_scale * LOG2E, HEAD_DIM=D, PRECISION=precision)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.sm_scale = sm_scale
        ctx.precision = precision
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        sm_scale = ctx.sm_scale
        if do.dtype != q.dtype:
            do = do.to(q.dtype)
        if do.stride(3) != 1:
            do = do.contiguous()
        do_strides = (do.stride(0), do.stride(1), do.stride(2))
        qkv_strides = (q.stride(0), q.stride(1), q.stride(2))

        delta = torch.empty_like(lse)
        _bwd_delta_kernel[(triton.cdiv(T, DELTA_BLOCK), B * H)](
            o, do, delta, *do_strides, H, T, HEAD_DIM=D, BLOCK_M=DELTA_BLOCK)

        # Gradients are produced directly in the input dtype; every element is written exactly once.
        dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(dq)
        _launch(_bwd_dkdv_kernel, "dkdv", T, B * H,
                q, k, v, do, dk, dv, lse, delta, *qkv_strides, *do_strides,
                H, T, sm_scale * LOG2E, sm_scale, HEAD_DIM=D, PRECISION=ctx.precision)
        _launch(_bwd_dq_kernel, "dq", T, B * H,
                q, k, v, do, dq, lse, delta, *qkv_strides, *do_strides,
                H, T, sm_scale * LOG2E, sm_scale, HEAD_DIM=D, PRECISION=ctx.precision)
        return dq, dk, dv, None


def flash_attention(q, k, v, sm_scale=None):
    """Causal scaled-dot-product attention, softmax(q k^T * sm_scale + causal mask) v.

    q, k, v: (B, H, T, D) tensors, one dtype among float32/float16/bfloat16, D in {16, 32, 64, 128},
    any T >= 1, any strides. sm_scale defaults to 1/sqrt(D). Returns (B, H, T, D) in the input dtype.
    Differentiable w.r.t. q, k, v (once). Raises ValueError on unsupported inputs.
    """
    _check_inputs(q, k, v, sm_scale)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return FlashAttention.apply(q, k, v, float(sm_scale))


# -----------------------------------------------------------------------------
# Interpreter compatibility. Triton's interpreter turns a scalar kernel value into a Python int
# (for `range(lo, hi, step)` with runtime bounds) with int() on a 1-element numpy array, which
# numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"). Every
# kernel here loops over runtime bounds, so under the interpreter we patch that one conversion
# to use .item(). No effect on GPU runs.

def _patch_interpreter_scalar_index():
    from triton.runtime import interpreter
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_flash_attention_patched", False):
        return  # a triton without this internal (nothing to patch), or already patched

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._flash_attention_patched = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_scalar_index()
