"""Memory fit: the estimate's parts and llama.cpp's placement rules, the automatic choice
of context and GPU layers on recorded 16 GB and 4 GB devices, and the estimate checked
against what a real llama-server reports for the default model and generated shapes."""

from __future__ import annotations

import queue
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import attrs
import gguf
import pytest
from gguf_factory import TinyLlama, write_tiny_llama
from rocmux.devices import GpuInfo
from rocmux.inventory import ModelInfo
from rocmux.memory import (
    DEFAULT_CONTEXT,
    DEFAULT_MARGIN,
    MemoryEstimate,
    estimate,
    fit,
)
from rocmux.types import LoadConfig

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def tiny_info(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    spec = TinyLlama(n_embd=128, n_layer=4, n_head=4, n_head_kv=2, n_ff=384, context_length=8192)
    return ModelInfo.from_gguf(write_tiny_llama(tmp_path_factory.mktemp("mem") / "t.gguf", spec))


@pytest.fixture(scope="module")
def smol(default_model: Path) -> ModelInfo:
    return ModelInfo.from_gguf(default_model)


def _bytes(n_elements: int, type_name: str) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return n_elements // block * size


def shaped(
    base: ModelInfo,
    *,
    name: str,
    n_layer: int,
    n_embd: int,
    n_ff: int,
    n_head: int,
    n_head_kv: int,
    n_vocab: int,
    context_length: int | None,
    weights: str,
    output: str | None,
) -> ModelInfo:
    """``base`` with a real model's hyper-parameters and tensor sizes, no file written.

    ``output=None`` ties the output to ``token_embd`` (no ``output.weight``).
    """
    head = n_embd // n_head
    kv = n_head_kv * head
    block_params = 2 * n_embd * n_embd + 2 * kv * n_embd + 3 * n_ff * n_embd
    layer = _bytes(block_params, weights) + 2 * n_embd * 4  # + two f32 norms
    embd = _bytes(n_vocab * n_embd, weights)
    out = embd if output is None else _bytes(n_vocab * n_embd, output)
    other = embd + n_embd * 4 + (0 if output is None else out)  # + output_norm
    total = n_layer * layer + other
    return attrs.evolve(
        base,
        name=name,
        size=total,
        file_type=weights,
        tensor_types={weights: 9 * n_layer + 3},
        tensor_type_bytes={weights: total},
        n_params=n_layer * block_params + n_vocab * n_embd * (1 if output is None else 2),
        context_length=context_length,
        block_count=n_layer,
        head_count=n_head,
        head_count_kv=n_head_kv,
        embedding_length=n_embd,
        feed_forward_length=n_ff,
        key_length=head,
        value_length=head,
        vocab_size=n_vocab,
        layer_bytes=(layer,) * n_layer,
        other_bytes=other,
        output_bytes=out,
    )


@pytest.fixture(scope="module")
def llama_1b(tiny_info: ModelInfo) -> ModelInfo:
    """Llama-3.2-1B-Instruct Q8_0 (1.32 GB, tied embeddings, 128k context)."""
    return shaped(
        tiny_info,
        name="Llama-3.2-1B-Instruct",
        n_layer=16,
        n_embd=2048,
        n_ff=8192,
        n_head=32,
        n_head_kv=8,
        n_vocab=128256,
        context_length=131072,
        weights="Q8_0",
        output=None,
    )


@pytest.fixture(scope="module")
def llama_8b(tiny_info: ModelInfo) -> ModelInfo:
    """Llama-3.1-8B-Instruct at Q4_K with a Q6_K output (4.6 GB, like Q4_K_M)."""
    return shaped(
        tiny_info,
        name="Llama-3.1-8B-Instruct",
        n_layer=32,
        n_embd=4096,
        n_ff=14336,
        n_head=32,
        n_head_kv=8,
        n_vocab=128256,
        context_length=131072,
        weights="Q4_K",
        output="Q6_K",
    )


def _gpu(total_gib: float, free_gib: float) -> GpuInfo:
    """A recorded discrete AMD GPU."""
    return GpuInfo(
        index=0,
        vendor="amd",
        name=f"Radeon ({total_gib:g} GB)",
        gfx_target="gfx1100",
        memory_total=int(total_gib * GiB),
        memory_used=int((total_gib - free_gib) * GiB),
        memory_free=int(free_gib * GiB),
    )


GPU_16GB = _gpu(16, 15.6)
GPU_4GB = _gpu(4, 3.8)


# ------------------------------------------------------------------------- the estimate


def test_kv_cache_is_layers_cells_kv_heads_head_size_k_and_v(tiny_info):
    e = estimate(tiny_info, context_len=4096, gpu_layers=0)
    # 4 layers x 4096 cells x 2 KV heads x 32 x 2 (K and V) x 2 bytes (f16)
    assert e.kv == e.kv_host == 4 * 4096 * 2 * 32 * 2 * 2
    q8 = estimate(tiny_info, context_len=4096, gpu_layers=0, cache_type_k="q8_0")
    q4 = estimate(tiny_info, context_len=4096, cache_type_k="q4_0", cache_type_v="q4_0")
    assert q8.kv == 4 * 4096 * 64 * (34 / 32 + 2)  # q8_0: 34 bytes per 32
    assert q4.kv == 4 * 4096 * 64 * 2 * 18 / 32  # q4_0: 18 bytes per 32


def test_context_is_padded_to_256_and_0_means_the_trained_context(tiny_info):
    assert estimate(tiny_info, context_len=300).context_len == 512
    assert estimate(tiny_info, context_len=0).context_len == 8192
    # Larger than trained is kept: llama.cpp only warns about it.
    assert estimate(tiny_info, context_len=16384).context_len == 16384
    # Separate caches per sequence: each gets pad(n_ctx / n_seq, 256) cells.
    split = estimate(tiny_info, context_len=4096, parallel=3)
    assert (split.context_per_seq, split.context_len) == (1536, 4608)
    unified = estimate(tiny_info, context_len=4096, parallel=3, kv_unified=True)
    assert (unified.context_per_seq, unified.context_len) == (4096, 4096)
    assert estimate(attrs.evolve(tiny_info, context_length=None), context_len=0).context_len == (
        DEFAULT_CONTEXT
    )


def test_the_batch_is_capped_by_the_context_as_asked(tiny_info):
    assert estimate(tiny_info, context_len=300).ubatch == 300
    assert estimate(tiny_info, context_len=4096, n_ubatch=256).ubatch == 256
    assert estimate(tiny_info, context_len=4096, n_batch=128).ubatch == 128


def test_gpu_layers_offload_the_output_layer_first(tiny_info):
    """llama.cpp's -ngl k: the output layer, then the last k - 1 blocks; token_embd
    stays on the host; the generated models have an untied output.weight."""
    layer = tiny_info.layer_bytes[0]
    norm = tiny_info.embedding_length * 4
    cpu = estimate(tiny_info, context_len=512, gpu_layers=0)
    assert (cpu.weights_device, cpu.kv_device, cpu.compute_device) == (0, 0, 0)
    assert cpu.weights_host == tiny_info.tensor_bytes

    one = estimate(tiny_info, context_len=512, gpu_layers=1)
    assert (one.offloaded_blocks, one.output_on_device) == (0, True)
    assert one.weights_device == tiny_info.output_bytes + norm
    assert one.weights == tiny_info.tensor_bytes  # moved, not copied

    four = estimate(tiny_info, context_len=512, gpu_layers=4)  # block 0 stays behind
    assert four.offloaded_blocks == 3
    assert four.weights_device == 3 * layer + tiny_info.output_bytes + norm
    assert four.kv_device == 3 * four.kv_host

    full = estimate(tiny_info, context_len=512)
    assert full.gpu_layers == 5 and full.full_offload
    assert full.weights_host == tiny_info.other_bytes - tiny_info.output_bytes - norm
    assert full.kv_host == 0
    # Only the graph's inputs stay on the host: token embeddings and the mask.
    assert full.compute_host < full.compute_device / 4
    assert estimate(tiny_info, context_len=512, gpu_layers=99) == full


def test_a_tied_output_is_copied_to_the_gpu(smol):
    """SmolLM2 has no output.weight: its output layer uses token_embd, which llama.cpp
    loads a second time on the output layer's device."""
    full = estimate(smol, context_len=2048)
    assert full.weights_device == sum(smol.layer_bytes) + smol.output_bytes + 576 * 4
    assert full.weights_host == smol.other_bytes - 576 * 4
    assert full.weights == smol.tensor_bytes + smol.output_bytes


def test_flash_attention_off_adds_a_score_matrix_per_head(tiny_info):
    on = estimate(tiny_info, context_len=4096, gpu_layers=0, flash_attn=True)
    auto = estimate(tiny_info, context_len=4096, gpu_layers=0)
    off = estimate(tiny_info, context_len=4096, gpu_layers=0, flash_attn=False)
    assert on == auto  # "auto" turns it on where llama.cpp supports it
    assert off.compute > on.compute + 4 * 4096 * 512 * 4  # f32 scores for 4 heads


def test_settings_llama_cpp_refuses_raise(tiny_info):
    with pytest.raises(ValueError, match="flash attention"):
        estimate(tiny_info, context_len=512, flash_attn=False, cache_type_v="q8_0")
    with pytest.raises(ValueError, match="unknown KV cache type"):
        estimate(tiny_info, context_len=512, cache_type_k="q9_9")
    odd = attrs.evolve(tiny_info, key_length=80, value_length=80)
    with pytest.raises(ValueError, match="do not divide"):
        estimate(odd, context_len=512, cache_type_k="q8_0")
    with pytest.raises(ValueError, match="metadata"):
        estimate(attrs.evolve(tiny_info, head_count=None), context_len=512)


def test_output_buffer_is_the_logits_of_one_row_per_sequence(smol):
    assert estimate(smol, context_len=512, parallel=4).output == 49152 * 4 * 4
    e = estimate(smol, context_len=512)
    assert e.host_total == e.weights_host + e.kv_host + e.compute_host + e.output
    assert e.total == e.device_total + e.host_total
    assert "ctx 512" in e.describe()


# ------------------------------------------------------------------ the automatic choice


def test_16gb_gpu_gets_all_layers_and_the_full_context_for_a_1b_model(llama_1b):
    result = fit(llama_1b, GPU_16GB)
    assert result.fits
    assert result.config.gpu_layers == 17  # 16 blocks + the output layer
    assert result.config.context_len == 131072  # the trained context, a power of two
    assert result.estimate.device_total <= 15.6 * GiB - DEFAULT_MARGIN
    assert "context 131072" in result.reason and "fits" in result.reason


def test_16gb_gpu_gets_all_layers_of_an_8b_model_and_a_shorter_context(llama_8b):
    result = fit(llama_8b, GPU_16GB)
    assert result.fits and result.config.gpu_layers == 33
    # KV takes 128 KiB a token: 131072 tokens would need 16 GiB for it alone.
    assert result.config.context_len == 65536
    assert fit(llama_8b, 15.6 * GiB // 2).config.context_len < 65536  # less room, less context


def test_4gb_gpu_gets_a_partial_offload_of_an_8b_model(llama_8b):
    result = fit(llama_8b, GPU_4GB)
    config, e = result.config, result.estimate
    assert config.context_len == 2048  # the smallest reasonable context, then layers go
    assert 12 <= config.gpu_layers <= 28
    assert e.device_total <= result.budget
    # The largest count that fits: one more layer does not.
    more = estimate(llama_8b, context_len=2048, gpu_layers=config.gpu_layers + 1, parallel=4)
    assert more.device_total > result.budget
    assert "offloading" in result.reason and f"{config.gpu_layers} of 33" in result.reason


def test_4gb_gpu_keeps_every_layer_of_a_1b_model_with_less_context(llama_1b):
    result = fit(llama_1b, GPU_4GB)
    assert result.config.gpu_layers == 17
    assert 4096 <= result.config.context_len < 131072


def test_a_model_without_a_trained_context_gets_4096(llama_1b):
    result = fit(attrs.evolve(llama_1b, context_length=None), GPU_16GB)
    assert result.config.context_len == DEFAULT_CONTEXT == 4096


def test_a_gpu_too_small_for_one_layer_runs_on_the_cpu(llama_8b):
    result = fit(llama_8b, 1200 * MiB)
    assert result.config.gpu_layers == 0
    assert "CPU" in result.reason


def test_explicit_settings_are_kept(llama_8b):
    requested = LoadConfig(context_len=8192, gpu_layers=10, parallel=2, flash_attn=False)
    result = fit(llama_8b, GPU_4GB, requested=requested)
    assert result.config == requested
    assert result.estimate.gpu_layers == 10 and result.estimate.context_len == 8192
    assert result.estimate.parallel == 2 and not result.estimate.flash_attn

    too_big = LoadConfig(context_len=131072, gpu_layers=33)
    result = fit(llama_8b, GPU_4GB, requested=too_big)
    assert result.config == too_big and not result.fits
    assert "does not fit" in result.reason

    # A context set by the user: the layers are chosen for it.
    result = fit(llama_8b, GPU_4GB, requested=LoadConfig(context_len=8192))
    assert result.config.context_len == 8192
    assert 0 < result.config.gpu_layers < fit(llama_8b, GPU_4GB).config.gpu_layers

    # Layers set by the user: the context is chosen for them.
    result = fit(llama_8b, GPU_16GB, requested=LoadConfig(gpu_layers=20))
    assert result.config.gpu_layers == 20 and result.config.context_len == 131072


def test_extra_flags_count_as_explicit_settings(llama_8b):
    requested = LoadConfig(extra_flags=("--ctx-size", "16384", "-ctk", "q8_0", "-ctv=q8_0"))
    result = fit(llama_8b, GPU_16GB, requested=requested)
    assert result.config.context_len is None  # the flag already says it
    assert result.estimate.context_len == 16384
    assert result.estimate.kv == 32 * 16384 * 1024 * 2 * 34 // 32

    trained = fit(llama_8b, GPU_4GB, requested=LoadConfig(extra_flags=("-c", "0", "-ngl", "all")))
    assert trained.config.context_len is None and trained.config.gpu_layers is None
    assert trained.estimate.context_len == 131072 and trained.estimate.full_offload
    assert not trained.fits

    slots = fit(llama_8b, GPU_16GB, requested=LoadConfig(extra_flags=("-np", "2", "-fa", "off")))
    assert slots.estimate.parallel == 2 and not slots.estimate.flash_attn


def test_margin_is_bytes_or_a_fraction_of_free_memory(llama_1b):
    assert fit(llama_1b, 10 * GiB, margin=0).budget == 10 * GiB
    assert fit(llama_1b, 10 * GiB, margin=0.25).budget == int(7.5 * GiB)
    with pytest.raises(ValueError, match="fraction"):
        fit(llama_1b, 10 * GiB, margin=1.5)


def test_on_the_cpu_only_the_context_is_chosen(llama_8b):
    ram = GpuInfo(index=None, vendor="cpu", name="CPU", memory_total=16 * GiB, memory_free=8 * GiB)
    result = fit(llama_8b, ram)
    assert result.config.gpu_layers is None
    assert result.estimate.device_total == 0
    assert result.estimate.host_total <= 7 * GiB
    assert 2048 <= result.config.context_len <= 16384


# -------------------------------------------------- checked against llama-server's report

_BUFFER = re.compile(r"(\S+) +(model|KV|compute|output) buffer size = +([\d.]+) MiB")


@attrs.frozen
class Case:
    """A model and the llama-server flags to start it with; ``parallel=None`` is auto."""

    name: str
    spec: TinyLlama | None  # None: the default model
    context: int
    parallel: int | None = None
    flash_attn: bool | None = None
    cache_type: str = "f16"
    ubatch: int = 512


CASES = [
    Case("smollm2-auto-slots", None, 4096),
    Case("smollm2-trained-np2", None, 0, parallel=2),
    Case(
        "gqa4-vocab8k",
        TinyLlama(
            n_embd=512, n_layer=4, n_head=8, n_head_kv=2, n_ff=1408, n_vocab=8000, dtype="f16"
        ),
        512,
        parallel=1,
    ),
    Case(
        "mha-f32-np4",
        TinyLlama(n_embd=256, n_layer=6, n_head=4, n_head_kv=4, n_ff=1024, context_length=4096),
        2048,
        parallel=4,
    ),
    Case(
        "deep-vocab32k-q8-cache",
        TinyLlama(
            n_embd=384,
            n_layer=8,
            n_head=6,
            n_head_kv=2,
            n_ff=1536,
            n_vocab=32000,
            context_length=8192,
            dtype="f16",
        ),
        8192,
        cache_type="q8_0",
    ),
    Case(
        "wide-no-flash-attn",
        TinyLlama(
            n_embd=768,
            n_layer=3,
            n_head=12,
            n_head_kv=4,
            n_ff=2048,
            n_vocab=16000,
            context_length=2048,
            dtype="f16",
        ),
        1024,
        parallel=2,
        flash_attn=False,
    ),
    Case(
        "odd-context-ubatch256",
        TinyLlama(
            n_embd=640, n_layer=5, n_head=10, n_head_kv=5, n_ff=1728, n_vocab=4000, dtype="f16"
        ),
        1000,
        parallel=1,
        ubatch=256,
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reported(server: Path, model: Path, case: Case, timeout: float = 60.0) -> dict[str, float]:
    """MiB per buffer kind that llama-server logs at ``-lv 4``, summed over devices.

    The server is killed as soon as it has logged its compute buffer.
    """
    argv = [str(server), "-m", str(model), "--port", str(_free_port()), "-lv", "4", "-t", "1"]
    # CPU only, and -fit off so that the sizes asked for are the sizes used.
    argv += ["-dev", "none", "-fit", "off", "--no-warmup", "-c", str(case.context)]
    argv += ["-ub", str(case.ubatch), "-ctk", case.cache_type, "-ctv", case.cache_type]
    if case.parallel is not None:
        argv += ["-np", str(case.parallel)]
    if case.flash_attn is not None:
        argv += ["-fa", "on" if case.flash_attn else "off"]
    sizes = dict.fromkeys(("model", "KV", "compute", "output"), 0.0)
    lines: queue.Queue[str | None] = queue.Queue()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        tail: list[str] = []
        while True:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                raise AssertionError(f"llama-server exited early:\n{''.join(tail[-20:])}")
            tail.append(line)
            match = _BUFFER.search(line)
            if match:
                sizes[match[2]] += float(match[3])
                if match[2] == "compute":
                    return sizes
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.llama_server
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_estimate_matches_llama_server(case, llama_server, default_model, tmp_path):
    """The estimate is within 10% of llama-server's own report, for each of the model
    weights, the KV cache, the compute buffer and the total (output buffer included).

    Measured on the CPU backend (``-dev none``, all on the host), the only one CI has.
    Weights, KV cache and output buffer follow llama.cpp's allocation rules and agree
    to the report's 0.01 MiB. The compute buffer is a formula fitted to this report:
    these cases agree within 0.2%; over 300 random llama shapes it stayed within 1.5%
    with flash attention and 4.4% without while ``n_ff > n_embd``, but is off by up to
    20% for ``n_ff <= n_embd`` (no such case here). Not checked: a GPU backend's
    compute buffer and the GPU/host split under offload, which follow llama.cpp's
    placement rules without a measurement.
    """
    if case.spec is None:
        model = default_model
    else:
        model = write_tiny_llama(tmp_path / f"{case.name}.gguf", case.spec)
    info = ModelInfo.from_gguf(model)
    e = estimate(
        info,
        context_len=case.context,
        gpu_layers=0,
        parallel=case.parallel or 4,
        kv_unified=case.parallel is None,  # llama-server's automatic slots share one cache
        cache_type_k=case.cache_type,
        cache_type_v=case.cache_type,
        n_ubatch=case.ubatch,
        flash_attn=case.flash_attn,
    )
    got = _reported(llama_server, model, case)
    assert _estimated(e) == pytest.approx(_total(got), rel=0.10, abs=0.011)
    mine = {"model": e.weights_host, "KV": e.kv_host, "compute": e.compute_host}
    for kind, value in mine.items():
        assert value / MiB == pytest.approx(got[kind], rel=0.10, abs=0.011), kind
    # The report's figures are rounded to 0.01 MiB.
    assert e.weights_host / MiB == pytest.approx(got["model"], abs=0.011)
    assert e.kv_host / MiB == pytest.approx(got["KV"], abs=0.011)
    assert e.output / MiB == pytest.approx(got["output"], abs=0.011)


def _estimated(e: MemoryEstimate) -> float:
    return e.host_total / MiB


def _total(got: dict[str, float]) -> float:
    return sum(got.values())
