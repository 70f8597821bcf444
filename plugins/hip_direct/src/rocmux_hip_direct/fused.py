"""Fused operations of the GPU fast path, each with its eager PyTorch version.

On a GPU with Triton installed (CUDA or ROCm) the functions here run the kernels of
:mod:`rocmux_hip_direct.kernels`; elsewhere, or with ``ROCMUX_HIP_DIRECT_TRITON=0``,
the eager versions below, which are also the references the tests hold the kernels to.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch
import torch.nn.functional as F


@functools.cache
def _kernels() -> ModuleType | None:
    if os.environ.get("ROCMUX_HIP_DIRECT_TRITON", "1") == "0":
        return None
    try:
        return importlib.import_module("rocmux_hip_direct.kernels")
    except ImportError:  # no triton: the eager versions serve
        return None


def triton_available() -> bool:
    """Whether the Triton kernels can be used (on a GPU tensor)."""
    return _kernels() is not None


def _use_triton(t: torch.Tensor) -> ModuleType | None:
    return _kernels() if t.is_cuda else None


# -- eager versions -----------------------------------------------------------------------


def add_rms_norm_eager(
    residual: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if delta is not None:
        residual += delta.float()
    x = residual.float()
    scale = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    return (x * scale * weight.float()).to(out_dtype)


def swiglu_eager(gate_up: torch.Tensor) -> torch.Tensor:
    n_ff = gate_up.shape[-1] // 2
    g, u = gate_up[:, :n_ff].float(), gate_up[:, n_ff:].float()
    return (F.silu(g) * u).to(gate_up.dtype)


def _rotate(x: torch.Tensor, cs: torch.Tensor, neox: bool, n_dims: int) -> torch.Tensor:
    """x (T, H, D) rotated on its first ``n_dims`` dims by cs (T, n_dims/2, 2), float32."""
    cos = cs[..., 0].unsqueeze(1)
    sin = cs[..., 1].unsqueeze(1)
    xf = x.float()
    rot, rest = xf[..., :n_dims], xf[..., n_dims:]
    if neox:
        x0, x1 = rot[..., : n_dims // 2], rot[..., n_dims // 2 :]
        out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1).to(x.dtype)


def rope_store_eager(
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
    n_tok = qkv.shape[0]
    dq, dk = n_head * head_dim, n_head_kv * head_dim
    cs = rope[positions.long()]
    q = qkv[:, :dq].view(n_tok, n_head, head_dim)
    k = qkv[:, dq : dq + dk].view(n_tok, n_head_kv, head_dim)
    v = qkv[:, dq + dk :].view(n_tok, n_head_kv, head_dim)
    q.copy_(_rotate(q, cs, neox, rope_dims))
    k.copy_(_rotate(k, cs, neox, rope_dims))
    keep = slots >= 0
    idx = slots[keep].long()
    k_cache[idx] = k[keep].to(k_cache.dtype)
    v_cache[idx] = v[keep].to(v_cache.dtype)


def paged_decode_attention_eager(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    page_size: int,
    scale: float,
    n_split: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    n_seq, n_head, head_dim = q.shape
    n_rep = n_head // k_cache.shape[1]
    result = torch.zeros(n_seq, n_head * head_dim, device=q.device, dtype=q.dtype)
    for b in range(n_seq):
        n_ctx = int(ctx_lens[b])
        if n_ctx == 0:
            continue
        pos = torch.arange(n_ctx, device=q.device)
        slots = block_table[b, pos // page_size].long() * page_size + pos % page_size
        k = k_cache[slots].to(q.dtype).transpose(0, 1)  # (Hkv, L, D)
        v = v_cache[slots].to(q.dtype).transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[b].unsqueeze(1), k, v, scale=scale, enable_gqa=n_rep > 1
        )  # (H, 1, D)
        result[b] = o.reshape(-1)
    if out is not None:
        out.copy_(result)
        return out
    return result


# -- dispatch -----------------------------------------------------------------------------


def add_rms_norm(
    residual: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """RMSNorm of ``residual + delta``, scaled by ``weight``, in ``out_dtype``.

    ``residual`` (T, D) float32 is updated in place to ``residual + delta`` (when
    ``delta`` is given): the residual add and the next layer's norm in one pass.
    """
    k = _use_triton(residual)
    if k is not None:
        return k.add_rms_norm(residual, delta, weight, eps, out_dtype)
    return add_rms_norm_eager(residual, delta, weight, eps, out_dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a (T, 2F) [gate | up] matrix, computed in float32."""
    k = _use_triton(gate_up)
    if k is not None:
        return k.swiglu(gate_up)
    return swiglu_eager(gate_up)


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
    """Rotate Q and K of a packed (T, (H + 2 Hkv) D) [q | k | v] matrix in place and
    write each token's K and V to its cache slot (``slots`` < 0: not written).

    ``rope`` is the (n_pos, rope_dims/2, 2) cos/sin table; ``k_cache``/``v_cache`` one
    layer's (n_slots, Hkv, D) tensors. ``neox`` picks the halves layout over adjacent
    pairs.
    """
    k = _use_triton(qkv)
    fn = k.rope_store if k is not None else rope_store_eager
    fn(
        qkv,
        positions,
        slots,
        rope,
        k_cache,
        v_cache,
        n_head,
        n_head_kv,
        head_dim,
        rope_dims,
        neox,
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    page_size: int,
    scale: float,
    n_split: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence (q: (B, H, D)) over its cached context.

    Sequence ``b`` attends to its first ``ctx_lens[b]`` positions, whose slots are
    ``block_table[b, p // page_size] * page_size + p % page_size``. Returns (B, H * D);
    a sequence with ``ctx_lens`` 0 (batch padding) gets zeros. ``n_split`` cuts each
    context into that many slices run in parallel (split-K), merged afterwards.
    """
    k = _use_triton(q)
    fn = k.paged_decode_attention if k is not None else paged_decode_attention_eager
    return fn(q, k_cache, v_cache, block_table, ctx_lens, page_size, scale, n_split, out)
