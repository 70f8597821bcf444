"""llama.cpp's CPU rounding, reproduced, for token-for-token parity with llama-server.

A small model's greedy output flips on logit differences of a few hundredths, and
llama.cpp's CPU backend does not compute in plain float32:

* a matmul with a quantized weight first quantizes the activations to the weight
  type's "vec_dot" type: 8-bit blocks of 32 with an fp16 scale (Q8_0, and Q8_1 whose
  block sums carry Q4_1/Q5_1's minimum term) or of 256 with a float scale (Q8_K for
  the k-quants); F16/BF16 weights round the activations to that type;
* flash attention (on by default) rounds Q to fp16 and, for fewer than 64 queries,
  accumulates softmax(QK)·V in an fp16 buffer that is rounded after every key.

Rounding the activations is not enough: with this model's outlier features an
activation block's 8-bit rounding flips on a one-ulp change of its input, and each
flip moves the logits by up to hundredths. ``mode="llamacpp"`` therefore reproduces
the x86 (AVX2/AVX-512, GCC, glibc) build bit for bit where it matters: the
quantizers' single float divisions, the Q4_0/Q4_1/Q8_0 dot products' lane order and
fused multiply-adds, RMSNorm's correctly rounded ``sqrtf``, RoPE's contracted
``x0*cos - x1*sin`` with glibc's ``cosf``/``sinf``, flash attention with glibc's
``expf``, and ggml's own ``expf`` in SwiGLU. Checked op by op against the tensors
llama.cpp computes for the default model (SmolLM2-135M Q4_1): every layer's output
is identical; the output head (Q8_0) differs by ~1e-5 in the logits, being summed
in another order. Not reproduced: prompts of 64 or more tokens in one batch (ggml's
tiled float32 attention), decode steps once more than 256 tokens are cached (the
KV view is padded to 512 and ggml splits the keys across threads), and the other
weight types' kernels (repacked Q4_0, K-quants' tiled products: their activations
are rounded, their sums are not ordered as ggml's).

``mode="fast"`` computes in the compute dtype. The tests and
``bench/hip_direct_parity.py`` measure both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
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


def div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """``a / b`` rounded once, as C's float division.

    torch divides by a Python or 0-d scalar as a multiplication by its reciprocal, and
    ``scalar / tensor`` is ``reciprocal(tensor) * scalar``: two roundings, one ulp off
    in about a fifth of cases. ggml's ``amax / 127`` and ``127 / amax`` are single
    divisions, and a one-ulp error in them flips Q8 roundings that sit on a half.
    """
    if not isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        a = torch.full_like(b, a)
    elif not isinstance(b, torch.Tensor) or b.dim() == 0:
        b = torch.full_like(a, float(b))
    return torch.div(a, b)


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
    d = div(amax, 127.0)
    inv = torch.where(amax > 0, div(127.0, amax), torch.zeros_like(amax))
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
    iscale = torch.where(nonzero, div(-127.0, mx), torch.zeros_like(mx))
    q = torch.round(blocks * iscale).clamp(max=127)
    d = torch.where(nonzero, div(1.0, iscale), torch.zeros_like(mx))
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


@functools.cache
def _libm() -> ctypes.CDLL | None:
    """The C math library llama.cpp links (glibc's on Linux), if it can be loaded."""
    name = ctypes.util.find_library("m")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    for fn, n_args in (("cosf", 1), ("sinf", 1), ("powf", 2)):
        getattr(lib, fn).restype = ctypes.c_float
        getattr(lib, fn).argtypes = [ctypes.c_float] * n_args
    return lib


def powf(x: float, y: float) -> float:
    """C's ``powf`` of two floats: libm's when loadable, else correctly rounded."""
    xf, yf = float(np.float32(x)), float(np.float32(y))
    lib = _libm()
    if lib is not None:
        return float(lib.powf(xf, yf))
    return float(np.float32(xf**yf))


def cos_sin_f32(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cosf``/``sinf`` of float32 ``angles``, from libm as ggml_rope_cache_init calls them.

    glibc's cosf/sinf are not correctly rounded: about 1% of their results differ by
    one ulp from ``cos`` in double rounded to float, and RoPE's Q/K carry that into
    the fp16 K cache and the flash-attention dot products. Without libm: the double
    result, rounded.
    """
    lib = _libm()
    flat = angles.float().cpu().reshape(-1)
    if lib is None:
        return flat.double().cos().float().view_as(angles), flat.double().sin().float().view_as(
            angles
        )
    values = flat.tolist()
    cos = torch.tensor([lib.cosf(v) for v in values], dtype=torch.float32)
    sin = torch.tensor([lib.sinf(v) for v in values], dtype=torch.float32)
    return cos.view_as(angles), sin.view_as(angles)


# glibc's expf (sysdeps/ieee754/flt-32/e_expf.c, EXP2F_TABLE_BITS = 5): the table holds
# asuint64(2^(i/32)) - (i << 47); the constants are __exp2f_data's, scaled by N = 32.
_EXPF_N = 32
_EXPF_INVLN2N = float.fromhex("0x1.71547652b82fep+0") * _EXPF_N
_EXPF_C = (
    float.fromhex("0x1.c6af84b912394p-5") / _EXPF_N**3,
    float.fromhex("0x1.ebfce50fac4f3p-3") / _EXPF_N**2,
    float.fromhex("0x1.62e42ff0c52d6p-1") / _EXPF_N,
)
_EXPF_OVERFLOW = float.fromhex("0x1.62e42ep6")  # above: +inf
_EXPF_UNDERFLOW = float.fromhex("-0x1.9fe368p6")  # below: 0


@functools.cache
def _expf_table() -> tuple[int, ...]:
    import decimal

    ctx = decimal.Context(prec=60)
    table = []
    for i in range(_EXPF_N):
        value = float(ctx.power(decimal.Decimal(2), ctx.divide(decimal.Decimal(i), _EXPF_N)))
        bits = int(np.array([value], dtype=np.float64).view(np.int64)[0])
        table.append(bits - (i << 47))
    return tuple(table)


def glibc_expf(x: torch.Tensor) -> torch.Tensor:
    """glibc's ``expf`` (what llama.cpp's flash attention calls), bit for bit.

    It evaluates a degree-3 polynomial in double and rounds once to float, so it
    is not correctly rounded: about 0.06% of its results differ by one ulp from
    ``exp`` in double rounded to float. The FMA build contracts some steps; that
    changes the double result in its last bit, which the rounding to float absorbs.
    """
    xd = x.double()
    z = _EXPF_INVLN2N * xd
    kd = torch.round(z)  # z + 0x1.8p52 - 0x1.8p52: to nearest, ties to even
    ki = kd.long()
    r = z - kd
    table = torch.tensor(_expf_table(), dtype=torch.int64, device=x.device)
    scale = (table[ki & (_EXPF_N - 1)] + (ki << 47)).view(torch.float64)  # 2^(k/N)
    c0, c1, c2 = _EXPF_C
    y = (c2 * r + 1.0) + (c0 * r + c1) * (r * r)
    out = (y * scale).float()
    out = torch.where(xd > _EXPF_OVERFLOW, torch.full_like(out, float("inf")), out)
    return torch.where(xd < _EXPF_UNDERFLOW, torch.zeros_like(out), out)


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
    (B, 1|H, n, L) true where a key is visible. ggml visits the keys in order with an
    online softmax: on a new maximum it scales the fp16 accumulator by
    ``expf(M_old - s)``, otherwise it weighs the key by ``expf(s - M)``; the value
    row is added with one fused multiply-add per element, rounded to fp16
    (``ggml_vec_mad_f16``), and the sum ``S = S*ms + vs`` is one contracted fma.

    Everything that does not depend on the accumulator (scores, running maxima,
    both exponentials, the products ``v*vs``) is computed for all keys at once;
    only the accumulator and ``S`` are carried key by key.
    """
    scores = ggml_dot_f16(q.half().float(), k.float()) * scale  # (B, H, n, L), float32
    visible = mask.expand_as(scores)
    neg_inf = torch.full_like(scores, float("-inf"))
    s = torch.where(visible, scores, neg_inf)
    running = torch.cummax(s, dim=-1).values
    m_old = torch.cat((neg_inf[..., :1], running[..., :-1]), dim=-1)  # M before each key
    new_max = visible & (s > m_old)
    one = torch.ones_like(scores)
    ms = torch.where(new_max, glibc_expf(m_old - s), one)
    vs = torch.where(new_max, one, glibc_expf(s - m_old))
    vs = torch.where(visible, vs, torch.zeros_like(vs))
    # v*vs is exact in double (11 x 24 bits); adding the fp16 accumulator and
    # rounding to float once is the fma.
    prod = v.double().unsqueeze(2) * vs.double().unsqueeze(-1)  # (B, H, n, L, D)
    rescale = new_max.any(dim=(0, 1, 2)).tolist()  # keys where some row scales
    if q.device.type == "cpu":
        out = _fa_loop_numpy(prod.numpy(), ms.numpy(), vs.numpy(), rescale)
        acc, s_sum = torch.from_numpy(out[0]), torch.from_numpy(out[1])
    else:
        acc, s_sum = _fa_loop_torch(prod, ms, vs, rescale)
    inv = torch.where(s_sum == 0, torch.zeros_like(s_sum), 1.0 / s_sum)
    return acc.float() * inv.unsqueeze(-1)


def _fa_loop_numpy(
    prod: np.ndarray, ms: np.ndarray, vs: np.ndarray, rescale: list[bool]
) -> tuple[np.ndarray, np.ndarray]:
    """The key-by-key part of :func:`fa_f16_attention`, in numpy (cheaper calls)."""
    shape = prod.shape[:3] + prod.shape[4:]
    acc = np.zeros(shape, dtype=np.float16)
    acc32 = np.empty(shape, dtype=np.float32)
    s_sum = np.zeros(shape[:3], dtype=np.float32)
    s64 = np.empty(shape[:3], dtype=np.float64)
    ms64 = ms.astype(np.float64)
    for ic, scaled in enumerate(rescale):
        if scaled:  # ggml_vec_scale_f16: float product, rounded to fp16
            np.multiply(acc, ms[..., ic, None], out=acc32)
            acc[...] = acc32
        np.add(acc, prod[..., ic, :], out=acc32, casting="unsafe")  # one rounding
        acc[...] = acc32
        np.multiply(s_sum, ms64[..., ic], out=s64)  # exact
        np.add(s64, vs[..., ic], out=s_sum, casting="unsafe")
    return acc, s_sum


def _fa_loop_torch(
    prod: torch.Tensor, ms: torch.Tensor, vs: torch.Tensor, rescale: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_fa_loop_numpy` with torch operations (other devices)."""
    b, h, n, _, d = prod.shape
    acc = torch.zeros(b, h, n, d, dtype=torch.float16, device=prod.device)
    s_sum = torch.zeros(b, h, n, device=prod.device)
    for ic, scaled in enumerate(rescale):
        if scaled:
            acc = (acc.float() * ms[..., ic, None]).half()
        acc = (acc.double() + prod[..., ic, :]).float().half()
        s_sum = (s_sum.double() * ms[..., ic].double() + vs[..., ic].double()).float()
    return acc, s_sum


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
    :func:`ggml_block_matmul`: the numbers llama.cpp's dot products read.

    ``q`` is laid out (4, n_blocks, 8, out): quant ``j`` of the group of four that
    SIMD lane ``l`` of block ``b`` sums, for every output row (contiguous, so the
    lane products broadcast over long rows); ``d`` and ``m`` are (n_blocks, out).
    """

    def __init__(self, qtype: Q, raw: torch.Tensor, out_features: int) -> None:
        blocks = raw.reshape(-1, {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}[qtype])
        self.qtype = qtype
        d = blocks[:, :2].contiguous().view(torch.float16).float().reshape(out_features, -1)
        self.d = d.T.contiguous()
        self.m: torch.Tensor | None = None
        if qtype == Q.Q8_0:
            q = blocks[:, 2:].contiguous().view(torch.int8).float()
        else:
            qs = blocks[:, 4:] if qtype == Q.Q4_1 else blocks[:, 2:]
            q = torch.stack((qs & 0x0F, qs >> 4), dim=-2).reshape(-1, 32).float()
            if qtype == Q.Q4_0:
                q = q - 8.0
            else:
                m = blocks[:, 2:4].contiguous().view(torch.float16).float()
                self.m = m.reshape(out_features, -1).T.contiguous()
        nb = self.d.shape[0]
        self.q = q.reshape(out_features, nb, 8, 4).permute(3, 1, 2, 0).contiguous()
        self.out_features = out_features
        self.n_blocks = nb

    @classmethod
    def concat(cls, parts: list[BlockWeight]) -> BlockWeight:
        """One matrix of ``parts`` stacked along the output (same type and width)."""
        out = cls.__new__(cls)
        out.qtype = parts[0].qtype
        out.d = torch.cat([p.d for p in parts], dim=1)
        mins = [p.m for p in parts if p.m is not None]
        out.m = torch.cat(mins, dim=1) if len(mins) == len(parts) else None
        out.q = torch.cat([p.q for p in parts], dim=3)
        out.out_features = sum(p.out_features for p in parts)
        out.n_blocks = parts[0].n_blocks
        return out


def ggml_block_matmul(x: torch.Tensor, w: BlockWeight, max_elements: int = 1 << 22) -> torch.Tensor:
    """x @ W.T as llama.cpp's x86 ``ggml_vec_dot_q{4_0,4_1,8_0}_q8_{0,1}`` compute it.

    The activations are quantized to Q8 blocks (``quantize_row_q8_{0,1}``). For each
    block, each of 8 SIMD lanes holds the integer dot product of 4 quants
    (``dpbusd``), and ``acc = fma(d_x*d_y, lane, acc)`` rounds once per block and
    lane; the lanes are reduced as ``hsum_float_8`` does. Q4_1 adds
    ``summs = fma(m, s, summs)`` block by block (GCC contracts it), then
    ``hsum + summs``. The products are exact in double, so each step is a double
    addition rounded to float once: the fma.
    """
    t = x.shape[0]
    nb, n_out = w.n_blocks, w.out_features
    blocks = x.float().reshape(t, nb, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = div(amax, 127.0)
    inv = torch.where(amax > 0, div(127.0, amax), torch.zeros_like(amax))
    qy = torch.round(blocks * inv)  # round half to even, as _mm256_round_ps
    d_y = d.half().float().squeeze(-1).T  # (nb, t), the fp16 scale as the dot reads it
    qy_lanes = qy.reshape(t, nb, 8, 4).permute(3, 1, 0, 2).contiguous()  # (4, nb, t, 8)
    sums = None
    if w.m is not None:  # block_q8_1.s = fp16(d * sum(q))
        sums = (d * qy.sum(-1, keepdim=True)).half().float().squeeze(-1).T  # (nb, t)
    out = torch.empty(t, n_out, device=x.device)
    step = max(1, max_elements // (nb * 8 * n_out))
    for t0 in range(0, t, step):
        t1 = min(t0 + step, t)
        # Integer products and sums below 2^24: exact in float32. (nb, t, 8, out)
        lanes = qy_lanes[0, :, t0:t1, :, None] * w.q[0, :, None]
        for j in range(1, 4):
            lanes.addcmul_(qy_lanes[j, :, t0:t1, :, None], w.q[j, :, None])
        scale = w.d[:, None, :] * d_y[:, t0:t1, None]  # float32 products, as _mm256_mul_ps
        mins = None
        if sums is not None and w.m is not None:
            mins = (w.m[:, None, :], sums[:, t0:t1, None])
        acc, summs = _fma_chains(lanes, scale, mins)
        a = [acc[:, lane] for lane in range(8)]
        total = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
        if summs is not None:
            total = total + summs
        out[t0:t1] = total
    return out.to(x.dtype)


# Per-block chains at least this large (elements) are split across threads.
_PARALLEL_CHAIN = 1 << 17


def _fma_chains(
    lanes: torch.Tensor,
    scale: torch.Tensor,
    mins: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``acc = fma(scale[b], lanes[b], acc)`` for each block b in order, from zero, and
    ``summs = fma(m[b], s[b], summs)`` likewise.

    The products are exact in double and so is each sum with the float32 accumulator
    (their exponents are close), so one rounding to float32 per step is the fma.
    numpy adds a float32 and a float64 array into a float32 one in a single call,
    keeping the per-block work small; other devices take torch's three.
    """
    if lanes.device.type != "cpu":
        return _fma_chains_torch(lanes, scale, mins)
    lane_np, scale_np = lanes.numpy(), scale.double().numpy()[:, :, None, :]
    acc = np.zeros(lane_np.shape[1:], dtype=np.float32)
    summs = m_np = s_np = None
    if mins is not None:
        m_np, s_np = mins[0].double().numpy(), mins[1].double().numpy()
        summs = np.zeros(np.broadcast_shapes(m_np.shape[1:], s_np.shape[1:]), np.float32)
    n_out = acc.shape[-1]
    n_threads = min(torch.get_num_threads(), max(1, acc.size // _PARALLEL_CHAIN), n_out)
    if n_threads <= 1:
        _chain_np(lane_np, scale_np, acc, m_np, s_np, summs)
    else:
        # Each output column's chain is independent; numpy releases the GIL.
        bounds = np.linspace(0, n_out, n_threads + 1).astype(int).tolist()

        def part(i: int) -> None:
            cols = slice(bounds[i], bounds[i + 1])
            _chain_np(
                lane_np[..., cols],
                scale_np[..., cols],
                acc[..., cols],
                None if m_np is None else m_np[..., cols],
                s_np,
                None if summs is None else summs[..., cols],
            )

        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(part, range(n_threads)))
    return torch.from_numpy(acc), None if summs is None else torch.from_numpy(summs)


def _chain_np(
    lanes: np.ndarray,
    scale: np.ndarray,
    acc: np.ndarray,
    m: np.ndarray | None,
    s: np.ndarray | None,
    summs: np.ndarray | None,
) -> None:
    """The loop of :func:`_fma_chains` on numpy arrays, into ``acc`` and ``summs``."""
    prod = np.empty(acc.shape, dtype=np.float64)
    prod9 = None if summs is None else np.empty(summs.shape, dtype=np.float64)
    for b in range(lanes.shape[0]):
        np.multiply(lanes[b], scale[b], out=prod)  # exact
        np.add(acc, prod, out=acc, casting="unsafe")  # rounded once
        if summs is not None and m is not None and s is not None and prod9 is not None:
            np.multiply(m[b], s[b], out=prod9)
            np.add(summs, prod9, out=summs, casting="unsafe")


def _fma_chains_torch(
    lanes: torch.Tensor,
    scale: torch.Tensor,
    mins: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_fma_chains` in torch operations (other devices)."""
    acc = torch.zeros(lanes.shape[1:], device=lanes.device)
    summs = None
    for b in range(lanes.shape[0]):
        exact = lanes[b].double() * scale[b][:, None, :].double()
        acc = (acc.double() + exact).float()
        if mins is not None:
            m9 = mins[0][b].double() * mins[1][b].double()
            summs = m9.float() if summs is None else (summs.double() + m9).float()
    return acc, summs
