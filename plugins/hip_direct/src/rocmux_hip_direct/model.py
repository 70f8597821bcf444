"""The llama-family forward pass in PyTorch over a paged KV cache.

The graph follows llama.cpp's ``llm_build_llama`` (and its qwen2/qwen3 variants):
RMSNorm, Q/K/V projections (+bias for qwen2, per-head RMSNorm for qwen3), RoPE as
ggml computes it, grouped-query attention over the cached keys and values, output
projection, SwiGLU feed-forward, and the output head (``token_embd`` when the model
ties it). One call runs a flattened batch that mixes prompt chunks and single decode
tokens of many sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from rocmux_hip_direct.dequant import MIN_OFFSET, block_mins, dequantize
from rocmux_hip_direct.gguf_file import GGUFFile
from rocmux_hip_direct.hparams import HParams, UnsupportedModel
from rocmux_hip_direct.numerics import (
    FA_TILE_Q,
    ActQuant,
    BlockWeight,
    Numerics,
    act_quant_for,
    cos_sin_f32,
    fa_f16_attention,
    ggml_block_matmul,
    ggml_swiglu,
    powf,
    round_activations,
)

BLOCK_TYPES = frozenset(
    {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0}
)


@attrs.define(eq=False)
class Linear:
    """A (out, in) weight in the compute dtype, with what llama.cpp mode needs.

    In llama.cpp mode a Q4_1/Q5_1 weight keeps its per-block minimums apart
    (``weight`` is then ``d * q`` only), because llama.cpp multiplies them with the
    fp16-rounded block sums of the activations, not with the rounded activations.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    act: ActQuant | None = None
    mins: torch.Tensor | None = None
    blocks: BlockWeight | None = None  # llama.cpp mode, Q4_0/Q4_1/Q8_0: exact dot order

    def __call__(self, x: torch.Tensor, emulate: bool) -> torch.Tensor:
        if not emulate or self.act is None:
            return F.linear(x, self.weight, self.bias)
        if self.blocks is not None:
            y = ggml_block_matmul(x, self.blocks)
            return y + self.bias if self.bias is not None else y
        x_hat, block_sums = round_activations(x, self.act)
        y = F.linear(x_hat, self.weight, self.bias)
        if self.mins is not None and block_sums is not None:
            y = y + block_sums.to(y.dtype) @ self.mins.T.to(y.dtype)
        return y


@attrs.define(eq=False)
class Layer:
    """One transformer block's weights."""

    attn_norm: torch.Tensor
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    ffn_norm: torch.Tensor
    w_gate: Linear
    w_up: Linear
    w_down: Linear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    # llama.cpp mode: Q/K/V and gate/up stacked, each pair of one input computed in
    # one exact block product (fewer sequential steps, the same numbers).
    qkv: BlockWeight | None = None
    gate_up: BlockWeight | None = None

    def fuse_blocks(self) -> None:
        """Stack the block weights that share an input, where their types agree."""
        for name, parts in (
            ("qkv", (self.wq, self.wk, self.wv)),
            ("gate_up", (self.w_gate, self.w_up)),
        ):
            blocks = [p.blocks for p in parts]
            if all(b is not None for b in blocks) and len({b.qtype for b in blocks if b}) == 1:
                setattr(self, name, BlockWeight.concat([b for b in blocks if b is not None]))
                for part in parts:
                    part.blocks = None

    def project_qkv(
        self, h: torch.Tensor, emulate: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K and V of ``h``."""
        if not emulate or self.qkv is None:
            return self.wq(h, emulate), self.wk(h, emulate), self.wv(h, emulate)
        sizes = [lin.weight.shape[0] for lin in (self.wq, self.wk, self.wv)]
        outs = ggml_block_matmul(h, self.qkv).split(sizes, dim=-1)
        return tuple(  # type: ignore[return-value]
            y + lin.bias if lin.bias is not None else y
            for y, lin in zip(outs, (self.wq, self.wk, self.wv), strict=True)
        )

    def gate_and_up(self, h: torch.Tensor, emulate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections of ``h``."""
        if not emulate or self.gate_up is None:
            return self.w_gate(h, emulate), self.w_up(h, emulate)
        gate, up = ggml_block_matmul(h, self.gate_up).split(
            [self.w_gate.weight.shape[0], self.w_up.weight.shape[0]], dim=-1
        )
        return gate, up


@attrs.define(eq=False)
class SeqBatch:
    """One sequence's part of a batch: rows ``start:start+n`` of the flattened tokens.

    ``ctx_slots`` are the KV-cache slots of positions ``0 .. pos0+n-1`` (the tokens
    already cached followed by this chunk).
    """

    start: int
    n: int
    pos0: int
    ctx_slots: torch.Tensor


def rope_cache(
    hp: HParams, n_pos: int, freq_factors: torch.Tensor | None, libm: bool = False
) -> torch.Tensor:
    """(n_pos, rope_dims/2, 2) cos/sin, computed as ggml_rope_cache_init does.

    ggml advances theta by repeated float32 multiplication, so this does too: the
    angles then match llama.cpp's to the last bit instead of to a few ulps. With
    ``libm`` the C library's ``powf``/``cosf``/``sinf`` give the values themselves
    (glibc's are not correctly rounded; llama.cpp uses them).
    """
    half = hp.rope_dims // 2
    # powf(freq_base, -2.0f/n_dims): the exponent is a float too.
    exponent = float(np.float32(-2.0) / np.float32(hp.rope_dims))
    if libm:
        theta_scale = torch.tensor(powf(hp.rope_base, exponent), dtype=torch.float32)
    else:
        theta_scale = torch.tensor(hp.rope_base, dtype=torch.float64).pow(exponent).float()
    pos = torch.arange(n_pos, dtype=torch.float32)
    thetas = torch.empty(n_pos, half, dtype=torch.float32)
    theta = pos.clone()
    for i in range(half):
        thetas[:, i] = theta
        theta = theta * theta_scale
    if freq_factors is not None:
        thetas = thetas / freq_factors.float().cpu()[:half]
    freq_scale = hp.rope_freq_scale
    mscale = hp.rope_attn_factor
    theta_interp = freq_scale * thetas
    if hp.rope_ext_factor != 0.0:
        low, high = _yarn_corr_dims(hp)
        i0 = torch.arange(half, dtype=torch.float32) * 2
        y = (i0 / 2 - low) / max(0.001, high - low)
        ramp = (1 - y.clamp(0, 1)) * hp.rope_ext_factor
        angles = theta_interp * (1 - ramp) + thetas * ramp
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    else:
        angles = theta_interp
    if libm:
        cos, sin = cos_sin_f32(angles)
    else:  # correctly rounded: computed in double, rounded once
        cos, sin = angles.double().cos().float(), angles.double().sin().float()
    return torch.stack((cos * mscale, sin * mscale), dim=-1)


def _yarn_corr_dims(hp: HParams) -> tuple[float, float]:
    def corr_dim(n_rot: float) -> float:
        return (
            hp.rope_dims
            * math.log(hp.rope_n_ctx_orig / (n_rot * 2 * math.pi))
            / (2 * math.log(hp.rope_base))
        )

    start = math.floor(corr_dim(hp.rope_beta_fast))
    end = math.ceil(corr_dim(hp.rope_beta_slow))
    return max(0.0, start), min(hp.rope_dims - 1.0, end)


def apply_rope(
    x: torch.Tensor, cs: torch.Tensor, mode: str, n_dims: int, fused: bool = False
) -> torch.Tensor:
    """Rotate the first ``n_dims`` of each head of ``x`` (T, H, D) by ``cs`` (T, n_dims/2, 2).

    ``fused``: float32 as ggml's ``rotate_pairs`` compiles with FMA contraction (GCC's
    default): ``fma(x0, cos, -(x1*sin))`` and ``fma(x0, sin, x1*cos)``, the first
    product exact and one rounding for the sum.
    """
    cos = cs[..., 0].unsqueeze(1).to(x.dtype)
    sin = cs[..., 1].unsqueeze(1).to(x.dtype)
    rot, rest = x[..., :n_dims], x[..., n_dims:]
    if mode == "normal":  # adjacent pairs (x[2i], x[2i+1])
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
    else:  # neox: halves (x[i], x[i + n_dims/2])
        x0, x1 = rot[..., : n_dims // 2], rot[..., n_dims // 2 :]
    if fused:
        x0d = x0.double()
        y0 = (x0d * cos.double() - (x1 * sin).double()).float()
        y1 = (x0d * sin.double() + (x1 * cos).double()).float()
    else:
        y0, y1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    if mode == "normal":
        out = torch.stack((y0, y1), dim=-1).flatten(-2)
    else:
        out = torch.cat((y0, y1), dim=-1)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class LlamaModel:
    """Weights on the device plus the forward pass."""

    def __init__(
        self,
        hp: HParams,
        tok_embd: torch.Tensor,
        layers: list[Layer],
        output_norm: torch.Tensor,
        output: Linear,
        rope: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
        numerics: Numerics = "fast",
    ) -> None:
        self.hp = hp
        self.tok_embd = tok_embd
        self.layers = layers
        self.output_norm = output_norm
        self.output = output
        self.rope = rope.to(device)
        self.device = device
        self.dtype = dtype
        self.numerics: Numerics = numerics
        # ggml sums squares in double; that is cheap on a CPU and not worth it on a GPU.
        self._norm_dtype = torch.float64 if device.type == "cpu" else torch.float32

    @classmethod
    def load(
        cls,
        gguf: GGUFFile,
        device: torch.device,
        dtype: torch.dtype,
        n_ctx: int,
        numerics: Numerics = "fast",
        progress: Callable[[str], None] | None = None,
    ) -> LlamaModel:
        """Dequantize every tensor straight onto ``device``, one at a time."""
        hp = HParams.from_gguf(gguf)
        emulate = numerics == "llamacpp"

        def get(name: str, required: bool = True) -> torch.Tensor | None:
            info = gguf.tensors.get(name)
            if info is None:
                if required:
                    raise UnsupportedModel(f"the GGUF lacks tensor {name}")
                return None
            if progress is not None:
                progress(name)
            return dequantize(gguf.raw(name), info.qtype, info.shape, device, dtype)

        def need(name: str) -> torch.Tensor:
            t = get(name)
            assert t is not None
            return t

        def linear(name: str, bias: str | None = None, exact: bool = True) -> Linear:
            """``exact``: keep integer blocks for ggml's summation order (the layers,
            whose outputs are rounded again; the output head only needs the rounded
            activations)."""
            info = gguf.tensors.get(name)
            if info is None:
                raise UnsupportedModel(f"the GGUF lacks tensor {name}")
            split = emulate and info.qtype in MIN_OFFSET
            if progress is not None:
                progress(name)
            raw = gguf.raw(name)
            weight = dequantize(raw, info.qtype, info.shape, device, dtype, with_mins=not split)
            mins = block_mins(raw, info.qtype, info.shape, device).to(dtype) if split else None
            act = act_quant_for(info.qtype) if emulate else None
            b = get(bias, False) if bias else None
            blocks = None
            if emulate and exact and info.qtype in BLOCK_TYPES:
                data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)).to(device)
                blocks = BlockWeight(info.qtype, data, info.shape[0])
            return Linear(weight, b, act, mins, blocks)

        tok_embd = need("token_embd.weight")
        layers = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            layers.append(
                Layer(
                    attn_norm=need(p + "attn_norm.weight"),
                    wq=linear(p + "attn_q.weight", p + "attn_q.bias"),
                    wk=linear(p + "attn_k.weight", p + "attn_k.bias"),
                    wv=linear(p + "attn_v.weight", p + "attn_v.bias"),
                    wo=linear(p + "attn_output.weight", p + "attn_output.bias"),
                    ffn_norm=need(p + "ffn_norm.weight"),
                    w_gate=linear(p + "ffn_gate.weight"),
                    w_up=linear(p + "ffn_up.weight"),
                    w_down=linear(p + "ffn_down.weight"),
                    q_norm=get(p + "attn_q_norm.weight", False),
                    k_norm=get(p + "attn_k_norm.weight", False),
                )
            )
            if emulate:
                layers[-1].fuse_blocks()
        output_norm = need("output_norm.weight")
        if "output.weight" in gguf.tensors:
            output = linear("output.weight", exact=False)
        else:  # tied embeddings: the output head is token_embd
            info = gguf.tensors["token_embd.weight"]
            if emulate and info.qtype in MIN_OFFSET:
                output = linear("token_embd.weight", exact=False)
            else:
                act = act_quant_for(info.qtype) if emulate else None
                output = Linear(tok_embd, None, act)
        freq_factors = get("rope_freqs.weight", False)
        rope = rope_cache(hp, max(n_ctx, 1), freq_factors, libm=emulate)
        return cls(hp, tok_embd, layers, output_norm, output, rope, device, dtype, numerics)

    def unload(self) -> None:
        """Drop every weight tensor (their memory goes back to the device)."""
        empty = torch.empty(0)
        self.layers = []
        self.tok_embd = empty
        self.output = Linear(empty)
        self.output_norm = empty

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm in float32 (as ggml_compute_forward_rms_norm_f32: float squares summed
        in double on a CPU), returned in the compute dtype."""
        x = x.float()
        var = (x * x).to(self._norm_dtype).mean(-1, keepdim=True).float()
        if self.numerics == "llamacpp":
            # sqrtf is correctly rounded; torch's float32 sqrt is not (one ulp off in
            # about 15% of cases), its double sqrt rounded to float is.
            root = torch.sqrt((var + self.hp.norm_eps).double()).float()
        else:
            root = torch.sqrt(var + self.hp.norm_eps)
        scale = 1.0 / root
        return (x * scale * weight.float()).to(self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        seqs: Sequence[SeqBatch],
        logit_rows: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (len(logit_rows), n_vocab) in float32; K/V of ``tokens`` go to ``slots``.

        ``k_cache``/``v_cache`` are (n_layer, n_slots, n_head_kv, head_dim).
        """
        hp = self.hp
        emulate = self.numerics == "llamacpp"
        n_tok = tokens.shape[0]
        # The residual stream stays float32 whatever the compute dtype, as llama.cpp's
        # activations do: half precision would overflow on outlier features.
        x = self.tok_embd[tokens].float()
        cs = self.rope[positions]
        for il, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.attn_norm)
            q, k, v = layer.project_qkv(h, emulate)
            q = q.view(n_tok, hp.n_head, hp.head_dim)
            k = k.view(n_tok, hp.n_head_kv, hp.head_dim)
            v = v.view(n_tok, hp.n_head_kv, hp.head_dim_v)
            if layer.q_norm is not None:
                q = self._rms_norm(q, layer.q_norm)
            if layer.k_norm is not None:
                k = self._rms_norm(k, layer.k_norm)
            q = apply_rope(q, cs, hp.rope_mode, hp.rope_dims, fused=emulate)
            k = apply_rope(k, cs, hp.rope_mode, hp.rope_dims, fused=emulate)
            k_cache[il, slots] = k.to(k_cache.dtype)
            v_cache[il, slots] = v.to(v_cache.dtype)
            if emulate:
                attn = self._attention_llamacpp(q, k_cache[il], v_cache[il], seqs)
            else:
                attn = self._attention(q, k_cache[il], v_cache[il], seqs)
            x = x + layer.wo(attn, emulate).float()
            h = self._rms_norm(x, layer.ffn_norm)
            if emulate:
                ff = ggml_swiglu(*layer.gate_and_up(h, emulate)).to(h.dtype)
            else:
                ff = F.silu(layer.w_gate(h, emulate)) * layer.w_up(h, emulate)
            x = x + layer.w_down(ff, emulate).float()
        h = self._rms_norm(x[logit_rows], self.output_norm)
        return self.output(h, emulate).float()

    def _attention(
        self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, seqs: Sequence[SeqBatch]
    ) -> torch.Tensor:
        """Causal attention of each sequence's queries over its cached context."""
        hp = self.hp
        out = torch.empty(q.shape[0], hp.n_head * hp.head_dim_v, device=q.device, dtype=q.dtype)
        decode = [s for s in seqs if s.n == 1]
        if decode:
            # Single-token sequences share one padded call; a mask hides the padding.
            max_len = max(s.ctx_slots.shape[0] for s in decode)
            slot_idx = torch.zeros(len(decode), max_len, dtype=torch.long, device=q.device)
            mask = torch.zeros(len(decode), 1, 1, max_len, dtype=torch.bool, device=q.device)
            for i, s in enumerate(decode):
                n_ctx = s.ctx_slots.shape[0]
                slot_idx[i, :n_ctx] = s.ctx_slots
                mask[i, 0, 0, :n_ctx] = True
            rows = torch.tensor([s.start for s in decode], device=q.device)
            qd = q[rows].unsqueeze(2)  # (B, H, 1, D)
            kd = k_all[slot_idx].to(q.dtype).transpose(1, 2)  # (B, Hkv, L, D)
            vd = v_all[slot_idx].to(q.dtype).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=mask, scale=hp.attn_scale, enable_gqa=hp.n_rep > 1
            )
            out[rows] = o.reshape(len(decode), -1)
        for s in seqs:
            if s.n == 1:
                continue
            qs = q[s.start : s.start + s.n].transpose(0, 1)  # (H, n, D)
            ks = k_all[s.ctx_slots].to(q.dtype).transpose(0, 1)  # (Hkv, L, D)
            vs = v_all[s.ctx_slots].to(q.dtype).transpose(0, 1)
            n_ctx = s.ctx_slots.shape[0]
            key_pos = torch.arange(n_ctx, device=q.device)
            query_pos = torch.arange(s.pos0, s.pos0 + s.n, device=q.device)
            mask = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)  # (n, L)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=hp.attn_scale, enable_gqa=hp.n_rep > 1
            )
            out[s.start : s.start + s.n] = o.transpose(0, 1).reshape(s.n, -1)
        return out

    def _attention_llamacpp(
        self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, seqs: Sequence[SeqBatch]
    ) -> torch.Tensor:
        """Attention with llama.cpp's CPU flash-attention rounding (see numerics.py).

        Chunks of ``FA_TILE_Q`` or more queries take ggml's tiled float32 path, which
        plain attention matches; shorter ones (decode steps, short prompts) the fp16
        one, emulated here for all of them together, padded to the longest.
        """
        hp = self.hp
        out = self._attention(q, k_all, v_all, [s for s in seqs if s.n >= FA_TILE_Q])
        small = [s for s in seqs if s.n < FA_TILE_Q]
        if not small:
            return out
        dev = q.device
        n_max = max(s.n for s in small)
        l_max = max(s.ctx_slots.shape[0] for s in small)
        b = len(small)
        qp = torch.zeros(b, hp.n_head, n_max, hp.head_dim, device=dev, dtype=q.dtype)
        slot_idx = torch.zeros(b, l_max, dtype=torch.long, device=dev)
        mask = torch.zeros(b, 1, n_max, l_max, dtype=torch.bool, device=dev)
        key_pos = torch.arange(l_max, device=dev)
        for i, s in enumerate(small):
            n_ctx = s.ctx_slots.shape[0]
            qp[i, :, : s.n] = q[s.start : s.start + s.n].transpose(0, 1)
            slot_idx[i, :n_ctx] = s.ctx_slots
            query_pos = torch.arange(s.pos0, s.pos0 + s.n, device=dev)
            mask[i, 0, : s.n] = (key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)) & (
                key_pos.unsqueeze(0) < n_ctx
            )
        kp = k_all[slot_idx].transpose(1, 2).repeat_interleave(hp.n_rep, dim=1)
        vp = v_all[slot_idx].transpose(1, 2).repeat_interleave(hp.n_rep, dim=1)
        o = fa_f16_attention(qp, kp, vp, mask, hp.attn_scale).to(q.dtype)
        for i, s in enumerate(small):
            out[s.start : s.start + s.n] = o[i, :, : s.n].transpose(0, 1).reshape(s.n, -1)
        return out
