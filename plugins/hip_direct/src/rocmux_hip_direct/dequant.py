"""GGML tensor types to float tensors, on the device, in PyTorch.

The block layouts are those of ggml-quants.c (and gguf-py's numpy ``dequantize``,
which the tests compare against). Raw bytes are moved to the device first and unpacked
there, so a GPU does the arithmetic and the host never holds a float copy. Types
without a port here fall back to ``gguf.quants.dequantize`` on the host, one tensor at
a time.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

QK_K = 256
NATIVE = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K})


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes (last dim even) to float32."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 2, n): low nibbles first, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).float()
    return d * q


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).reshape(b.shape[0], 32).float() - 8.0
    return d * q


def _q4_1(b: torch.Tensor, with_min: bool = True) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 4:]).reshape(b.shape[0], 32).float()
    return d * q + _f16(b[:, 2:4]) if with_min else d * q


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    dmin = _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (d.unsqueeze(-1) * sc.unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    dmin = _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qh = b[:, 16:48]
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8).reshape(1, 8, 1)
    high = (qh.reshape(n, 1, 32) >> shifts) & 1
    q = (ql | (high << 4)).float()
    return (d.unsqueeze(-1) * sc.unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, :128]
    qh = b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    low = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((qh.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).float().reshape(n, 16, 16)
    return (d.reshape(n, 1, 1) * scales.reshape(n, 16, 1) * q).reshape(n, QK_K)


_BLOCK_FNS = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}


def dequantize(
    raw: np.ndarray,
    qtype: Q,
    shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_mins: bool = True,
) -> torch.Tensor:
    """``raw`` GGML bytes of ``qtype`` as a ``dtype`` tensor of ``shape`` on ``device``.

    ``with_mins=False`` leaves out the block minimums of Q4_1/Q5_1 (``d * q`` only).
    """
    if not with_mins and qtype == Q.Q5_1:
        full = dequantize(raw, qtype, shape, device, torch.float32)
        mins = block_mins(raw, qtype, shape, device).repeat_interleave(32, dim=1)
        return (full - mins).to(dtype)
    if qtype not in NATIVE:
        # The host dequantizes this one tensor; gguf-py has every other type.
        host = quants.dequantize(np.asarray(raw), qtype).reshape(shape)
        return torch.from_numpy(np.ascontiguousarray(host)).to(device=device, dtype=dtype)
    # One copy of this tensor's bytes: torch cannot wrap the read-only memory map.
    data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)).to(device)
    if qtype == Q.F32:
        out = data.view(torch.float32)
    elif qtype == Q.F16:
        out = data.view(torch.float16)
    elif qtype == Q.BF16:
        out = data.view(torch.bfloat16)
    else:
        type_size = quants.GGML_QUANT_SIZES[qtype][1]
        blocks = data.reshape(-1, type_size)
        out = _q4_1(blocks, with_mins) if qtype == Q.Q4_1 else _BLOCK_FNS[qtype](blocks)
    return out.reshape(shape).to(dtype)


# Types whose blocks carry a minimum (``d * q + m``), at this byte offset.
MIN_OFFSET = {Q.Q4_1: 2, Q.Q5_1: 2}


def block_mins(
    raw: np.ndarray, qtype: Q, shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The per-block minimums of a Q4_1/Q5_1 matrix, (rows, cols / 32) in float32."""
    block, type_size = quants.GGML_QUANT_SIZES[qtype]
    offset = MIN_OFFSET[qtype]
    data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)).to(device)
    mins = _f16(data.reshape(-1, type_size)[:, offset : offset + 2])
    return mins.reshape(shape[0], shape[1] // block)
