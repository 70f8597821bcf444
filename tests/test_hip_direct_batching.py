"""hip_direct prefills concurrent prompts together: several prompts share an engine step
(the GPU step budget), and the fast path attends a step's fresh prompts as one padded
batch. Everything here runs on the CPU; the batch sizes are watched through
``Engine.on_step``.
"""

from __future__ import annotations

import anyio
import pytest

torch = pytest.importorskip("torch")

from gguf_factory import TinyLlama, write_tiny_llama  # noqa: E402
from rocmux.types import GenerateConfig, LoadConfig  # noqa: E402
from rocmux_hip_direct import fast as fast_module  # noqa: E402
from rocmux_hip_direct.engine import Engine  # noqa: E402
from rocmux_hip_direct.fast import FastPath, group_prompts  # noqa: E402
from rocmux_hip_direct.gguf_file import GGUFFile  # noqa: E402
from rocmux_hip_direct.kv_cache import BlockAllocator  # noqa: E402
from rocmux_hip_direct.loader import step_budget  # noqa: E402
from rocmux_hip_direct.model import LlamaModel  # noqa: E402
from rocmux_hip_direct.plugin import HipDirectBackend  # noqa: E402
from rocmux_hip_direct.sampling import SamplingParams  # noqa: E402
from rocmux_hip_direct.scheduler import ScheduledChunk, Scheduler, Sequence  # noqa: E402
from rocmux_hip_direct.tokenizer import Tokenizer  # noqa: E402

SPEC = TinyLlama(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=192, context_length=1024)
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("batching") / "tiny.gguf", SPEC)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")


def _engine(
    path,
    n_ctx: int,
    max_seqs: int,
    budget: tuple[int, int],
    block: int = 16,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    whole_prompts: bool = False,
) -> Engine:
    gguf = GGUFFile(path)
    try:
        model = LlamaModel.load(gguf, torch.device(device), dtype, n_ctx)
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
    finally:
        gguf.close()
    return Engine(
        model,
        tokenizer,
        n_ctx=n_ctx,
        max_seqs=max_seqs,
        block_size=block,
        max_batch_tokens=budget[0],
        prefill_chunk=budget[1],
        whole_prompts=whole_prompts,
    )


def _watch(engine: Engine) -> list[list[tuple[int, int]]]:
    """Each step's (sequence id, tokens) chunks, as ``Engine.on_step`` reports them."""
    steps: list[list[tuple[int, int]]] = []

    def record(chunks: list[ScheduledChunk]) -> None:
        steps.append([(c.seq.id, c.n) for c in chunks])

    engine.on_step = record
    return steps


def _prompt(i: int, n: int) -> list[int]:
    return [(7 * i + j) % 200 + 5 for j in range(n)]


# -- the step budget ----------------------------------------------------------------------


def test_step_budget_is_large_on_a_gpu_and_unchanged_on_the_cpu():
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert step_budget(gpu) == (4096, 4096)
    assert step_budget(gpu, "1024") == (1024, 1024)
    assert step_budget(cpu) == (512, 256)  # as before: CPU numerics and latency untouched
    assert step_budget(cpu, "16") == (16, 16)


def test_eight_prompts_of_200_tokens_are_prefilled_in_one_step(tiny_path):
    engine = _engine(tiny_path, n_ctx=256, max_seqs=8, budget=step_budget(torch.device("cuda")))
    steps = _watch(engine)
    seqs = [engine.submit(_prompt(i, 200), GREEDY, max_tokens=4) for i in range(8)]
    while engine.step():
        pass
    assert all(s.done and s.n_generated == 4 for s in seqs)
    with_prompt = [s for s in steps if any(n > 1 for _, n in s)]
    assert len(with_prompt) == 1
    assert sorted(with_prompt[0]) == [(s.id, 200) for s in seqs]  # the batch size: 8 prompts
    # then three decode steps of all eight, one token each
    assert len(steps) == 1 + 3
    assert all(sorted(n for _, n in s) == [1] * 8 for s in steps[1:])


def test_the_old_gpu_budget_took_a_step_per_prompt(tiny_path):
    """The cause of the slow concurrent prefill on a GPU: at the old 512 tokens a step,
    eight 512-token prompts took a step each (and left tails to the next), so the last
    one waited for eight steps; the GPU budget takes them in one."""
    for budget, prefill_steps in [((512, 512), 9), (step_budget(torch.device("cuda")), 1)]:
        engine = _engine(tiny_path, n_ctx=640, max_seqs=8, budget=budget)
        steps = _watch(engine)
        for i in range(8):
            engine.submit(_prompt(i, 512), GREEDY, max_tokens=2)
        while engine.step():
            pass
        assert len([s for s in steps if any(n > 1 for _, n in s)]) == prefill_steps


def test_whole_prompts_wait_for_the_next_step_instead_of_being_cut():
    def schedule(whole: bool) -> list[list[tuple[int, int]]]:
        scheduler = Scheduler(BlockAllocator(64, 16), 8, 64, 64, whole_prompts=whole)
        for i in range(3):
            scheduler.add(Sequence(id=i + 1, prompt=list(range(1, 31)), max_tokens=4))
        steps = []
        for _ in range(2):
            chunks = scheduler.schedule()
            steps.append([(c.seq.id, c.n) for c in chunks])
            for c in chunks:
                done = c.completes
                c.seq.n_cached += c.n
                if done:
                    c.seq.tokens.append(7)
        return steps

    assert schedule(False) == [[(1, 30), (2, 30), (3, 4)], [(1, 1), (2, 1), (3, 26)]]
    assert schedule(True) == [[(1, 30), (2, 30)], [(1, 1), (2, 1), (3, 30)]]
    # a prompt alone in a step is still cut: it could never fit otherwise
    scheduler = Scheduler(BlockAllocator(64, 16), 8, 64, 64, whole_prompts=True)
    scheduler.add(Sequence(id=1, prompt=list(range(1, 101)), max_tokens=4))
    assert [(c.seq.id, c.n) for c in scheduler.schedule()] == [(1, 64)]


def test_thirty_two_prompts_on_the_gpu_budget_leave_no_tails(tiny_path):
    """As ``rocmux bench`` at c=32: 32 prompts of 512 tokens go in whole, eight or seven
    a step, with the decode tokens of those already in; none is cut in two."""
    engine = _engine(tiny_path, 640, 32, step_budget(torch.device("cuda")), whole_prompts=True)
    steps = _watch(engine)
    for i in range(32):
        engine.submit(_prompt(i, 512), GREEDY, max_tokens=2)
    while engine.step():
        pass
    prompt_chunks = [n for s in steps for _, n in s if n > 1]
    assert prompt_chunks == [512] * 32
    assert len([s for s in steps if any(n > 1 for _, n in s)]) == 5


@pytest.mark.anyio
async def test_concurrent_requests_share_prefill_steps(tiny_path):
    """Through the TextModel, as ``rocmux bench`` drives it: eight streams at once."""
    loaded = await HipDirectBackend().load(
        tiny_path,
        LoadConfig(
            context_len=256, parallel=8, threads=1, extra_flags=("--max-batch-tokens", "4096")
        ),
    )
    async with loaded:
        engine = loaded.engine
        steps = _watch(engine)
        text = " ".join(["hello world the model is a test"] * 32)
        n_prompt = len(loaded.tokenize(text, add_special=True))
        assert 150 < n_prompt < 256 - 8
        results: list[int] = []

        async def one() -> None:
            n = 0
            async for token in loaded.generate(text, GenerateConfig.greedy(max_tokens=4)):
                n += token.text != ""
            results.append(n)

        # Hold the step lock until all eight are queued, as if they arrived together.
        await loaded._lock.acquire()
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
            try:
                with anyio.fail_after(10):
                    while len(engine._incoming) < 8:
                        await anyio.sleep(0.01)
            finally:
                loaded._lock.release()
        assert len(results) == 8
        with_prompt = [s for s in steps if any(n > 1 for _, n in s)]
        assert len(with_prompt) == 1  # all eight prompts in one step
        assert sorted(n for _, n in with_prompt[0]) == [n_prompt] * 8
        assert len(steps) <= 1 + 3


# -- one padded attention batch for a step's fresh prompts --------------------------------


def test_prompts_of_similar_length_are_grouped():
    assert group_prompts([]) == []
    assert group_prompts([512] * 8) == [list(range(8))]
    assert group_prompts([100, 10]) == [[0], [1]]  # padding 10 to 100 costs too much
    assert group_prompts([30, 100, 90, 25]) == [[1, 2], [0, 3]]
    assert group_prompts([5, 5, 4], slack=1.0) == [[0, 1], [2]]


def _step_both(engine: Engine, fast: FastPath, tol: float) -> None:
    """Step through packed, padded, resumed and mixed steps, comparing the fast path's
    logits with ``LlamaModel.forward``'s at every step."""
    lengths = [20, 20, 20, 17, 9, 24, 28]
    for i, n in enumerate(lengths[:5]):
        engine.submit(_prompt(i, n), GREEDY, max_tokens=6)
    steps = 0
    while engine.has_work():
        if steps == 2:  # join while the others decode
            for i, n in enumerate(lengths[5:], start=5):
                engine.submit(_prompt(i, n), GREEDY, max_tokens=5)
        engine.apply_pending()
        chunks = engine.scheduler.schedule()
        ref, sampled = engine._forward(chunks)
        got, sampled_fast = fast.forward(chunks)
        assert sampled_fast == sampled
        err = float((got.double() - ref.double()).norm() / ref.double().norm())
        assert err < tol, f"step {steps}: {[(c.seq.id, c.seq.n_cached, c.n) for c in chunks]}"
        for chunk in chunks:
            chunk.seq.n_cached += chunk.n
        engine._sample(ref, sampled)
        steps += 1


@pytest.fixture
def built(monkeypatch) -> list[tuple[int, bool]]:
    """(prompts, attended as a view) of every padded batch the fast path builds."""
    seen: list[tuple[int, bool]] = []
    real_build = fast_module._Batch.build

    def spy(starts, lengths, device):
        batch = real_build(starts, lengths, device)
        seen.append((len(starts), batch.gather is None))
        return batch

    monkeypatch.setattr(fast_module._Batch, "build", spy)
    return seen


@pytest.mark.parametrize("fast_seqs", [8, 2])  # 2: more decode rows than any bucket holds
def test_fast_path_batches_prompts_and_matches_the_reference_forward(tiny_path, built, fast_seqs):
    engine = _engine(tiny_path, n_ctx=128, max_seqs=8, budget=(62, 62), block=4)
    fast = FastPath(engine.model, engine.cache, 128, fast_seqs, graphs=False)
    _step_both(engine, fast, 1e-5)
    assert (3, True) in built  # three 20-token prompts back to back: a view
    assert any(n > 1 and not view for n, view in built)  # unequal lengths: padded
    assert fast.eager_steps > 0
    assert fast.staged_steps > 0 if fast_seqs == 8 else fast.staged_steps == 0


@gpu
def test_batched_prefill_with_graphs_on_the_gpu_matches_the_reference_forward(tiny_path, built):
    engine = _engine(tiny_path, 128, 8, (62, 62), block=4, device="cuda", dtype=torch.float16)
    fast = engine.fast
    assert fast is not None and fast.use_graphs
    _step_both(engine, fast, 1e-2)
    assert (3, True) in built
    assert any(n > 1 and not view for n, view in built)
    assert fast.eager_steps > 0 and fast.graph_steps > 0
    engine.release()
