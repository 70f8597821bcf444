# ruff: noqa: ANN001, ANN202  (Triton reads kernel annotations as types: leave them off)
"""Triton kernels for the GPU fast path: fused RMSNorm + residual, RoPE + KV-cache
store, SwiGLU, and decode attention over the paged KV cache.

Triton compiles for CUDA and for ROCm (HIP) alike; nothing here is CUDA-only. Each
kernel has an eager PyTorch twin in :mod:`rocmux_hip_direct.fused`, which the CPU runs
and the tests compare against (on the CPU through ``TRITON_INTERPRET=1``, on a GPU for
real). Import this module only where ``triton`` is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    res_ptr,
    delta_ptr,
    w_ptr,
    out_ptr,
    n_cols,
    eps,
    stride_res,
    stride_delta,
    stride_out,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One row per program: residual += delta (float32), out = norm(residual) * w.
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0)
        x = x + d.to(tl.float32)
        tl.store(res_ptr + row * stride_res + cols, x, mask=mask)
    var = tl.sum(x * x, axis=0) / n_cols
    scale = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * scale * w
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    residual: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """See :func:`rocmux_hip_direct.fused.add_rms_norm`."""
    n_rows, n_cols = residual.shape
    out = torch.empty(n_rows, n_cols, device=residual.device, dtype=out_dtype)
    block = triton.next_power_of_2(n_cols)
    _add_rms_norm_kernel[(n_rows,)](
        residual,
        delta if delta is not None else residual,
        weight,
        out,
        n_cols,
        eps,
        residual.stride(0),
        delta.stride(0) if delta is not None else 0,
        out.stride(0),
        HAS_DELTA=delta is not None,
        BLOCK=block,
        num_warps=4 if block <= 2048 else 8,
    )
    return out


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr, n_ff, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_ff
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + n_ff + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """See :func:`rocmux_hip_direct.fused.swiglu`."""
    n_rows, width = gate_up.shape
    n_ff = width // 2
    out = torch.empty(n_rows, n_ff, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _swiglu_kernel[(n_rows, triton.cdiv(n_ff, block))](
        gate_up, out, n_ff, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out


@triton.jit
def _rope_store_kernel(
    qkv_ptr,
    pos_ptr,
    slot_ptr,
    cs_ptr,
    k_ptr,
    v_ptr,
    stride_qkv,
    stride_pos,
    stride_slot,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    N_HEAD: tl.constexpr,
    N_HEAD_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROPE_DIMS: tl.constexpr,
    NEOX: tl.constexpr,
):
    # Program (token, head) over the N_HEAD query, N_HEAD_KV key and N_HEAD_KV value
    # heads of one packed qkv row. Q and K are rotated in place; K and V are also
    # written to their cache slot unless the slot is negative (batch padding).
    t = tl.program_id(0)
    h = tl.program_id(1)
    row = qkv_ptr + t * stride_qkv + h * HEAD_DIM
    slot = tl.load(slot_ptr + t * stride_slot).to(tl.int64)
    half: tl.constexpr = ROPE_DIMS // 2
    rest_dims: tl.constexpr = HEAD_DIM - ROPE_DIMS
    if h < N_HEAD + N_HEAD_KV:
        pos = tl.load(pos_ptr + t * stride_pos)
        i = tl.arange(0, half)
        if NEOX:
            i0 = i
            i1 = i + half
        else:
            i0 = 2 * i
            i1 = 2 * i + 1
        x0 = tl.load(row + i0).to(tl.float32)
        x1 = tl.load(row + i1).to(tl.float32)
        cos = tl.load(cs_ptr + pos * ROPE_DIMS + 2 * i)
        sin = tl.load(cs_ptr + pos * ROPE_DIMS + 2 * i + 1)
        y0 = (x0 * cos - x1 * sin).to(qkv_ptr.dtype.element_ty)
        y1 = (x0 * sin + x1 * cos).to(qkv_ptr.dtype.element_ty)
        tl.store(row + i0, y0)
        tl.store(row + i1, y1)
        if (h >= N_HEAD) & (slot >= 0):
            kv = h - N_HEAD
            dst = k_ptr + slot * stride_ks + kv * stride_kh
            tl.store(dst + i0, y0.to(k_ptr.dtype.element_ty))
            tl.store(dst + i1, y1.to(k_ptr.dtype.element_ty))
            if ROPE_DIMS < HEAD_DIM:
                # Pass-through dims; ROPE_DIMS < HEAD_DIM only with power-of-2 tails.
                rest = ROPE_DIMS + tl.arange(0, rest_dims)
                tl.store(dst + rest, tl.load(row + rest).to(k_ptr.dtype.element_ty))
    elif slot >= 0:
        kv = h - N_HEAD - N_HEAD_KV
        d = tl.arange(0, HEAD_DIM)
        x = tl.load(row + d)
        tl.store(v_ptr + slot * stride_vs + kv * stride_vh + d, x.to(v_ptr.dtype.element_ty))


def rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    rope: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_head: int,
    n_head_kv: int,
    head_dim: int,
    rope_dims: int,
    neox: bool,
) -> None:
    """See :func:`rocmux_hip_direct.fused.rope_store`."""
    n_tok = qkv.shape[0]
    if n_tok == 0:
        return
    _rope_store_kernel[(n_tok, n_head + 2 * n_head_kv)](
        qkv,
        positions,
        slots,
        rope,
        k_cache,
        v_cache,
        qkv.stride(0),
        positions.stride(0),
        slots.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        N_HEAD=n_head,
        N_HEAD_KV=n_head_kv,
        HEAD_DIM=head_dim,
        ROPE_DIMS=rope_dims,
        NEOX=neox,
        num_warps=1,
    )


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    len_ptr,
    po_ptr,
    pml_ptr,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_len,
    scale,
    N_REP: tl.constexpr,
    R_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_SPLIT: tl.constexpr,
):
    # Program (sequence, kv head, split): the N_REP query heads that share this kv head
    # (padded to R_PAD rows for tl.dot) against one slice of the sequence's context,
    # online softmax; writes the unnormalised output and (max, sum) of the slice.
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    n_ctx = tl.load(len_ptr + b * stride_len)
    split_len = tl.cdiv(tl.cdiv(n_ctx, N_SPLIT), BLOCK_N) * BLOCK_N
    lo = sp * split_len
    hi = tl.minimum(lo + split_len, n_ctx)
    r = tl.arange(0, R_PAD)
    rmask = r < N_REP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + b * stride_qt + (hk * N_REP + r)[:, None] * stride_qh + d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    m = tl.full([R_PAD], float("-inf"), tl.float32)
    ell = tl.zeros([R_PAD], tl.float32)
    acc = tl.zeros([R_PAD, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        block = tl.load(bt_ptr + b * stride_bt + pos // PAGE, mask=pmask, other=0)
        slot = block.to(tl.int64) * PAGE + pos % PAGE
        k = tl.load(
            k_ptr + slot[:, None] * stride_ks + hk * stride_kh + d[None, :],
            mask=pmask[:, None],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        ell = ell * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + slot[:, None] * stride_vs + hk * stride_vh + d[None, :],
            mask=pmask[:, None],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m = m_new
    # partial buffers: (B, H, N_SPLIT, HEAD_DIM) and (B, H, N_SPLIT, 2)
    head = hk * N_REP + r
    n_head = tl.num_programs(1) * N_REP
    base = (b * n_head + head) * N_SPLIT + sp
    tl.store(po_ptr + base[:, None] * HEAD_DIM + d[None, :], acc, mask=rmask[:, None])
    tl.store(pml_ptr + base * 2, m, mask=rmask)
    tl.store(pml_ptr + base * 2 + 1, ell, mask=rmask)


@triton.jit
def _paged_decode_reduce_kernel(
    po_ptr,
    pml_ptr,
    out_ptr,
    stride_ot,
    HEAD_DIM: tl.constexpr,
    N_SPLIT: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    n_head = tl.num_programs(1)
    base = (b * n_head + h) * N_SPLIT
    s = tl.arange(0, N_SPLIT)
    d = tl.arange(0, HEAD_DIM)
    m = tl.load(pml_ptr + (base + s) * 2)
    ell = tl.load(pml_ptr + (base + s) * 2 + 1)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # empty context (padding rows)
    w = tl.exp2(m - m_all)
    total = tl.sum(ell * w, axis=0)
    acc = tl.load(po_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :])
    o = tl.sum(acc * w[:, None], axis=0) / tl.maximum(total, 1e-30)
    tl.store(out_ptr + b * stride_ot + h * HEAD_DIM + d, o.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    page_size: int,
    scale: float,
    n_split: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`rocmux_hip_direct.fused.paged_decode_attention`."""
    n_seq, n_head, head_dim = q.shape
    n_head_kv = k_cache.shape[1]
    n_rep = n_head // n_head_kv
    if out is None:
        out = torch.empty(n_seq, n_head * head_dim, device=q.device, dtype=q.dtype)
    part_o = torch.empty(n_seq, n_head, n_split, head_dim, device=q.device, dtype=torch.float32)
    part_ml = torch.empty(n_seq, n_head, n_split, 2, device=q.device, dtype=torch.float32)
    _paged_decode_split_kernel[(n_seq, n_head_kv, n_split)](
        q,
        k_cache,
        v_cache,
        block_table,
        ctx_lens,
        part_o,
        part_ml,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        block_table.stride(0),
        ctx_lens.stride(0),
        scale,
        N_REP=n_rep,
        R_PAD=max(16, triton.next_power_of_2(n_rep)),
        HEAD_DIM=head_dim,
        PAGE=page_size,
        BLOCK_N=64,
        N_SPLIT=n_split,
        num_warps=4,
    )
    _paged_decode_reduce_kernel[(n_seq, n_head)](
        part_o, part_ml, out, out.stride(0), HEAD_DIM=head_dim, N_SPLIT=n_split, num_warps=1
    )
    return out
