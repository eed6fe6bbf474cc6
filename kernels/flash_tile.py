"""The flash-attention program bodies and host helpers shared by the Triton attention ops.

A helper module, not an op: kernels/attention.py (padded with a key mask, or varlen),
kernels/window_attention.py (sliding window) and kernels/relative_attention.py (relative-position
terms) are one algorithm that differs only in its scores, so their kernels keep their own signatures
and hand everything to `fwd`, `bwd_dq` or `bwd_dkdv` here, with
  - SCORES, a @triton.jit function (a constexpr argument) that turns one (q, k) tile pair into fp32
    scores in base 2, -inf where a pair is left out:
        s, aux = SCORES(q, k, rows, cols, key_ok, start, h, length, seqlen, qk_scale, args, UPCAST_DOT)
    `args` is the op's own tuple of extra arguments, `key_ok` the (BLOCK_N,) keys inside the sequence
    and kept by the padding mask (HAS_MASK), `aux` whatever its GRAD needs;
  - GRAD (backward only), called with every tile's d loss / d score: GRAD(ds, aux, start, h, rows, cols,
    args); `no_score_grad` where the scores take no input but q and k.
Triton inlines every call and drops the branches of constexpr flags, so each kernel compiles to what a
body written out for it would: the same tiles, loads and dots (the AOT tests check spills).

Numerics: scores in base 2 (scale folded with log2(e)); online softmax whose running max starts at a
finite -1e30, so that fully masked blocks never form inf - inf; the logsumexp (natural log, fp32) is
saved as (heads, rows). With EMPTY_ROWS a row with no key gets output 0 and logsumexp +inf, which makes
every recomputed probability of the backward exactly 0. Dropout: Philox
`tl.rand(seed + batch*heads + head, query * seqlen + key)`; both backward passes regenerate the
forward's keep mask through `_dropout_scale`. Backward: a dq pass (per query block, also writes
delta = rowsum(dO * O)), then a dk/dv pass (per key block); no atomics besides an op's GRAD.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastbert.kernels.host import draw_seed, triton_interpreting
from fastbert.kernels.limits import attention_head_dim_problem

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)

# The CPU interpreter: small tiles so that tiny test shapes still cross several blocks (and tl.dot
# keeps every dim >= 16).
INTERPRETER_CONFIG = ((16, 16, 1, 1),) * 3


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sequence(CU_SEQLENS, b, seqlen, IS_VARLEN: tl.constexpr):
    """(first token row, length, batch index for the batch stride) of sequence b."""
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + b)
        length = tl.load(CU_SEQLENS + b + 1) - start
        batch = b * 0
    else:
        start = b * 0
        length = seqlen
        batch = b
    return start, length, batch


@triton.jit
def _base(batch, start, h, stride_b, stride_t, stride_h):
    """int64 offset of (batch, first token, head) for one tensor."""
    return batch.to(tl.int64) * stride_b + start.to(tl.int64) * stride_t + h.to(tl.int64) * stride_h


@triton.jit
def _stat_offsets(h, n_rows, batch, seqlen, start, rows):
    """Offsets of the rows' entries in a (heads, rows) statistic (LSE, DELTA)."""
    return h.to(tl.int64) * n_rows + batch * seqlen + start + rows


@triton.jit
def _load_rows(ptr, rows, length, stride_t, offs_d, HEAD_DIM: tl.constexpr):
    """(len(rows), BLOCK_D) tile; zeros past the sequence end and past HEAD_DIM."""
    mask = (rows[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptr + rows[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, tile, rows, length, stride_t, offs_d, HEAD_DIM: tl.constexpr):
    mask = (rows[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptr + rows[:, None] * stride_t + offs_d[None, :], tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def dot(a, b, UPCAST_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST_DOT (interpreter + bf16 only) works around bf16 tl.dot."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _key_ok(KEY_MASK, b, seqlen, cols, length, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) True for keys inside the sequence and kept by the padding mask."""
    ok = cols < length
    if HAS_MASK:
        ok &= tl.load(KEY_MASK + b.to(tl.int64) * seqlen + cols, mask=ok, other=0) != 0
    return ok


@triton.jit
def _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p):
    """(BLOCK_M, BLOCK_N) 1/(1-p) where the key is kept, 0 where dropped; the same in fwd and bwd."""
    rnd = tl.rand(seed_bh, rows[:, None] * seqlen + cols[None, :])
    return tl.where(rnd >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)


@triton.jit
def _program(CU_SEQLENS, seqlen, n_heads, seed, IS_VARLEN: tl.constexpr):
    """(block, head, sequence b, its first token row, its length, batch index, dropout seed) of this program."""
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length, batch = _sequence(CU_SEQLENS, b, seqlen, IS_VARLEN)
    return pid, h, b, start, length, batch, seed + b * n_heads + h


@triton.jit
def _blocks(first, count, length, window, BLOCK: tl.constexpr, WINDOWED: tl.constexpr):
    """[lo, hi): the other side's rows that rows [first, first + count) meet; with WINDOWED only those
    within `window` of them (lo aligned to BLOCK), so the work is O(tokens x window)."""
    if WINDOWED:
        lo = tl.maximum(first - window, 0) // BLOCK * BLOCK
        hi = tl.minimum(first + count + window, length)
    else:
        lo = 0
        hi = length
    return lo, hi


@triton.jit
def _key_block(q, K, V, KEY_MASK, qkv_base, rows, cols, b, start, h, length, seqlen, stride_qt, offs_d, qk_scale,
               SCORES: tl.constexpr, scores_args, HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr,
               UPCAST_DOT: tl.constexpr):
    """A query-block program's step to the key block `cols`: (k, v, scores of q against k, SCORES' aux)."""
    k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
    v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
    keys = _key_ok(KEY_MASK, b, seqlen, cols, length, HAS_MASK)
    s, aux = SCORES(q, k, rows, cols, keys, start, h, length, seqlen, qk_scale, scores_args, UPCAST_DOT)
    return k, v, s, aux


@triton.jit
def _probabilities(s, lse2, do, v, seed_bh, rows, cols, seqlen, dropout_p, HAS_DROPOUT: tl.constexpr,
                   UPCAST_DOT: tl.constexpr):
    """The backward's tile: (p, p after dropout, dP = dO V^T through dropout), p recomputed from the saved
    logsumexp (0 where lse = +inf: rows past the end, rows without keys). The dq pass leaves p after
    dropout unused, so it compiles away there."""
    p = tl.math.exp2(s - lse2[:, None])
    dp = dot(do, tl.trans(v), UPCAST_DOT)
    if HAS_DROPOUT:
        keep = _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p)
        p_drop = p * keep
        dp = dp * keep
    else:
        p_drop = p
    return p, p_drop, dp


@triton.jit
def no_score_grad(ds, aux, start, h, rows, cols, args):
    """GRAD of the ops whose scores depend on q and k alone."""
    pass


# ----------------------------------------------------------------------------------------------
# Program bodies (each kernel calls one; an `if` instead of an early return, which an inlined
# function would run on past)
# ----------------------------------------------------------------------------------------------
@triton.jit
def fwd(
    Q, K, V, O, LSE, CU_SEQLENS, KEY_MASK,
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, window, qk_scale, dropout_p, seed,
    SCORES: tl.constexpr, scores_args,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, WINDOWED: tl.constexpr, EMPTY_ROWS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One (query block, head, sequence) program of the forward: O and LSE of its rows."""
    pid_m, h, b, start, length, batch, seed_bh = _program(CU_SEQLENS, seqlen, n_heads, seed, IS_VARLEN)
    if pid_m * BLOCK_M < length:
        qkv_base = _base(batch, start, h, stride_qb, stride_qt, stride_qh)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
        # this block's queries stay in registers for the whole key loop
        q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
        m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # running max (base 2); finite: no inf - inf
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, hi = _blocks(pid_m * BLOCK_M, BLOCK_M, length, window, BLOCK_N, WINDOWED)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k, v, s, _ = _key_block(q, K, V, KEY_MASK, qkv_base, rows, cols, b, start, h, length, seqlen, stride_qt,
                                    offs_d, qk_scale, SCORES, scores_args, HEAD_DIM, HAS_MASK, UPCAST_DOT)
            # online softmax: rescale what was accumulated to the new max
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:  # the sum above is taken before dropout, as in softmax -> dropout
                p = p * _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST_DOT)
            m_i = m_new

        # normalize; without EMPTY_ROWS every real query sees a key (itself), so l > 0 on real rows
        has_key = l_i > 0.0
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]
        lse = (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) / LOG2E
        if EMPTY_ROWS:  # a row without keys (l = 0) gets zeros and logsumexp +inf
            lse = tl.where(has_key, lse, float("inf"))
        _store_rows(O + _base(batch, start, h, stride_ob, stride_ot, stride_oh), out, rows, length, stride_ot, offs_d,
                   HEAD_DIM)
        tl.store(LSE + _stat_offsets(h, n_rows, batch, seqlen, start, rows), lse, mask=rows < length)


@triton.jit
def bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, CU_SEQLENS, KEY_MASK,  # writes DQ and DELTA = rowsum(dO * O)
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, window, softmax_scale, dropout_p, seed,
    SCORES: tl.constexpr, scores_args, GRAD: tl.constexpr, grad_args,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, WINDOWED: tl.constexpr,  # a program: BLOCK_M queries
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One (query block, head, sequence) program of the dq pass: DQ and DELTA of its rows."""
    pid_m, h, b, start, length, batch, seed_bh = _program(CU_SEQLENS, seqlen, n_heads, seed, IS_VARLEN)
    if pid_m * BLOCK_M < length:
        qk_scale = softmax_scale * LOG2E
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
        qkv_base = _base(batch, start, h, stride_qb, stride_qt, stride_qh)
        o_base = _base(batch, start, h, stride_ob, stride_ot, stride_oh)
        q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
        do = _load_rows(DO + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
        # delta = rowsum(dO * O), needed by both backward passes
        o = _load_rows(O + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        stat_rows = _stat_offsets(h, n_rows, batch, seqlen, start, rows)
        tl.store(DELTA + stat_rows, delta, mask=rows < length)
        lse2 = tl.load(LSE + stat_rows, mask=rows < length, other=float("inf")) * LOG2E

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, hi = _blocks(pid_m * BLOCK_M, BLOCK_M, length, window, BLOCK_N, WINDOWED)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k, v, s, aux = _key_block(q, K, V, KEY_MASK, qkv_base, rows, cols, b, start, h, length, seqlen,
                                      stride_qt, offs_d, qk_scale, SCORES, scores_args, HEAD_DIM, HAS_MASK, UPCAST_DOT)
            p, _, dp = _probabilities(s, lse2, do, v, seed_bh, rows, cols, seqlen, dropout_p, HAS_DROPOUT, UPCAST_DOT)
            ds = p * (dp - delta[:, None])  # d loss / d score
            dq += dot(ds.to(k.dtype), k, UPCAST_DOT)
            GRAD(ds, aux, start, h, rows, cols, grad_args)
        _store_rows(DQ + o_base, dq * softmax_scale, rows, length, stride_ot, offs_d, HEAD_DIM)


@triton.jit
def bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, KEY_MASK,  # writes DK, DV
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, window, softmax_scale, dropout_p, seed,
    SCORES: tl.constexpr, scores_args, GRAD: tl.constexpr, grad_args,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, WINDOWED: tl.constexpr,  # per BLOCK_N keys
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One (key block, head, sequence) program of the dk/dv pass: DK and DV of its keys."""
    pid_n, h, b, start, length, batch, seed_bh = _program(CU_SEQLENS, seqlen, n_heads, seed, IS_VARLEN)
    if pid_n * BLOCK_N < length:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
        qkv_base = _base(batch, start, h, stride_qb, stride_qt, stride_qh)
        o_base = _base(batch, start, h, stride_ob, stride_ot, stride_oh)
        qk_scale = softmax_scale * LOG2E
        # this block's keys and values stay in registers for the whole query loop
        k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        keys = _key_ok(KEY_MASK, b, seqlen, cols, length, HAS_MASK)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo, hi = _blocks(pid_n * BLOCK_N, BLOCK_N, length, window, BLOCK_M, WINDOWED)
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
            do = _load_rows(DO + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
            stat_rows = _stat_offsets(h, n_rows, batch, seqlen, start, rows)
            lse2 = tl.load(LSE + stat_rows, mask=rows < length, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + stat_rows, mask=rows < length, other=0.0)
            s, aux = SCORES(q, k, rows, cols, keys, start, h, length, seqlen, qk_scale, scores_args, UPCAST_DOT)
            p, p_drop, dp = _probabilities(s, lse2, do, v, seed_bh, rows, cols, seqlen, dropout_p, HAS_DROPOUT,
                                           UPCAST_DOT)
            dv += dot(tl.trans(p_drop.to(do.dtype)), do, UPCAST_DOT)
            ds = p * (dp - delta[:, None])
            dk += dot(tl.trans(ds.to(q.dtype)), q, UPCAST_DOT)
            GRAD(ds, aux, start, h, rows, cols, grad_args)
        _store_rows(DK + o_base, dk * softmax_scale, cols, length, stride_ot, offs_d, HEAD_DIM)
        _store_rows(DV + o_base, dv, cols, length, stride_ot, offs_d, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Host helpers
# ----------------------------------------------------------------------------------------------
def tile_config(configs: dict, head_dim: int, op: str):
    """(BLOCK_D, forward config, dq config, dk/dv config) for this head_dim from an op's table
    BLOCK_D -> ((BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, the dq and the dk/dv pass)."""
    problem = attention_head_dim_problem(head_dim)
    if problem is not None:
        raise ValueError(f"Triton {op}: {problem}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    return (block_d, *(INTERPRETER_CONFIG if triton_interpreting() else configs[block_d]))


def prepare(q, softmax_scale, dropout_p):
    """(scale, seed) of an entry point: the default scale 1/sqrt(head_dim); when dropout is on, a Philox
    seed drawn from torch's default generator as a CPU tensor (no sync, torch.compile keeps it in the graph)."""
    problem = attention_head_dim_problem(q.shape[-1])
    if problem is not None:
        raise ValueError(f"Triton attention: {problem}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return scale, (draw_seed() if dropout_p > 0.0 else None)


def strides(t: torch.Tensor, is_varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (batch, heads, seq, D) or (total, heads, D) tensor."""
    if is_varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(2), t.stride(1)


def same_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors unchanged if they share strides with a unit head_dim stride, else contiguous copies."""
    first = tensors[0]
    if first.stride(-1) == 1 and all(t.stride() == first.stride() for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def kernel_flags(q: torch.Tensor, dropout_p: float, **flags) -> dict:
    """The constexprs every attention kernel takes, plus an op's own `flags`."""
    return dict(HEAD_DIM=q.shape[-1], **flags, HAS_DROPOUT=dropout_p > 0.0,
                UPCAST_DOT=triton_interpreting() and q.dtype == torch.bfloat16)


def launch(kernel, config, block_d: int, grid_rows: int, heads: int, batch: int, *args, by_keys=False, **flags):
    """kernel over (blocks of grid_rows, heads, sequences), nothing when that is empty; the blocks are
    BLOCK_M queries, or BLOCK_N keys for a pass over key blocks (by_keys)."""
    block_m, block_n, num_warps, num_stages = config
    grid = (triton.cdiv(grid_rows, block_n if by_keys else block_m), heads, batch)
    if min(grid) > 0:
        kernel[grid](*args, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
                     num_warps=num_warps, num_stages=num_stages)


# Argument types for the AOT signatures; every other non-constexpr argument is an i32.
AOT_TYPES = {
    **{name: "*DTYPE" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "Q_REL", "K_REL")},
    "LSE": "*fp32", "DELTA": "*fp32", "DQ_REL": "*fp32", "DK_REL": "*fp32",
    "CU_SEQLENS": "*i32", "IDX": "*i32", "KEY_MASK": "*i8",
    "qk_scale": "fp32", "softmax_scale": "fp32", "dropout_p": "fp32", "seed": "i64",
}


def aot_cases(prefix: str, kernels, configs: dict, variants) -> list[tuple]:
    """AOT_CASES entries of an op (kernels/aot.py): each (name, kernel) of `kernels` (forward, dq, dk/dv)
    with the config of `configs` the launchers pick, for each (dtype, head_dim, variant name, flags)."""
    cases = []
    for dtype, head_dim, variant, flags in variants:
        block_d = triton.next_power_of_2(head_dim)
        for (name, fn), (block_m, block_n, num_warps, num_stages) in zip(kernels, configs[block_d]):
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **flags)
            signature = {arg: AOT_TYPES.get(arg, "i32").replace("DTYPE", dtype)
                         for arg in fn.arg_names if arg not in constexprs}
            cases.append((f"{prefix}_{name}_{dtype}_d{head_dim}_{variant}", fn, signature, constexprs,
                          num_warps, num_stages))
    return cases
