"""Memory fit: what a model needs on the GPU and the host, and settings that fit.

``estimate`` mirrors how llama.cpp lays a dense decoder (llama, qwen2, mistral, ...) out
in memory; ``fit`` picks a context length and, when needed, a number of GPU layers
that fit a device's free memory.

Where each part lives, as llama.cpp places it (``src/llama-model.cpp``,
``llama-context.cpp``, ``llama-kv-cache.cpp``):

* Weights. ``-ngl k`` puts the *output layer* (``output_norm`` and ``output.weight``)
  on the GPU first, then the last ``k - 1`` blocks; only ``k >= n_layer + 1`` offloads
  everything. ``token_embd`` (the input layer) always stays on the host. A model with
  tied embeddings (no ``output.weight``) gets a second copy of ``token_embd`` on the
  GPU for the output layer.
* KV cache. ``n_ctx`` is rounded up to a multiple of 256. With several sequences and
  no unified cache each gets ``pad(n_ctx / n_seq, 256)`` cells. Layer ``i``'s cache
  lives where block ``i`` does: ``layers x cells x n_head_kv x (k_len x bytes(type_k) +
  v_len x bytes(type_v))``, quantized types by ``gguf.GGML_QUANT_SIZES``.
* Output buffer: ``n_vocab x 4 bytes`` per sequence, on the host.
* Compute buffer: the peak of the worst-case graph (``n_ubatch`` tokens against the
  full cache), a formula fitted to llama-server's report on the CPU backend; see
  ``_graph_peak``. With every layer offloaded the GPU holds it and the host only the
  graph inputs; with some, each side is counted at the full peak.

Not modelled: sliding-window and recurrent caches, MoE expert FFNs (``n_ff`` is the
dense one), multimodal projectors, and the runtime's own context on the GPU (the margin
covers it).
"""

from __future__ import annotations

import attrs
import gguf

from rocmux.devices import GpuInfo
from rocmux.inventory import ModelInfo
from rocmux.types import LoadConfig

__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_MARGIN",
    "GPU_PROCESS_OVERHEAD",
    "MIN_CONTEXT",
    "FitResult",
    "MemoryEstimate",
    "estimate",
    "fit",
]

MiB = 1 << 20
GiB = 1 << 30
# llama.cpp rounds the context (and each sequence's share of it) up to this.
CTX_PAD = 256
# What ``fit`` assumes when the model does not give its trained context.
DEFAULT_CONTEXT = 4096
# ``fit`` lowers the context down to this (or the trained one, if smaller) before it
# gives up layers: a shorter context is of little use for chat.
MIN_CONTEXT = 2048
# llama-server's own ``--fit-target`` default: room for the runtime's context on the
# device, allocator slack and other processes.
DEFAULT_MARGIN = 1024 * MiB
# What a GPU runtime process holds beyond llama.cpp's own buffers: the driver context,
# the BLAS workspace and ggml's device memory pool. Measured on an H100 (CUDA 13,
# llama.cpp's CUDA build, NVML) as the used memory a llama-server added less the
# buffers it reported: 0.58 GiB for SmolLM2-135M, 0.89 GiB for a Llama-3.2-1B shape
# (bench/results/gpu/budget-*.json). HIP's context is of the same order (not measured
# here). Counted per instance by rocmux serve's memory budget.
GPU_PROCESS_OVERHEAD = 928 * MiB
# llama-server's slots and KV layout when ``--parallel`` is not given (``-np -1``):
# four slots sharing one unified cache.
AUTO_PARALLEL = 4
# Small graph inputs (positions, token ids, output ids) per token, measured.
_INPUT_BYTES_PER_TOKEN = 40

_F32 = 4


@attrs.frozen(kw_only=True)
class MemoryEstimate:
    """Bytes a model needs in llama.cpp, split between the GPU ("device") and the host.

    ``context_len`` is the KV cache's cell count after llama.cpp's padding;
    ``gpu_layers`` the ``-ngl`` value in effect (``block_count + 1`` = everything).
    """

    context_len: int
    context_per_seq: int
    parallel: int
    gpu_layers: int
    offloaded_blocks: int
    block_count: int
    output_on_device: bool
    ubatch: int
    flash_attn: bool
    weights_device: int
    weights_host: int
    kv_device: int
    kv_host: int
    compute_device: int
    compute_host: int
    output: int

    @property
    def weights(self) -> int:
        """Weight bytes, both sides (a tied embedding offloaded counts twice)."""
        return self.weights_device + self.weights_host

    @property
    def kv(self) -> int:
        """KV cache bytes, both sides."""
        return self.kv_device + self.kv_host

    @property
    def compute(self) -> int:
        """Compute buffer bytes, both sides."""
        return self.compute_device + self.compute_host

    @property
    def device_total(self) -> int:
        """Bytes on the GPU."""
        return self.weights_device + self.kv_device + self.compute_device

    @property
    def host_total(self) -> int:
        """Bytes on the host (mmapped weights included)."""
        return self.weights_host + self.kv_host + self.compute_host + self.output

    @property
    def total(self) -> int:
        """Bytes on both sides."""
        return self.device_total + self.host_total

    @property
    def full_offload(self) -> bool:
        """Whether every block and the output layer are on the GPU."""
        return self.offloaded_blocks == self.block_count and self.output_on_device

    def describe(self) -> str:
        """One line: the totals and their parts."""
        return (
            f"ctx {self.context_len}, {self.offloaded_blocks}/{self.block_count} blocks"
            f"{' + output' if self.output_on_device else ''} on the GPU: "
            f"device {_gib(self.device_total)} (weights {_gib(self.weights_device)}, "
            f"KV {_gib(self.kv_device)}, compute {_gib(self.compute_device)}), "
            f"host {_gib(self.host_total)} (weights {_gib(self.weights_host)}, "
            f"KV {_gib(self.kv_host)}, compute {_gib(self.compute_host)}, "
            f"output {_gib(self.output)})"
        )


@attrs.frozen(kw_only=True)
class FitResult:
    """``fit``'s choice: the config to load with, its estimate, and why."""

    config: LoadConfig
    estimate: MemoryEstimate
    fits: bool  # whether ``estimate`` stays within the free memory less the margin
    budget: int  # the free memory less the margin, in bytes
    reason: str


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _pad(n: int, to: int = CTX_PAD) -> int:
    return (n + to - 1) // to * to


def _quant_size(cache_type: str) -> tuple[int, int]:
    """(elements, bytes) per block of a ggml type named like llama.cpp's ``-ctk`` values."""
    try:
        qtype = gguf.GGMLQuantizationType[cache_type.upper()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {cache_type!r} (e.g. f16, q8_0, q4_0)") from None
    return gguf.GGML_QUANT_SIZES[qtype]


def _block(cache_type: str) -> int:
    return _quant_size(cache_type)[0]


def _row_bytes(cache_type: str, n: int) -> int:
    """Bytes of ``n`` elements of ``cache_type``."""
    block, size = _quant_size(cache_type)
    return -(-n // block) * size


def _is_quantized(cache_type: str) -> bool:
    return cache_type.lower() not in ("f32", "f16", "bf16")


def _tied(info: ModelInfo) -> bool:
    """Whether the output layer reuses ``token_embd`` (no ``output.weight``).

    ``other_bytes`` holds ``token_embd`` and, when untied, ``output.weight`` too; what is
    left beside the output tensor is then a vocab x n_embd matrix of at least ~1.5 bits
    a weight, against a few small norms when tied.
    """
    rest = info.other_bytes - info.output_bytes
    if info.vocab_size and info.embedding_length:
        return rest < info.vocab_size * info.embedding_length // 8
    return rest < info.output_bytes // 2


def _required(info: ModelInfo) -> tuple[int, int, int, int, int, int]:
    """(blocks, n_embd, n_head, n_head_kv, key_length, value_length); raises if unknown."""
    n_layer = info.block_count or len(info.layer_bytes)
    n_embd, k_len, v_len = info.embedding_length, info.key_length, info.value_length
    n_head, n_head_kv = info.head_count, info.head_count_kv
    if not (n_layer and n_embd and n_head and n_head_kv and k_len and v_len):
        raise ValueError(
            f"{info.path} lacks the attention metadata (block count, embedding length, head "
            "counts) that a memory estimate needs"
        )
    return n_layer, n_embd, n_head, n_head_kv, k_len, v_len


def _graph_peak(
    *,
    tokens: int,
    n_kv: int,
    n_embd: int,
    n_ff: int,
    n_head: int,
    n_embd_kv: int,
    n_vocab: int,
    n_outputs: int,
    fa: bool,
) -> int:
    """Peak bytes of llama.cpp's worst-case graph (``tokens`` against ``n_kv`` cells).

    Fitted to llama-server's ``compute buffer size`` on the CPU backend (ggml's
    allocator reuses freed tensors, so the peak is one phase's live set plus its
    fragmentation). Over 300 random llama shapes and settings, for ``n_ff > n_embd``
    (every real dense model) it came within -1.5%..+0.2% with flash attention and
    -0.6%..+4.4% without; for ``n_ff <= n_embd`` within -12%..+20%.

    * flash attention: the f16 mask (``n_kv x tokens x 2``) plus, in the FFN,
      ``4 tokens (5 n_embd + 3 n_ff)`` (gate, up and their product beside the residual
      stream and the allocator's holes); ``4 tokens 7 n_embd`` when ``n_ff <= n_embd``
      (measured 6 to 7 there).
    * without: the larger of the attention phase, an f32 mask and an f32 score matrix
      per head (``4 n_kv tokens (1 + n_head)``) plus ``4 tokens (6 n_embd + 2 n_embd_kv)``,
      and the FFN phase with the f32 mask and ``4 tokens (5 n_embd + 3 n_ff + 2 n_embd_kv)``.
    * either way, the output phase, the mask, ``4 tokens 5 n_embd`` and the logits of one row per
      sequence (``4 n_vocab n_outputs``), only counts for a tiny ``n_embd``.

    The token count scales it linearly. GPU backends lay the graph out on their own and
    may differ.
    """
    ffn = _F32 * tokens * (5 * n_embd + 3 * n_ff if n_ff > n_embd else 7 * n_embd)
    small = _INPUT_BYTES_PER_TOKEN * tokens
    mask = n_kv * tokens * (2 if fa else _F32)
    logits = mask + _F32 * (tokens * 5 * n_embd + n_vocab * min(n_outputs, tokens))
    if fa:
        return max(mask + ffn, logits) + small
    attention = _F32 * n_kv * tokens * (1 + n_head) + _F32 * tokens * (6 * n_embd + 2 * n_embd_kv)
    ffn_phase = mask + ffn + _F32 * tokens * 2 * n_embd_kv
    return max(attention, ffn_phase, logits) + small


def estimate(
    info: ModelInfo,
    *,
    context_len: int,
    gpu_layers: int | None = None,
    parallel: int = 1,
    kv_unified: bool = False,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    n_batch: int = 2048,
    n_ubatch: int = 512,
    flash_attn: bool | None = None,
) -> MemoryEstimate:
    """What loading ``info`` with these llama.cpp settings takes on the GPU and the host.

    ``context_len`` is ``-c`` (0: the trained context; larger than the trained one is
    kept, as llama.cpp keeps it); ``gpu_layers`` is ``-ngl`` (``None``: all, i.e.
    ``block_count + 1``; 0 for the CPU); ``parallel`` is ``-np`` and ``kv_unified``
    ``-kvu`` (llama-server's automatic slots are ``parallel=4, kv_unified=True``);
    ``flash_attn=None`` is llama.cpp's "auto", which turns it on where the backend
    supports it (CPU, ROCm, CUDA).
    """
    n_layer, n_embd, n_head, n_head_kv, k_len, v_len = _required(info)
    if context_len < 0 or parallel < 1 or n_batch < 1 or n_ubatch < 1:
        raise ValueError("context_len must be >= 0; parallel, n_batch, n_ubatch >= 1")
    if gpu_layers is not None and gpu_layers < 0:
        raise ValueError(f"gpu_layers must be >= 0 or None, got {gpu_layers}")
    fa = True if flash_attn is None else flash_attn
    if not fa and _is_quantized(cache_type_v):
        raise ValueError("a quantized V cache needs flash attention (llama.cpp refuses it)")
    for name, cache_type, head in (("K", cache_type_k, k_len), ("V", cache_type_v, v_len)):
        block = _block(cache_type)
        # Flash attention reads the cache a head at a time, the plain path a row at a time.
        if (head if fa else head * n_head_kv) % block:
            raise ValueError(
                f"{name} cache type {cache_type} has blocks of {block}, which do not divide "
                f"the head size {head} (llama.cpp refuses it)"
            )

    # llama_context: 0 means the trained context; the batch is capped by the context
    # as asked, before the context is padded.
    requested = context_len or info.context_length or DEFAULT_CONTEXT
    ubatch = min(requested, n_batch, n_ubatch)
    n_ctx = _pad(requested)
    n_ctx_seq = n_ctx
    if parallel > 1 and not kv_unified:
        n_ctx_seq = _pad(n_ctx // parallel)
        n_ctx = n_ctx_seq * parallel

    ngl = n_layer + 1 if gpu_layers is None else min(gpu_layers, n_layer + 1)
    blocks_on_gpu = max(ngl - 1, 0)
    output_on_gpu = ngl >= 1
    layer_bytes = list(info.layer_bytes) + [0] * max(n_layer - len(info.layer_bytes), 0)
    weights_device = sum(layer_bytes[n_layer - blocks_on_gpu : n_layer])
    weights_host = sum(layer_bytes[: n_layer - blocks_on_gpu])
    if output_on_gpu:
        # output_norm goes with the output layer; a tied token_embd is copied, an
        # untied output.weight moves.
        norm = min(n_embd * _F32, max(info.other_bytes - info.output_bytes, 0))
        weights_device += info.output_bytes + norm
        weights_host += info.other_bytes - norm - (0 if _tied(info) else info.output_bytes)
    else:
        weights_host += info.other_bytes

    kv_layer = n_ctx * (
        _row_bytes(cache_type_k, n_head_kv * k_len) + _row_bytes(cache_type_v, n_head_kv * v_len)
    )
    kv_device = kv_layer * blocks_on_gpu
    kv_host = kv_layer * (n_layer - blocks_on_gpu)

    peak = _graph_peak(
        tokens=ubatch,
        n_kv=n_ctx_seq,
        n_embd=n_embd,
        n_ff=info.feed_forward_length or 4 * n_embd,
        n_head=n_head,
        n_embd_kv=n_head_kv * max(k_len, v_len),
        n_vocab=info.vocab_size or 0,
        n_outputs=parallel,
        fa=fa,
    )
    if blocks_on_gpu == 0 and not output_on_gpu:
        compute_device, compute_host = 0, peak
    elif blocks_on_gpu == n_layer:
        # Graph inputs stay on the host: the token embeddings (token_embd is there)
        # and the attention mask.
        mask = n_ctx_seq * ubatch * (2 if fa else _F32)
        compute_device = peak
        compute_host = ubatch * (n_embd * _F32 + _INPUT_BYTES_PER_TOKEN) + mask
    else:
        # Each side runs its own layers' part of the graph at full size.
        compute_device = compute_host = peak

    return MemoryEstimate(
        context_len=n_ctx,
        context_per_seq=n_ctx_seq,
        parallel=parallel,
        gpu_layers=ngl,
        offloaded_blocks=blocks_on_gpu,
        block_count=n_layer,
        output_on_device=output_on_gpu,
        ubatch=ubatch,
        flash_attn=fa,
        weights_device=weights_device,
        weights_host=weights_host,
        kv_device=kv_device,
        kv_host=kv_host,
        compute_device=compute_device,
        compute_host=compute_host,
        output=(info.vocab_size or 0) * _F32 * parallel,
    )


# Aliases of the llama-server flags in ``extra_flags`` that change the estimate.
_EXTRA = {
    "-c": "context_len",
    "--ctx-size": "context_len",
    "-ngl": "gpu_layers",
    "--gpu-layers": "gpu_layers",
    "--n-gpu-layers": "gpu_layers",
    "-np": "parallel",
    "--parallel": "parallel",
    "-fa": "flash_attn",
    "--flash-attn": "flash_attn",
    "-ctk": "cache_type_k",
    "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v",
    "--cache-type-v": "cache_type_v",
    "-b": "n_batch",
    "--batch-size": "n_batch",
    "-ub": "n_ubatch",
    "--ubatch-size": "n_ubatch",
    "-kvu": "kv_unified",
    "--kv-unified": "kv_unified",
    "-no-kvu": "no_kv_unified",
    "--no-kv-unified": "no_kv_unified",
}


def _extra_settings(flags: tuple[str, ...]) -> dict[str, str]:
    """The settings above that ``extra_flags`` gives, as strings; later ones win."""
    found: dict[str, str] = {}
    i = 0
    while i < len(flags):
        name, eq, value = flags[i].partition("=")
        key = _EXTRA.get(name)
        if key in ("kv_unified", "no_kv_unified"):
            found["kv_unified"] = "on" if key == "kv_unified" else "off"
        elif key is not None:
            if not eq and i + 1 < len(flags):
                i += 1
                value = flags[i]
            found[key] = value
        i += 1
    return found


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # "auto", "all": llama-server decides, as with no value


def _margin_bytes(free: int, margin: float | int) -> int:
    if isinstance(margin, float):
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"a fractional margin must be in [0, 1), got {margin}")
        return int(free * margin)
    if margin < 0:
        raise ValueError(f"margin must be >= 0 bytes, got {margin}")
    return margin


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def fit(
    info: ModelInfo,
    free_bytes: int | GpuInfo,
    *,
    margin: float | int = DEFAULT_MARGIN,
    requested: LoadConfig | None = None,
) -> FitResult:
    """Fills the settings ``requested`` leaves to rocmux so the model fits ``free_bytes``.

    ``free_bytes`` is the GPU's free memory, or a ``GpuInfo`` (its free memory; for the
    CPU, everything stays on the host and only the context is chosen). ``margin`` is
    bytes (int) or a fraction of the free memory (float) kept unused.

    The context becomes the largest power of two up to the trained context (4096 when
    the model does not say) that fits with every layer on the GPU, down to 2048 (or the
    trained context if smaller); if even that does not fit, ``gpu_layers`` becomes the
    largest count that does. Values set in ``requested`` (including ``-c``/``-ngl``/
    ``-np`` in its ``extra_flags``) are never changed; the estimate follows them and
    ``fits`` says whether they fit.
    """
    requested = requested or LoadConfig()
    on_cpu = isinstance(free_bytes, GpuInfo) and free_bytes.vendor == "cpu"
    if isinstance(free_bytes, GpuInfo):
        free = free_bytes.memory_free
        if free is None:
            free = free_bytes.memory_total
        if free is None:
            raise ValueError(f"the free memory of {free_bytes.name} is unknown")
    else:
        free = free_bytes
    budget = max(free - _margin_bytes(free, margin), 0)

    # The plugin lets a flag in extra_flags win over the same setting in the config.
    extra = _extra_settings(requested.extra_flags)
    n_layer = _required(info)[0]
    full = n_layer + 1
    user_ctx = requested.context_len
    if "context_len" in extra:  # "-c 0" too: the trained context, the user's choice
        user_ctx = _int_or_none(extra["context_len"]) or info.context_length or DEFAULT_CONTEXT
    user_ngl = requested.gpu_layers
    if "gpu_layers" in extra:  # "auto" and "all" leave every layer to the GPU
        user_ngl = _int_or_none(extra["gpu_layers"])
        user_ngl = full if user_ngl is None or user_ngl < 0 else user_ngl
    user_np = _int_or_none(extra.get("parallel")) or requested.parallel
    fa = requested.flash_attn
    if "flash_attn" in extra:
        fa = {"on": True, "off": False}.get(extra["flash_attn"].lower())
    auto_slots = not (user_np and user_np > 0)  # llama-server's "-np -1" or nothing
    parallel = AUTO_PARALLEL if auto_slots or user_np is None else user_np
    unified = {"on": True, "off": False}.get(extra.get("kv_unified", ""), auto_slots)
    cache_k = extra.get("cache_type_k", "f16")
    cache_v = extra.get("cache_type_v", "f16")
    n_batch = _int_or_none(extra.get("n_batch")) or 2048
    n_ubatch = _int_or_none(extra.get("n_ubatch")) or 512

    def est(ctx: int, ngl: int) -> MemoryEstimate:
        return estimate(
            info,
            context_len=ctx,
            gpu_layers=0 if on_cpu else ngl,
            parallel=parallel,
            kv_unified=unified,
            cache_type_k=cache_k,
            cache_type_v=cache_v,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            flash_attn=fa,
        )

    def used(e: MemoryEstimate) -> int:
        return e.host_total if on_cpu else e.device_total

    def result(ctx: int, e: MemoryEstimate, ngl_chosen: bool, why: str) -> FitResult:
        changes: dict[str, int] = {}
        if user_ctx is None:
            changes["context_len"] = ctx
        if ngl_chosen:
            changes["gpu_layers"] = e.gpu_layers
        return FitResult(
            config=attrs.evolve(requested, **changes),
            estimate=e,
            fits=used(e) <= budget,
            budget=budget,
            reason=why,
        )

    trained = info.context_length or DEFAULT_CONTEXT
    top = _pow2_floor(trained)
    floor = min(MIN_CONTEXT, top)
    if user_ctx is not None:
        contexts = [user_ctx]
    else:
        contexts = [c for c in (top >> i for i in range(top.bit_length())) if c >= floor]
    ngl = full if user_ngl is None else min(user_ngl, full)
    choose_ngl = user_ngl is None and not on_cpu
    where = "the host" if on_cpu else "the GPU"
    layers = "" if on_cpu else f" with {ngl}/{full} layers"
    usable = f"{_gib(budget)} usable ({_gib(free)} free less the margin)"

    for ctx in contexts:
        e = est(ctx, ngl)
        if used(e) <= budget:
            why = f"context {ctx}{layers} fits: {_gib(used(e))} on {where}, {usable}"
            if user_ctx is None:
                why += f"; the largest power of two up to the trained {trained} that does"
            return result(ctx, e, choose_ngl, why)

    ctx = contexts[-1]
    whole = est(ctx, ngl)
    if not choose_ngl:
        why = f"does not fit: context {ctx}{layers} needs {_gib(used(whole))} on {where}, {usable}"
        return result(ctx, whole, False, why)

    # Partial offload: the most layers that fit at the smallest context.
    e = est(ctx, 0)
    for n in range(full - 1, 0, -1):
        candidate = est(ctx, n)
        if used(candidate) <= budget:
            e = candidate
            break
    if e.gpu_layers == 0:
        why = f"context {ctx} does not fit even one layer on the GPU, {usable}: CPU only"
    else:
        why = (
            f"context {ctx} with all {full} layers needs {_gib(used(whole))} on the GPU, "
            f"{usable}: offloading {e.gpu_layers} of {full} layers ({_gib(used(e))}), "
            "the rest runs on the CPU"
        )
    return result(ctx, e, True, why)
