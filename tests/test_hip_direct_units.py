"""hip_direct's parts on their own: dequantization, numerics, pre-tokenizer, tokenizer,
chat template, KV-cache allocator, scheduler and sampler."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

torch = pytest.importorskip("torch")

from rocmux.types import GenerateConfig, Message  # noqa: E402
from rocmux_hip_direct.chat_template import ChatTemplate, TemplateError  # noqa: E402
from rocmux_hip_direct.dequant import block_mins, dequantize  # noqa: E402
from rocmux_hip_direct.gguf_file import GGUFFile  # noqa: E402
from rocmux_hip_direct.kv_cache import BlockAllocator, OutOfBlocks, PageTable  # noqa: E402
from rocmux_hip_direct.model import apply_rope  # noqa: E402
from rocmux_hip_direct.numerics import (  # noqa: E402
    BlockWeight,
    cos_sin_f32,
    div,
    ggml_block_matmul,
    ggml_dot_f16,
    ggml_expf,
    glibc_expf,
    quantize_q8_32,
    quantize_q8_k,
)
from rocmux_hip_direct.pretokenize import pre_tokenizer_regexes, regex_split  # noqa: E402
from rocmux_hip_direct.sampling import SamplingParams, sample  # noqa: E402
from rocmux_hip_direct.scheduler import Scheduler, Sequence, Status  # noqa: E402
from rocmux_hip_direct.tokenizer import Tokenizer  # noqa: E402

Q = GGMLQuantizationType
RNG = np.random.default_rng(1234)


# -- dequantization ---------------------------------------------------------------------------


def _random_blocks(qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Random bytes of a quantized matrix whose fp16 scales are finite, as real ones are."""
    block, size = GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    raw = RNG.integers(0, 256, size=(n, size), dtype=np.uint8)

    def scale(offset: int) -> None:
        values = RNG.uniform(-0.05, 0.05, n).astype(np.float16)
        raw[:, offset : offset + 2] = values.view(np.uint8).reshape(n, 2)

    offsets = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for offset in offsets:
        scale(offset)
    return raw.reshape(-1)


def _quantized(qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Random floats quantized by gguf-py (types it can quantize)."""
    data = RNG.standard_normal((rows, cols)).astype(np.float32)
    packed = data if qtype == Q.F32 else quants.quantize(data, qtype)
    return np.ascontiguousarray(packed).view(np.uint8).reshape(-1)


@pytest.mark.parametrize(
    "qtype",
    [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K],
    ids=lambda q: q.name,
)
def test_dequantize_matches_gguf_reference_bit_for_bit(qtype):
    rows, cols = 8, 512
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        raw = _random_blocks(qtype, rows, cols)
    else:
        raw = _quantized(qtype, rows, cols)
    reference = quants.dequantize(raw.reshape(rows, -1), qtype).reshape(rows, cols)
    ours = dequantize(raw, qtype, (rows, cols)).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_1], ids=lambda q: q.name)
def test_block_minimums_split_off_and_back(qtype):
    raw = _quantized(qtype, 4, 256)
    full = dequantize(raw, qtype, (4, 256))
    scaled = dequantize(raw, qtype, (4, 256), with_mins=False)
    mins = block_mins(raw, qtype, (4, 256))
    assert mins.shape == (4, 8)
    torch.testing.assert_close(scaled + mins.repeat_interleave(32, dim=1), full)


def test_dequantize_to_half_and_tensor_reader(tiny_model):
    gguf = GGUFFile(tiny_model)
    info = gguf.tensors["blk.0.attn_q.weight"]
    weight = dequantize(gguf.raw(info.name), info.qtype, info.shape, dtype=torch.float16)
    assert weight.dtype == torch.float16 and tuple(weight.shape) == info.shape
    assert gguf.architecture == "llama" and gguf.get("{arch}.block_count") == 2
    gguf.close()


# -- llama.cpp numerics -----------------------------------------------------------------------


def test_q8_activation_rounding_lies_on_the_block_grid():
    x = torch.randn(3, 128) * 4
    x_hat, sums = quantize_q8_32(x)
    blocks, hat = x.reshape(-1, 32), x_hat.reshape(-1, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    q = hat / d
    torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-4)
    assert q.abs().max() <= 127
    assert (hat - blocks).abs().max() <= d.max() * 0.51 + 1e-6
    assert sums.shape == (3, 4)
    k_hat = quantize_q8_k(torch.randn(2, 512))
    assert k_hat.shape == (2, 512)


F32 = np.float32


def _q8_1_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q8_1 (x86), one float32 operation at a time: quants, fp16 d, fp16 s."""
    qs, ds, ss = [], [], []
    for block in x.reshape(-1, 32).astype(F32):
        amax = F32(np.abs(block).max())
        d = F32(amax / F32(127))
        inv = F32(F32(127) / amax) if amax != 0 else F32(0)
        q = np.rint((block * inv).astype(F32))  # _mm256_round_ps: half to even
        qs.append(q)
        ds.append(np.float16(d))
        ss.append(np.float16(F32(d * F32(q.sum()))))
    return np.array(qs), np.array(ds), np.array(ss)


def test_q8_1_activation_quantizer_matches_ggml_formula():
    x = RNG.standard_normal((6, 96)).astype(F32) * 3
    x[0, 0] = 40.0  # an outlier: the block's other values round to a few levels
    q, d, s = _q8_1_reference(x)
    x_hat, sums = quantize_q8_32(torch.from_numpy(x))
    expected = (q * d.astype(F32)[:, None]).reshape(x.shape)
    np.testing.assert_array_equal(x_hat.numpy(), expected)
    np.testing.assert_array_equal(sums.numpy().reshape(-1), s.astype(F32))


def test_q8_rounding_on_ties_and_single_divisions():
    # amax 127 gives id = 1: 2.5 -> 2 and 3.5 -> 4 (ties to even), -0.5 -> -0.
    block = np.zeros(32, dtype=F32)
    block[:4] = [127.0, 2.5, 3.5, -0.5]
    x_hat, _ = quantize_q8_32(torch.from_numpy(block))
    assert x_hat[:4].tolist() == [127.0, 2.0, 4.0, -0.0]
    # From the default model: x * (127/amax) is 27.5 in float32 with one division;
    # torch's 127.0 / tensor (reciprocal times 127) gives 27.499998 and rounds to 27.
    block = np.full(32, 0.01, dtype=F32)
    block[0], block[1] = 0.49766236543655396, 0.10776153206825256
    x_hat, _ = quantize_q8_32(torch.from_numpy(block))
    d = float(np.float16(F32(block[0]) / F32(127)))
    assert x_hat[1].item() == F32(28 * d)
    a = torch.from_numpy(RNG.uniform(1e-3, 10.0, 4096).astype(F32))
    np.testing.assert_array_equal(div(127.0, a).numpy(), F32(127) / a.numpy())
    np.testing.assert_array_equal(div(a, 127.0).numpy(), a.numpy() / F32(127))


def test_q8_k_quantizer_matches_ggml_reference():
    x = RNG.standard_normal((2, 512)).astype(F32)
    x[1, 300] = -9.0  # the block maximum is negative: the scale is -127/max
    expected = []
    for block in x.reshape(-1, 256):
        mx = block[np.argmax(np.abs(block))]  # first of equal maxima, as the C loop
        iscale = F32(F32(-127) / mx)
        q = np.minimum(np.rint((block * iscale).astype(F32)), 127)  # nearest_int
        expected.append(q * F32(F32(1) / iscale))
    np.testing.assert_array_equal(
        quantize_q8_k(torch.from_numpy(x)).numpy().reshape(-1, 256), expected
    )


def _dot_reference(x: np.ndarray, w: BlockWeight) -> np.ndarray:
    """ggml_vec_dot_q4_1_q8_1 (AVX2 build, FMA contraction) for one row, element by
    element: 8 fma accumulators, hsum_float_8, the minimum term by fma."""
    q, d, s = _q8_1_reference(x)
    wq = w.q.permute(3, 1, 2, 0).reshape(w.out_features, -1).numpy()  # (out, K) quants
    wd, wm = w.d.numpy(), None if w.m is None else w.m.numpy()
    out = np.empty(w.out_features, dtype=F32)
    for o in range(w.out_features):
        acc = np.zeros(8, dtype=F32)
        summs = F32(0)
        for b in range(w.n_blocks):
            scale = F32(wd[b, o] * F32(d[b]))
            for lane in range(8):
                cols = slice(b * 32 + lane * 4, b * 32 + lane * 4 + 4)
                dot = float(np.dot(wq[o, cols].astype(np.float64), q[b, lane * 4 : lane * 4 + 4]))
                acc[lane] = F32(float(scale) * dot + float(acc[lane]))  # fma: one rounding
            if wm is not None:
                summs = F32(float(wm[b, o]) * float(F32(s[b])) + float(summs))
        hsum = F32(
            F32(F32(acc[0] + acc[4]) + F32(acc[2] + acc[6]))
            + F32(F32(acc[1] + acc[5]) + F32(acc[3] + acc[7]))
        )
        out[o] = F32(hsum + summs)
    return out


def test_block_matmul_rounds_like_ggml_vec_dot_q4_1_q8_1():
    rows, cols = 5, 128
    raw = _quantized(Q.Q4_1, rows, cols)
    w = BlockWeight(Q.Q4_1, torch.from_numpy(raw), rows)
    x = RNG.standard_normal((3, cols)).astype(F32)
    ours = ggml_block_matmul(torch.from_numpy(x), w).numpy()
    for i in range(3):
        np.testing.assert_array_equal(ours[i], _dot_reference(x[i], w))
    # Stacked weights (Q/K/V in one product) give the same numbers as each alone.
    raw2 = _quantized(Q.Q4_1, 3, cols)
    w2 = BlockWeight(Q.Q4_1, torch.from_numpy(raw2), 3)
    both = ggml_block_matmul(torch.from_numpy(x), BlockWeight.concat([w, w2])).numpy()
    np.testing.assert_array_equal(both[:, :rows], ours)
    np.testing.assert_array_equal(both[:, rows:], ggml_block_matmul(torch.from_numpy(x), w2))


def test_block_matmul_split_across_threads_gives_the_same_numbers():
    rows, cols = 1024, 64
    w = BlockWeight(Q.Q4_1, torch.from_numpy(_quantized(Q.Q4_1, rows, cols)), rows)
    x = torch.from_numpy(RNG.standard_normal((16, cols)).astype(F32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ggml_block_matmul(x, w)
        torch.set_num_threads(3)  # chains of 16 * 8 * 1024 elements: split in three
        np.testing.assert_array_equal(ggml_block_matmul(x, w).numpy(), one.numpy())
    finally:
        torch.set_num_threads(threads)


def _libm_or_skip():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("m")
    if name is None or "libm.so.6" not in name:
        pytest.skip("glibc's libm is not available")
    lib = ctypes.CDLL(name)
    lib.expf.restype = ctypes.c_float
    lib.expf.argtypes = [ctypes.c_float]
    lib.cosf.restype = ctypes.c_float
    lib.cosf.argtypes = [ctypes.c_float]
    return lib


def test_glibc_expf_is_bit_exact():
    libm = _libm_or_skip()
    x = np.concatenate(
        [RNG.uniform(-30, 0, 20000), RNG.uniform(-104, 89, 20000), [0.0, -1e-30, 88.7, -103.9]]
    ).astype(F32)
    expected = np.array([libm.expf(float(v)) for v in x], dtype=F32)
    np.testing.assert_array_equal(glibc_expf(torch.from_numpy(x)).numpy(), expected)
    # Correct rounding would not do: glibc's polynomial is off by an ulp now and then.
    rounded = torch.exp(torch.from_numpy(x).double()).float().numpy()
    assert (rounded != expected).sum() > 0
    edge = glibc_expf(torch.tensor([float("-inf"), -200.0, 100.0]))
    assert edge.tolist() == [0.0, 0.0, float("inf")]


def test_rope_angles_and_rotation_as_ggml_computes_them():
    libm = _libm_or_skip()
    angles = torch.from_numpy(RNG.uniform(0, 500, 257).astype(F32))
    cos, _ = cos_sin_f32(angles)
    np.testing.assert_array_equal(cos.numpy(), [libm.cosf(float(a)) for a in angles])
    # rotate_pairs with FMA contraction: fma(x0, c, -(x1*s)), fma(x0, s, x1*c).
    x = torch.from_numpy(RNG.standard_normal((4, 2, 8)).astype(F32))
    cs = torch.from_numpy(RNG.uniform(-1, 1, (4, 4, 2)).astype(F32))
    ours = apply_rope(x, cs, "normal", 8, fused=True).numpy()
    x0, x1 = x.numpy()[..., 0::2].astype(np.float64), x.numpy()[..., 1::2].astype(np.float64)
    c = cs.numpy()[:, None, :, 0].astype(np.float64)
    s = cs.numpy()[:, None, :, 1].astype(np.float64)
    np.testing.assert_array_equal(ours[..., 0::2], (x0 * c - (x1 * s).astype(F32)).astype(F32))
    np.testing.assert_array_equal(ours[..., 1::2], (x0 * s + (x1 * c).astype(F32)).astype(F32))


def test_ggml_expf_and_dot_are_close_to_exact():
    x = torch.linspace(-30, 30, 4001)
    relative = ggml_expf(x).double() / torch.exp(x.double()) - 1
    assert relative.abs().max() < 3e-7
    q = torch.randn(2, 3, 5, 64).half().float()
    k = torch.randn(2, 3, 7, 64).half().float()
    torch.testing.assert_close(ggml_dot_f16(q, k), q @ k.transpose(-1, -2), rtol=1e-5, atol=1e-4)


# -- pre-tokenizer and tokenizer -----------------------------------------------------------------


def test_smollm_pretokenizer_splits_digits_and_keeps_every_character():
    regexes = pre_tokenizer_regexes("smollm")
    text = "Hello world's 12345 café 😀  \n\n  x"
    words = regex_split(text, regexes)
    assert "".join(words) == text
    assert words[:3] == ["Hello", " world", "'s"]
    assert [w for w in words if w.isdigit()] == ["1", "2", "3", "4", "5"]


def test_unknown_pretokenizer_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        pre_tokenizer_regexes("no-such-pre")


def test_spm_tokenizer_round_trips_text(tiny_model):
    tokenizer = Tokenizer.from_metadata(GGUFFile(tiny_model).metadata)
    text = "hello world, the model 123 ✓ naïve"
    ids = tokenizer.encode(text, add_special=True)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids) == " " + text  # SentencePiece's leading space
    assert tokenizer.encode("<|im_start|>", add_special=False, parse_special=True) == [
        tokenizer.token_to_id["<|im_start|>"]
    ]
    assert len(tokenizer.encode("<|im_start|>", add_special=False, parse_special=False)) > 1


# -- chat template ----------------------------------------------------------------------------


def test_chat_template_renders_and_raises():
    template = ChatTemplate(None, bos_token="<s>", eos_token="</s>")
    text = template.render([Message("user", "hi")])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    failing = ChatTemplate("{{ raise_exception('no system role') }}")
    with pytest.raises(TemplateError, match="no system role"):
        failing.render([Message("system", "x")])
    trimmed = ChatTemplate(
        "{% for m in messages %}\n  {% if true %}\n{{ m.content }}\n{% endif %}\n{% endfor %}"
    )
    assert trimmed.render([Message("user", "a")]) == "a\n"


# -- paged KV cache ---------------------------------------------------------------------------


def test_allocator_allocates_frees_and_reuses():
    allocator = BlockAllocator(n_blocks=4, block_size=16)
    blocks = [allocator.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3] and allocator.n_free == 0
    with pytest.raises(OutOfBlocks):
        allocator.allocate()
    allocator.free([blocks[2]])
    assert allocator.allocate() == blocks[2]  # the block just freed comes back first
    with pytest.raises(ValueError, match="not allocated"):
        allocator.free([99])
    allocator.free(blocks)
    assert allocator.n_free == 4 and allocator.n_used == 0


def test_page_table_maps_positions_to_slots_and_releases():
    allocator = BlockAllocator(n_blocks=3, block_size=4)
    table = PageTable(allocator)
    assert table.ensure(6) and len(table.blocks) == 2
    assert table.slots(0, 6) == [table.blocks[0] * 4 + i for i in range(4)] + [
        table.blocks[1] * 4 + i for i in range(2)
    ]
    assert not table.ensure(20) and len(table.blocks) == 2  # nothing taken on failure
    table.release()
    assert allocator.n_free == 3 and table.blocks == []


# -- scheduler --------------------------------------------------------------------------------


def _seq(i: int, n_prompt: int, max_tokens: int = 8) -> Sequence:
    return Sequence(id=i, prompt=list(range(1, n_prompt + 1)), max_tokens=max_tokens)


def _advance(chunks) -> None:
    """What the engine does after a step: mark the chunk cached, sample a token."""
    for chunk in chunks:
        chunk.seq.n_cached += chunk.n
        if chunk.seq.n_cached == len(chunk.seq.tokens):
            chunk.seq.tokens.append(7)


def test_scheduler_prefills_long_prompts_in_chunks_and_joins_new_requests():
    scheduler = Scheduler(BlockAllocator(64, 16), max_seqs=4, max_batch_tokens=64, prefill_chunk=48)
    first = _seq(1, 100)
    scheduler.add(first)
    chunks = scheduler.schedule()
    assert [(c.seq.id, c.n) for c in chunks] == [(1, 48)]
    _advance(chunks)
    late = _seq(2, 10)
    scheduler.add(late)  # joins between steps
    chunks = scheduler.schedule()
    assert [(c.seq.id, c.n) for c in chunks] == [(1, 48), (2, 10)]
    _advance(chunks)
    chunks = scheduler.schedule()  # 2 decodes first, then the rest of 1's prompt
    assert [(c.seq.id, c.n) for c in chunks] == [(2, 1), (1, 4)]
    assert chunks[1].completes


def test_scheduler_preempts_the_youngest_when_blocks_run_out_and_frees_on_finish():
    allocator = BlockAllocator(3, 4)
    scheduler = Scheduler(allocator, max_seqs=4, max_batch_tokens=64, prefill_chunk=64)
    old, young = _seq(1, 4), _seq(2, 4)
    scheduler.add(old)
    scheduler.add(young)
    _advance(scheduler.schedule())  # both prefill: 2 blocks, 1 free
    _advance(scheduler.schedule())  # old decodes into the free block; young fits in its own
    chunks = scheduler.schedule()  # young needs a block at position 8: none left
    assert young.status is Status.WAITING and young.n_cached == 0
    assert [c.seq.id for c in chunks] == [1] or [c.seq.id for c in chunks] == [1, 2]
    scheduler.finish(old, "stop")
    scheduler.finish(young, "cancelled")
    assert allocator.n_free == 3 and not scheduler.has_work()


def test_sequence_holds_back_possible_stop_strings():
    seq = Sequence(id=1, prompt=[1], max_tokens=10, stop=("STOP",))
    assert seq.feed(b"Hello S") == "Hello "
    assert seq.feed(b"T") == ""
    assert seq.feed(b"ay") == "STay"
    assert seq.feed(b" ST") == " "
    assert seq.feed(b"OP and more") == ""
    assert seq.finish_reason == "stop" and seq.text.startswith("Hello STay STOP")
    split = Sequence(id=2, prompt=[1], max_tokens=10)
    assert split.feed("é".encode()[:1]) == ""  # half a UTF-8 character waits
    assert split.feed("é".encode()[1:]) == "é"


# -- sampling ---------------------------------------------------------------------------------


def test_sampling_seeded_top_k_one_and_filters():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams.from_config(GenerateConfig(temperature=1.0, seed=42))
    first = [sample(logits, params, params.generator()) for _ in range(5)]
    second = [sample(logits, params, params.generator()) for _ in range(5)]
    assert first == second  # the same seed, the same draw
    greedy = SamplingParams.from_config(GenerateConfig.greedy())
    top1 = SamplingParams.from_config(GenerateConfig(temperature=1.5, top_k=1, seed=3))
    best = int(torch.argmax(logits))
    assert sample(logits, greedy, greedy.generator()) == best
    assert sample(logits, top1, top1.generator()) == best
    narrow = SamplingParams.from_config(GenerateConfig(temperature=1.0, top_k=3, seed=1))
    gen = narrow.generator()
    allowed = set(torch.topk(logits, 3).indices.tolist())
    assert {sample(logits, narrow, gen) for _ in range(50)} <= allowed
    nucleus = SamplingParams.from_config(GenerateConfig(temperature=1.0, top_p=0.0, seed=1))
    assert sample(logits, nucleus, nucleus.generator()) == best  # min_keep = 1


def test_repeat_penalty_changes_the_greedy_choice():
    logits = torch.tensor([1.0, 2.0, 1.9, -1.0])
    plain = SamplingParams.from_config(GenerateConfig.greedy())
    penalized = SamplingParams.from_config(
        GenerateConfig(temperature=0.0, repeat_penalty=1.5, seed=0)
    )
    assert sample(logits, plain, plain.generator(), recent=[1]) == 1
    assert sample(logits, penalized, penalized.generator(), recent=[1]) == 2
