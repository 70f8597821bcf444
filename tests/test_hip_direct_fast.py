"""hip_direct's GPU fast path: fused ops, paged decode attention, decode buckets and the
whole fast forward pass against ``LlamaModel.forward``.

On the CPU the eager versions run against independent references, the Triton kernels
through Triton's interpreter (when triton is installed), and the fast path end to end
with its eager fallbacks. Tests marked ``gpu`` need CUDA or ROCm and run on the device
machine (bench/gpu/device_run.sh).
"""

from __future__ import annotations

import importlib
import math
from contextlib import aclosing

import anyio
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gguf_factory import TinyLlama, write_tiny_llama  # noqa: E402
from rocmux.types import GenerateConfig, LoadConfig  # noqa: E402
from rocmux_hip_direct import fused  # noqa: E402
from rocmux_hip_direct.engine import Engine  # noqa: E402
from rocmux_hip_direct.fast import (  # noqa: E402
    CTX_LEN,
    N_FIXED,
    POSITION,
    SLOT,
    TOKEN,
    FastPath,
    bytes_per_decode_token,
    decode_buckets,
    pack_decode,
    pick_bucket,
    split_count,
)
from rocmux_hip_direct.gguf_file import GGUFFile  # noqa: E402
from rocmux_hip_direct.model import LlamaModel, apply_rope  # noqa: E402
from rocmux_hip_direct.plugin import HipDirectBackend  # noqa: E402
from rocmux_hip_direct.sampling import SamplingParams  # noqa: E402
from rocmux_hip_direct.tokenizer import Tokenizer  # noqa: E402

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA or ROCm GPU")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a64).all()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


# -- bucket bookkeeping (no GPU) ------------------------------------------------------------


def test_buckets_cover_every_batch_up_to_max_seqs():
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert decode_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert decode_buckets(1) == (1,)
    assert decode_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    buckets = decode_buckets(48)
    for n in range(1, 49):
        b = pick_bucket(n, buckets)
        assert b is not None and b >= n
        assert all(smaller < n for smaller in buckets if smaller < b)
    assert pick_bucket(49, buckets) is None
    with pytest.raises(ValueError):
        decode_buckets(0)


def test_split_count_fills_the_gpu_at_small_batches_only():
    assert split_count(1, 8) == 16
    assert split_count(4, 8) == 8
    assert split_count(32, 8) == 1
    assert split_count(64, 3) == 1
    for b in range(1, 65):
        s = split_count(b, 4)
        assert 1 <= s <= 16 and s & (s - 1) == 0


def test_pack_decode_fills_rows_and_pads_the_bucket():
    page = 4
    buf = np.full((8, N_FIXED + 5), 77, dtype=np.int32)
    rows = [(11, 0, [3]), (12, 9, [5, 1, 7]), (13, 4, [2, 6])]
    pack_decode(rows, buf, 4, page)
    assert buf[:3, TOKEN].tolist() == [11, 12, 13]
    assert buf[:3, POSITION].tolist() == [0, 9, 4]
    # position 9 of blocks [5, 1, 7]: block 7, offset 1; position 4 of [2, 6]: block 6
    assert buf[:3, SLOT].tolist() == [12, 29, 24]
    assert buf[:3, CTX_LEN].tolist() == [1, 10, 5]
    assert buf[1, N_FIXED : N_FIXED + 3].tolist() == [5, 1, 7]
    assert buf[3, :N_FIXED].tolist() == [0, 0, -1, 0]  # padding: no store, no context
    assert (buf[4:] == 77).all()  # rows past the bucket are left alone
    with pytest.raises(ValueError):
        pack_decode(rows, buf, 2, page)


# -- eager fused ops against references ------------------------------------------------------


def _rope_table(n_pos: int, dims: int, base: float = 10000.0) -> torch.Tensor:
    inv = base ** (-torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.stack((ang.cos(), ang.sin()), dim=-1).float()


def test_add_rms_norm_eager_matches_float64_reference():
    x = torch.randn(5, 192)
    delta = torch.randn(5, 192).half()
    w = torch.rand(192) + 0.5
    ref_res = x.double() + delta.double()
    ref = ref_res / torch.sqrt((ref_res**2).mean(-1, keepdim=True) + 1e-5) * w.double()
    res = x.clone()
    out = fused.add_rms_norm_eager(res, delta, w, 1e-5, torch.float32)
    assert rel_err(res, ref_res) < 1e-6
    assert rel_err(out, ref) < 1e-6
    res = x.clone()
    out = fused.add_rms_norm(res, None, w, 1e-5, torch.float16)  # CPU: the eager one
    assert torch.equal(res, x) and out.dtype == torch.float16


def test_swiglu_eager_matches_silu_times_up():
    gu = torch.randn(3, 2 * 80)
    g, u = gu[:, :80].double(), gu[:, 80:].double()
    assert rel_err(fused.swiglu(gu), g / (1 + torch.exp(-g)) * u) < 1e-6


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("rope_dims", [32, 16])
def test_rope_store_eager_matches_apply_rope_and_fills_the_cache(neox, rope_dims):
    n_tok, n_head, n_kv, d = 6, 4, 2, 32
    qkv = torch.randn(n_tok, (n_head + 2 * n_kv) * d)
    positions = torch.tensor([0, 1, 2, 7, 30, 31])
    slots = torch.tensor([5, 6, -1, 9, 0, 13])
    table = _rope_table(64, rope_dims)
    k_cache = torch.full((16, n_kv, d), 9.0)
    v_cache = torch.full((16, n_kv, d), 9.0)
    before = qkv.clone()
    fused.rope_store(
        qkv, positions, slots, table, k_cache, v_cache, n_head, n_kv, d, rope_dims, neox
    )
    mode = "neox" if neox else "normal"
    cs = table[positions]
    q_ref = apply_rope(before[:, : n_head * d].view(n_tok, n_head, d), cs, mode, rope_dims)
    k_ref = apply_rope(
        before[:, n_head * d : (n_head + n_kv) * d].view(n_tok, n_kv, d), cs, mode, rope_dims
    )
    v_ref = before[:, (n_head + n_kv) * d :].view(n_tok, n_kv, d)
    assert rel_err(qkv[:, : n_head * d].view(n_tok, n_head, d), q_ref) < 1e-6
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert rel_err(k_cache[slot], k_ref[t]) < 1e-6
            assert torch.equal(v_cache[slot], v_ref[t])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(16) if s not in written]
    assert (k_cache[untouched] == 9.0).all() and (v_cache[untouched] == 9.0).all()


def _paged_case(
    n_seq: int, n_head: int, n_kv: int, d: int, page: int, lens: list[int], seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random q, a shuffled-block KV cache, block table and lengths."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // page) for n in lens) + 1
    n_blocks = n_seq * width + 3
    perm = torch.randperm(n_blocks, generator=gen)
    table = perm[: n_seq * width].view(n_seq, width).to(torch.int32)
    q = torch.randn(n_seq, n_head, d, generator=gen)
    k_cache = torch.randn(n_blocks * page, n_kv, d, generator=gen)
    v_cache = torch.randn(n_blocks * page, n_kv, d, generator=gen)
    return q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32)


def _dense_attention(q, k_cache, v_cache, table, lens, page, scale):
    """float64 attention of each sequence over its contiguous context."""
    n_seq, n_head, d = q.shape
    n_rep = n_head // k_cache.shape[1]
    out = torch.zeros(n_seq, n_head * d, dtype=torch.float64)
    for b in range(n_seq):
        n = int(lens[b])
        if n == 0:
            continue
        slots = [int(table[b, p // page]) * page + p % page for p in range(n)]
        k = k_cache[slots].double().repeat_interleave(n_rep, dim=1)  # (n, H, d)
        v = v_cache[slots].double().repeat_interleave(n_rep, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v).reshape(-1)
    return out


def test_paged_decode_attention_eager_matches_dense_reference():
    page, scale = 4, 1 / math.sqrt(16)
    q, k, v, table, lens = _paged_case(4, 6, 2, 16, page, [1, 9, 0, 23])
    out = fused.paged_decode_attention(q, k, v, table, lens, page, scale)
    ref = _dense_attention(q, k, v, table, lens, page, scale)
    assert rel_err(out, ref) < 1e-5
    assert (out[2] == 0).all()  # a padding row


# -- Triton kernels through the interpreter --------------------------------------------------


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels module decorated under ``TRITON_INTERPRET=1`` (runs on the CPU)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if HAS_GPU:
        pytest.skip("the GPU tests run the kernels for real")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import rocmux_hip_direct.kernels as kernels
    from triton.runtime import interpreter

    # Triton 3.6's interpreter turns a loaded scalar (a 1-element array there) into a
    # loop bound with int(array), which NumPy 2.4 refuses; take the element instead.
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch)

    yield importlib.reload(kernels)
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(kernels)


def _check_kernels(k, device: str, dtype: torch.dtype, tol: float) -> None:
    """Every kernel against its eager version on fresh random inputs."""
    gen = torch.Generator().manual_seed(7)

    def rnd(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    # add_rms_norm, with and without the residual add; D not a power of two
    for n_rows, n_cols in ((1, 576), (5, 2048)):
        x = rnd(n_rows, n_cols, dt=torch.float32)
        delta, w = rnd(n_rows, n_cols), rnd(n_cols, dt=torch.float32)
        for dl in (delta, None):
            r1, r2 = x.clone(), x.clone()
            got = k.add_rms_norm(r1, dl, w, 1e-5, dtype)
            want = fused.add_rms_norm_eager(r2, dl, w, 1e-5, dtype)
            assert rel_err(r1, r2) < 1e-6
            assert rel_err(got, want) < tol
    # swiglu, width not a multiple of the block
    gu = rnd(3, 2 * 1536)
    assert rel_err(k.swiglu(gu), fused.swiglu_eager(gu)) < tol
    # rope_store, both layouts, partial rotation, padded slots
    for neox, rope_dims, (n_head, n_kv, d) in (
        (False, 64, (9, 3, 64)),
        (True, 64, (8, 2, 64)),
        (True, 32, (4, 4, 64)),
    ):
        n_tok = 7
        qkv = rnd(n_tok, (n_head + 2 * n_kv) * d)
        pos = torch.tensor([0, 3, 4, 5, 60, 61, 100], device=device)
        slots = torch.tensor([1, -1, 2, 3, 40, 41, 7], device=device)
        table = _rope_table(128, rope_dims).to(device)
        caches = [torch.zeros(48, n_kv, d, device=device, dtype=dtype) for _ in range(4)]
        q1, q2 = qkv.clone(), qkv.clone()
        k.rope_store(q1, pos, slots, table, caches[0], caches[1], n_head, n_kv, d, rope_dims, neox)
        fused.rope_store_eager(
            q2, pos, slots, table, caches[2], caches[3], n_head, n_kv, d, rope_dims, neox
        )
        assert rel_err(q1, q2) < tol
        assert rel_err(caches[0], caches[2]) < tol and rel_err(caches[1], caches[3]) < tol
    # paged decode attention: GQA 3 and 4, a padding row, split-K 1..16
    page = 16
    for n_head, n_kv, lens in ((9, 3, [1, 17, 0, 300]), (32, 8, [513, 64, 65, 2])):
        q, kc, vc, table, ln = _paged_case(len(lens), n_head, n_kv, 64, page, lens, seed=3)
        q, kc, vc = q.to(device, dtype), kc.to(device, dtype), vc.to(device, dtype)
        table, ln = table.to(device), ln.to(device)
        ref = _dense_attention(q.cpu(), kc.cpu(), vc.cpu(), table.cpu(), ln.cpu(), page, 0.125)
        for n_split in (1, 4, 16):
            out = torch.full((len(lens), n_head * 64), float("nan"), device=device, dtype=dtype)
            k.paged_decode_attention(q, kc, vc, table, ln, page, 0.125, n_split, out=out)
            assert rel_err(out, ref) < max(tol, 1e-3)
            assert (out[lens.index(0)] == 0).all() if 0 in lens else True


def test_kernels_in_the_interpreter_match_the_eager_versions(interpreted):
    _check_kernels(interpreted, "cpu", torch.float32, 1e-5)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_on_the_gpu_match_the_eager_versions(dtype):
    import rocmux_hip_direct.kernels as kernels

    _check_kernels(kernels, "cuda", dtype, 1e-2 if dtype == torch.bfloat16 else 3e-3)


# -- the fast forward pass against LlamaModel.forward ----------------------------------------

SPEC = TinyLlama(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=192, context_length=256)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("fast") / "tiny.gguf", SPEC)


def _engine(path, device: str, dtype: torch.dtype) -> Engine:
    gguf = GGUFFile(path)
    try:
        model = LlamaModel.load(gguf, torch.device(device), dtype, 128)
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
    finally:
        gguf.close()
    return Engine(
        model, tokenizer, n_ctx=128, max_seqs=4, block_size=4, max_batch_tokens=24, prefill_chunk=8
    )


def _run_both(engine: Engine, fast: FastPath, tol: float) -> int:
    """Step through mixed, chunked-prefill and decode batches; at each step compare the
    fast path's logits with the reference's. Returns the number of steps."""
    greedy = SamplingParams(temperature=0.0)
    prompts = [list(range(5, 5 + n)) for n in (3, 19, 1)]
    for p in prompts[:2]:
        engine.submit(p, greedy, max_tokens=12)
    steps = 0
    while engine.has_work():
        if steps == 4:
            engine.submit(prompts[2], greedy, max_tokens=6)  # joins mid-way
        engine.apply_pending()
        chunks = engine.scheduler.schedule()
        ref, sampled = engine._forward(chunks)
        got, sampled_fast = fast.forward(chunks)
        assert sampled_fast == sampled
        assert rel_err(got, ref) < tol, f"step {steps}"
        for chunk in chunks:
            chunk.seq.n_cached += chunk.n
        engine._sample(ref, sampled)
        steps += 1
    return steps


def test_fast_path_on_the_cpu_matches_the_reference_forward(tiny_path):
    engine = _engine(tiny_path, "cpu", torch.float32)
    assert engine.fast is None  # only a GPU gets it by default
    fast = FastPath(engine.model, engine.cache, 128, 4, graphs=False)
    assert _run_both(engine, fast, 1e-5) > 10
    assert fast.eager_steps > 0 and fast.staged_steps > 0
    assert bytes_per_decode_token(engine.model) > 0


@gpu
def test_fast_path_with_graphs_on_the_gpu_matches_the_reference_forward(tiny_path):
    engine = _engine(tiny_path, "cuda", torch.float16)
    fast = engine.fast
    assert fast is not None and fast.use_graphs
    steps = _run_both(engine, fast, 1e-2)
    assert steps > 10 and fast.graph_steps > 0 and fast.eager_steps > 0
    engine.release()


@gpu
def test_graph_replay_equals_the_same_step_run_eagerly(tiny_path):
    engine = _engine(tiny_path, "cuda", torch.float16)
    fast = engine.fast
    assert fast is not None
    greedy = SamplingParams(temperature=0.0)
    for n in (3, 6, 2):
        engine.submit(list(range(7, 7 + n)), greedy, max_tokens=20)
    for _ in range(6):  # through the prompts into decoding
        engine.step()
    engine.apply_pending()
    chunks = engine.scheduler.schedule()
    assert len(chunks) == 3 and all(c.n == 1 for c in chunks)
    eager = fast.decode_eager(chunks).clone()
    graph, _ = fast.forward(chunks)
    assert rel_err(graph, eager) < 1e-3
    engine.release()


# -- several engine steps per worker-thread trip ---------------------------------------------


@pytest.mark.anyio
async def test_bursts_of_steps_give_the_same_tokens(tiny_model):
    config = GenerateConfig(max_tokens=24, temperature=0)
    prompts = ["hello world", "the model says", "a test of chat"]

    async def one(model, prompt: str, delay: float, out: dict[str, str]) -> None:
        await anyio.sleep(delay)
        pieces = []
        async with aclosing(model.generate(prompt, config)) as stream:
            async for token in stream:
                pieces.append(token.text)
        out[prompt] = "".join(pieces)

    async def run(model) -> dict[str, str]:
        out: dict[str, str] = {}
        async with anyio.create_task_group() as tg:
            for i, prompt in enumerate(prompts):  # the last one joins mid-way
                tg.start_soon(one, model, prompt, 0.05 if i == 2 else 0.0, out)
        return out

    model = await HipDirectBackend().load(tiny_model, LoadConfig(context_len=128, parallel=4))
    try:
        assert model.burst == 1  # the CPU takes one step a trip
        plain = await run(model)
        model.burst = 6
        assert await run(model) == plain
    finally:
        await model.close()


# -- decode steps launched ahead of their tokens ---------------------------------------------


def _overlap_engine(path, device: str, dtype: torch.dtype, overlap: bool) -> Engine:
    engine = _engine(path, device, dtype)
    if engine.fast is None:  # the CPU: the fast path's eager fallbacks, no graphs
        engine.fast = FastPath(engine.model, engine.cache, 128, 4, graphs=False)
    engine.overlap = overlap
    return engine


def _generate(engine: Engine, jobs, cancel_at=None) -> list[list[int]]:
    """Tokens generated for each (prompt, params, max_tokens); the third joins after
    three steps; ``cancel_at`` (step, job) cancels a job."""
    seqs = [engine.submit(p, params, n) for p, params, n in jobs[:2]]
    steps = 0
    while engine.has_work() or len(seqs) < len(jobs):
        if steps == 3:
            seqs += [engine.submit(p, params, n) for p, params, n in jobs[2:]]
        if cancel_at is not None and steps == cancel_at[0]:
            engine.cancel(seqs[cancel_at[1]])
        engine.step()
        steps += 1
    assert all(s.done for s in seqs)
    return [s.tokens[len(s.prompt) :] for s in seqs]


GREEDY_JOBS = [
    (list(range(5, 8)), SamplingParams(temperature=0.0), 12),
    (list(range(9, 28)), SamplingParams(temperature=0.0), 9),
    ([3], SamplingParams(temperature=0.0), 6),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu, id="gpu")])
def test_launching_ahead_gives_the_tokens_of_waiting_for_each_step(tiny_path, device, monkeypatch):
    dtype = torch.float32 if device == "cpu" else torch.float16
    plain = _overlap_engine(tiny_path, device, dtype, overlap=False)
    want = _generate(plain, GREEDY_JOBS)
    assert plain.fast.launched_steps == 0
    ahead = _overlap_engine(tiny_path, device, dtype, overlap=True)
    assert _generate(ahead, GREEDY_JOBS) == want
    assert [len(t) for t in want] == [12, 9, 6]
    assert ahead.fast.launched_steps > 5
    assert not ahead.has_work()
    # a token read one step late that ends its sequence: the step launched meanwhile
    # is dropped, and the other sequences go on as before
    eog = want[0][4]
    cut = want[0].index(eog) + 1
    monkeypatch.setattr(Tokenizer, "is_eog", lambda self, token: token == eog)
    ended = _generate(_overlap_engine(tiny_path, device, dtype, overlap=True), GREEDY_JOBS)
    ref = _generate(_overlap_engine(tiny_path, device, dtype, overlap=False), GREEDY_JOBS)
    monkeypatch.undo()
    assert ended == ref
    assert ended[0] == want[0][:cut]
    # a cancellation while a step is in flight
    cancelled = _generate(
        _overlap_engine(tiny_path, device, dtype, overlap=True), GREEDY_JOBS, cancel_at=(6, 0)
    )
    assert cancelled[1:] == want[1:]
    assert cancelled[0] == want[0][: len(cancelled[0])]
    for engine in (plain, ahead):
        engine.release()


def test_seeded_sampling_on_the_device_path_is_reproducible(tiny_path):
    jobs = [
        (list(range(5, 8)), SamplingParams(temperature=0.9, top_k=0, top_p=0.9, seed=1), 10),
        (list(range(9, 20)), SamplingParams(temperature=0.0), 10),
        ([3, 4], SamplingParams(temperature=1.5, top_k=5, min_p=0.0, seed=2), 8),
    ]
    first = _generate(_overlap_engine(tiny_path, "cpu", torch.float32, overlap=True), jobs)
    again = _generate(_overlap_engine(tiny_path, "cpu", torch.float32, overlap=True), jobs)
    assert first == again
    assert (
        first[1]
        == _generate(_overlap_engine(tiny_path, "cpu", torch.float32, overlap=False), jobs)[1]
    )
    assert [len(t) for t in first] == [10, 10, 8]


def test_sampling_rows_follows_the_chain_of_the_host_sampler():
    from rocmux_hip_direct.sampling import candidates, row_params, sample_rows, top_k_of

    gen = torch.Generator().manual_seed(0)
    n_vocab = 50
    logits = torch.randn(4, n_vocab, generator=gen) * 3
    params = [
        SamplingParams(temperature=0.7),  # llama-server's defaults
        SamplingParams(temperature=1.3, top_k=0, top_p=1.0, min_p=0.0),
        SamplingParams(temperature=0.5, top_k=3, top_p=0.5),
        SamplingParams(temperature=0.0),
    ]
    greedy = torch.argmax(logits, dim=-1)
    k_max = max(top_k_of(p, n_vocab) for p in params)
    for u in np.linspace(0.0, 0.999, 37):
        rows = np.array([row_params(p, n_vocab, float(u)) for p in params], np.float32)
        got = sample_rows(logits, torch.from_numpy(rows), k_max, greedy).tolist()
        for i, p in enumerate(params):
            if p.greedy:
                assert got[i] == int(greedy[i])
                continue
            ids, probs = candidates(logits[i], p)
            pick = int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor(u), right=True))
            assert got[i] == int(ids[min(pick, len(ids) - 1)]), (i, u)
