"""llama.cpp's CPU rounding, reproduced, for token-for-token parity with llama-server.

A small model's greedy output flips on logit differences of a few hundredths, and
llama.cpp's CPU backend does not compute in plain float32:

* a matmul with a quantized weight first quantizes the activations to the weight
  type's "vec_dot" type: 8-bit blocks of 32 with an fp16 scale (Q8_0, and Q8_1 whose
  block sums carry Q4_1/Q5_1's minimum term) or of 256 with a float scale (Q8_K for
  the k-quants); F16/BF16 weights round the activations to that type;
* flash attention (on by default) rounds Q to fp16 and, for fewer than 64 queries,
  accumulates softmax(QK)·V in an fp16 buffer that is rounded after every key.

``mode="llamacpp"`` reproduces these steps; ``mode="fast"`` computes in the compute
dtype. The tests and ``bench/hip_direct_parity.py`` measure both.
"""

from __future__ import annotations

from typing import Literal

import torch
from gguf import GGMLQuantizationType as Q

ActQuant = Literal["q8_0", "q8_1", "q8_K", "f16", "bf16"]
Numerics = Literal["fast", "llamacpp"]

# ggml-cpu's type_traits_cpu[type].vec_dot_type, for the activation side.
_Q8_0_TYPES = {Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL, Q.MXFP4}
_Q8_1_TYPES = {Q.Q4_1, Q.Q5_1}
_Q8_K_TYPES = {
    Q.Q2_K,
    Q.Q3_K,
    Q.Q4_K,
    Q.Q5_K,
    Q.Q6_K,
    Q.IQ2_XXS,
    Q.IQ2_XS,
    Q.IQ2_S,
    Q.IQ3_XXS,
    Q.IQ3_S,
    Q.IQ1_S,
    Q.IQ1_M,
    Q.IQ4_XS,
    Q.TQ1_0,
    Q.TQ2_0,
}
# Below this many queries llama.cpp's CPU flash attention takes the fp16 path.
FA_TILE_Q = 64


def act_quant_for(qtype: Q) -> ActQuant | None:
    """How llama.cpp's CPU backend rounds activations multiplied by a ``qtype`` weight."""
    if qtype in _Q8_0_TYPES:
        return "q8_0"
    if qtype in _Q8_1_TYPES:
        return "q8_1"
    if qtype in _Q8_K_TYPES:
        return "q8_K"
    if qtype == Q.F16:
        return "f16"
    if qtype == Q.BF16:
        return "bf16"
    return None


def quantize_q8_32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded as quantize_row_q8_1 (x86) does, and each block's fp16 ``s = d*sum(q)``.

    Returns (x_hat, s) with s shaped (..., n/32); Q8_0 is the same without ``s``.
    """
    shape = x.shape
    blocks = x.float().reshape(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)  # round half to even, as _mm256_round_ps
    x_hat = (q * d.half().float()).reshape(shape)
    s = (d * q.sum(-1, keepdim=True)).half().float()
    return x_hat.to(x.dtype), s.reshape(*shape[:-1], shape[-1] // 32)


def quantize_q8_k(x: torch.Tensor) -> torch.Tensor:
    """x rounded as quantize_row_q8_K_ref: blocks of 256, float scale ``-max/127``."""
    shape = x.shape
    blocks = x.float().reshape(-1, 256)
    idx = blocks.abs().argmax(-1, keepdim=True)  # first of equal maxima, as the C loop
    mx = torch.gather(blocks, -1, idx)
    nonzero = mx != 0
    iscale = torch.where(nonzero, -127.0 / mx, torch.zeros_like(mx))
    q = torch.round(blocks * iscale).clamp(max=127)
    d = torch.where(nonzero, 1.0 / iscale, torch.zeros_like(mx))
    return (q * d).reshape(shape).to(x.dtype)


def round_activations(x: torch.Tensor, kind: ActQuant) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activations as llama.cpp's matmul sees them; the Q8_1 block sums when ``kind`` is q8_1."""
    if kind == "q8_0":
        return quantize_q8_32(x)[0], None
    if kind == "q8_1":
        return quantize_q8_32(x)
    if kind == "q8_K":
        return quantize_q8_k(x), None
    if kind == "f16":
        return x.half().to(x.dtype), None
    return x.bfloat16().to(x.dtype), None


def _expf(x: torch.Tensor) -> torch.Tensor:
    """expf correctly rounded (computed in double), as glibc's expf returns it."""
    return torch.exp(x.double()).float()


def ggml_dot_f16(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Q·K for every query/key pair, summed in ggml_vec_dot_f16's AVX-512 order.

    ``q`` (..., n, D) and ``k`` (..., L, D) hold fp16 values, so each product is exact
    in float32; ggml keeps four 16-lane accumulators over steps of 64, folds them
    (0+2, 1+3, then 0+1) and reduces the 16 lanes as ``_mm512_reduce_add_ps`` does.
    """
    d = q.shape[-1]
    if d % 64:
        return q @ k.transpose(-1, -2)
    prod = q.unsqueeze(-2) * k.unsqueeze(-3)  # (..., n, L, D), exact
    steps = prod.unflatten(-1, (d // 64, 4, 16))
    acc = steps[..., 0, :, :]
    for i in range(1, d // 64):
        acc = acc + steps[..., i, :, :]  # fma with an exact product: one rounding
    lanes = (acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])
    t3 = lanes[..., 8:] + lanes[..., :8]
    t6 = t3[..., 4:] + t3[..., :4]
    return (t6[..., 0] + t6[..., 2]) + (t6[..., 1] + t6[..., 3])


def fa_f16_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """ggml's CPU flash attention for F16 K/V (``flash_attn_ext_f16_one_chunk``).

    ``q`` (B, H, n, D) float, ``k``/``v`` (B, H, L, D) holding fp16 values, ``mask``
    (B, 1|H, n, L) true where a key is visible. Keys are visited in order with an
    online softmax; the V accumulator is fp16, rounded after each fused multiply-add
    and each rescale, exactly as ``ggml_vec_mad_f16``/``ggml_vec_scale_f16`` do.
    """
    scores = ggml_dot_f16(q.half().float(), k.float()) * scale  # (B, H, n, L), float32
    visible = mask.expand_as(scores)
    b, h, n, length = scores.shape
    dv = v.shape[-1]
    acc = torch.zeros(b, h, n, dv, dtype=torch.float16, device=q.device)
    m = torch.full((b, h, n), float("-inf"), device=q.device)
    s_sum = torch.zeros(b, h, n, device=q.device)
    v64 = v.double()
    one = torch.ones((), device=q.device)
    for ic in range(length):
        s = scores[..., ic]
        valid = visible[..., ic]
        new_max = valid & (s > m)
        ms = torch.where(new_max, _expf(m - s), one)
        vs = torch.where(new_max, one, _expf(s - m))
        vs = torch.where(valid, vs, torch.zeros_like(vs))
        scaled = (acc.float() * ms.unsqueeze(-1)).half()
        acc = torch.where(new_max.unsqueeze(-1), scaled, acc)
        # fma(v, vs, acc) in float32, then stored as fp16.
        fused = (acc.double() + v64[..., ic : ic + 1, :] * vs.double().unsqueeze(-1)).float()
        acc = torch.where(valid.unsqueeze(-1), fused.half(), acc)
        m = torch.where(new_max, s, m)
        s_sum = _fma(s_sum, ms, vs)  # GCC may contract S*ms + vs into an fma
    inv = torch.where(s_sum == 0, torch.zeros_like(s_sum), 1.0 / s_sum)
    return acc.float() * inv.unsqueeze(-1)


def _h(literal: str) -> float:
    """A C hex-float literal (ggml writes its polynomial constants that way)."""
    return float.fromhex(literal)


def _fma(a: torch.Tensor, b: float | torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Fused multiply-add of float32 values, rounded once (through float64)."""
    b64 = b.double() if isinstance(b, torch.Tensor) else b
    c64 = c.double() if isinstance(c, torch.Tensor) else c
    return (a.double() * b64 + c64).float()


def ggml_expf(x: torch.Tensor) -> torch.Tensor:
    """ggml's AVX-512 ``ggml_v_expf`` (ARM optimized-routines polynomial), bit for bit."""
    x = x.float()
    r = _h("0x1.8p23")
    z = _fma(x, _h("0x1.715476p0"), r)
    n = z - r
    b = _fma(-n, _h("0x1.7F7D1Cp-20"), _fma(-n, _h("0x1.62E4p-1"), x))
    u = b * b
    j = _fma(
        _fma(
            _fma(torch.full_like(b, _h("0x1.0E402p-7")), b, _h("0x1.573E2Ep-5")),
            u,
            _fma(torch.full_like(b, _h("0x1.555E66p-3")), b, _h("0x1.FFFDB6p-2")),
        ),
        u,
        _fma(torch.full_like(b, _h("0x1.FFFFECp-1")), b, 1.0),
    )
    res = torch.ldexp(j, n)
    big = n.abs() > 192
    if bool(big.any()):
        alt = torch.where(n <= 0, torch.zeros_like(res), torch.full_like(res, float("inf")))
        res = torch.where(big, alt, res)
    return res


def ggml_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up as ggml_vec_swiglu_f32 computes it with AVX-512."""
    g = gate.float()
    return (g / (1.0 + ggml_expf(-g))) * up.float()


class BlockWeight:
    """A Q4_0/Q4_1/Q8_0 matrix kept as integer quants and block scales, for
    :func:`ggml_block_matmul`: the bytes llama.cpp's dot products read."""

    def __init__(self, qtype: Q, raw: torch.Tensor, out_features: int) -> None:
        blocks = raw.reshape(-1, {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}[qtype])
        self.qtype = qtype
        self.d = blocks[:, :2].contiguous().view(torch.float16).float().reshape(out_features, -1)
        self.m: torch.Tensor | None = None
        if qtype == Q.Q8_0:
            q = blocks[:, 2:].contiguous().view(torch.int8).float()
        else:
            qs = blocks[:, 4:] if qtype == Q.Q4_1 else blocks[:, 2:]
            q = torch.stack((qs & 0x0F, qs >> 4), dim=-2).reshape(-1, 32).float()
            if qtype == Q.Q4_0:
                q = q - 8.0
            else:
                self.m = blocks[:, 2:4].contiguous().view(torch.float16).float()
                self.m = self.m.reshape(out_features, -1)
        nb = self.d.shape[1]
        # (nb*8, out, 4): group g = block*8 + lane holds the 4 quants one SIMD lane sums.
        self.q = q.reshape(out_features, nb * 8, 4).transpose(0, 1).contiguous()
        self.out_features = out_features
        self.n_blocks = nb


def ggml_block_matmul(x: torch.Tensor, w: BlockWeight, chunk: int = 8192) -> torch.Tensor:
    """x @ W.T as llama.cpp's x86 ``ggml_vec_dot_q{4_0,4_1,8_0}_q8_{0,1}`` compute it.

    The activations are quantized to Q8 blocks (``quantize_row_q8_{0,1}``); each block's
    integer dot products are summed in 8 SIMD lanes of 4 quants, scaled by the product
    of the two fp16 scales and accumulated with one fused multiply-add per block and
    lane; the lanes are reduced in ``hsum_float_8``'s order; Q4_1 adds the minimum
    term ``sum(m * s)`` block by block. Every rounding happens where it happens in C.
    """
    t = x.shape[0]
    nb = w.n_blocks
    blocks = x.float().reshape(t, nb, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    qy = torch.round(blocks * inv)  # (t, nb, 32)
    d_y = d.half().float().squeeze(-1)  # (t, nb)
    qy_groups = qy.reshape(t, nb * 8, 4).permute(1, 2, 0)  # (nb*8, 4, t)
    out = torch.empty(t, w.out_features, device=x.device)
    sums = None
    if w.m is not None:
        sums = (d * qy.sum(-1, keepdim=True)).half().float().squeeze(-1)  # (t, nb)
    for o0 in range(0, w.out_features, chunk):
        o1 = min(o0 + chunk, w.out_features)
        lanes = torch.bmm(w.q[:, o0:o1], qy_groups)  # (nb*8, o, t), exact integers
        lanes = lanes.reshape(nb, 8, o1 - o0, t).permute(3, 2, 0, 1).double()  # (t, o, nb, 8)
        scale = (w.d[o0:o1].unsqueeze(0) * d_y.unsqueeze(1)).double()  # (t, o, nb) float prods
        acc = torch.zeros(t, o1 - o0, 8, dtype=torch.float64, device=x.device)
        for b in range(nb):
            acc = (scale[:, :, b : b + 1] * lanes[:, :, b] + acc).float().double()
        a = acc.float()
        total = ((a[..., 0] + a[..., 4]) + (a[..., 2] + a[..., 6])) + (
            (a[..., 1] + a[..., 5]) + (a[..., 3] + a[..., 7])
        )
        if sums is not None and w.m is not None:
            summs = torch.zeros(t, o1 - o0, device=x.device)
            for b in range(nb):
                summs = summs + w.m[o0:o1, b].unsqueeze(0) * sums[:, b : b + 1]
            total = total + summs
        out[:, o0:o1] = total
    return out.to(x.dtype)
