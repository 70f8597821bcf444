"""Model hyperparameters of the llama family, read from GGUF metadata.

The architectures share one forward pass and differ in a few switches: the RoPE
layout (llama.cpp's "normal" adjacent pairs for llama and mistral, whose converted
Q/K weights are permuted for it; "neox" halves for qwen2/qwen3), Q/K/V biases (qwen2)
and per-head Q/K RMSNorm (qwen3).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs

from rocmux_hip_direct.gguf_file import GGUFFile

RopeMode = Literal["normal", "neox"]
ROPE_MODE: dict[str, RopeMode] = {
    "llama": "normal",
    "mistral": "normal",
    "qwen2": "neox",
    "qwen3": "neox",
}
SUPPORTED_ARCHITECTURES = tuple(ROPE_MODE)


class UnsupportedModel(ValueError):
    """The GGUF describes an architecture or feature hip_direct cannot run."""


@attrs.frozen(kw_only=True)
class HParams:
    """Everything the forward pass needs to know about the model's shape."""

    arch: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_ff: int
    norm_eps: float
    rope_mode: RopeMode
    rope_dims: int
    rope_base: float
    rope_freq_scale: float  # 1 / linear or YaRN factor
    rope_ext_factor: float  # 0: no YaRN ramp
    rope_attn_factor: float
    rope_n_ctx_orig: int
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    attn_scale: float

    @property
    def n_rep(self) -> int:
        """Query heads per K/V head (grouped-query attention)."""
        return self.n_head // self.n_head_kv

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> HParams:
        """Read ``{arch}.*`` keys; ``UnsupportedModel`` for anything outside the family."""
        arch = gguf.architecture
        if arch not in ROPE_MODE:
            raise UnsupportedModel(
                f"architecture {arch!r} is not supported by hip_direct "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def key(name: str, default: Any = None) -> Any:
            value = gguf.get(f"{{arch}}.{name}", default)
            if value is None:
                raise UnsupportedModel(f"the GGUF lacks {arch}.{name}")
            return value

        n_embd = int(key("embedding_length"))
        n_head = int(key("attention.head_count"))
        n_head_kv = int(key("attention.head_count_kv", n_head))
        head_dim = int(key("attention.key_length", n_embd // n_head))
        head_dim_v = int(key("attention.value_length", head_dim))
        n_ctx_train = int(key("context_length", 2048))
        tokens = gguf.get("tokenizer.ggml.tokens")
        n_vocab = int(key("vocab_size", len(tokens) if tokens is not None else 0))
        rope_dims = int(key("rope.dimension_count", head_dim))

        scaling = str(gguf.get("{arch}.rope.scaling.type", "none"))
        factor = float(gguf.get("{arch}.rope.scaling.factor", 0.0) or 0.0)
        freq_scale = float(gguf.get("{arch}.rope.scale_linear", 0.0) or 0.0)
        freq_scale = 1.0 / freq_scale if freq_scale else 1.0
        if scaling in ("linear", "yarn") and factor > 0:
            freq_scale = 1.0 / factor
        elif scaling not in ("none", "linear", "yarn"):
            raise UnsupportedModel(f"RoPE scaling {scaling!r} is not supported by hip_direct")
        if int(n_head % n_head_kv) != 0:
            raise UnsupportedModel("attention.head_count is not a multiple of head_count_kv")
        return cls(
            arch=arch,
            n_vocab=n_vocab,
            n_ctx_train=n_ctx_train,
            n_embd=n_embd,
            n_layer=int(key("block_count")),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            n_ff=int(key("feed_forward_length")),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_mode=ROPE_MODE[arch],
            rope_dims=rope_dims,
            rope_base=float(key("rope.freq_base", 10000.0)),
            rope_freq_scale=freq_scale,
            rope_ext_factor=1.0 if scaling == "yarn" else 0.0,
            rope_attn_factor=float(gguf.get("{arch}.rope.scaling.attn_factor", 1.0) or 1.0),
            rope_n_ctx_orig=int(
                gguf.get("{arch}.rope.scaling.original_context_length", n_ctx_train)
            ),
            attn_scale=float(gguf.get("{arch}.attention.scale", 0.0) or 0.0)
            or 1.0 / math.sqrt(head_dim),
        )
