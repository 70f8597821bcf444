"""The engine: model, KV cache, scheduler and sampler, advanced one step at a time.

``step()`` is synchronous and meant for a worker thread. Requests and cancellations
arrive from other threads through thread-safe queues and are applied at the start
and end of a step, so the scheduler's state is only ever touched by the thread that
steps (or, between steps, by whoever holds the caller's step lock).

With the fast path (a GPU), decode steps overlap the host's work: a step of single
tokens whose sequences can all be sampled on the device is launched without waiting
for it, and while the same batch keeps decoding, each ``step()`` launches the next
step (its tokens fed on the device) before it reads the last one's tokens and does
their host work (stop checks, text, events). A sequence that a token read one step
late ends has one more step computed for it, whose token is dropped. Anything else
(a new or cancelled request, a sequence about to reach its length, preemption, a
prompt chunk) first reads the tokens in flight, then steps as before.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import numpy as np
import torch
from rocmux.types import Token, Usage

from rocmux_hip_direct.fast import FastPath, Launched, pick_bucket
from rocmux_hip_direct.kv_cache import PagedKVCache
from rocmux_hip_direct.model import LlamaModel, SeqBatch
from rocmux_hip_direct.sampling import SamplingParams, row_params, sample, top_k_of
from rocmux_hip_direct.scheduler import ScheduledChunk, Scheduler, Sequence, Status

if TYPE_CHECKING:
    from rocmux_hip_direct.tokenizer import Tokenizer


@attrs.define(eq=False)
class _InFlight:
    """A launched decode step whose tokens the host has not read: row i is seqs[i]."""

    seqs: list[Sequence]
    step: Launched


class Engine:
    """Runs every admitted sequence, a batch per step."""

    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Tokenizer,
        n_ctx: int,
        max_seqs: int,
        block_size: int = 16,
        max_batch_tokens: int = 512,
        prefill_chunk: int = 256,
        kv_dtype: torch.dtype = torch.float16,
        n_blocks: int | None = None,
        whole_prompts: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        hp = model.hp
        if n_blocks is None:
            n_blocks = -(-n_ctx // block_size) * max_seqs
        # One sequence of full context must always fit, or preemption could loop.
        n_blocks = max(n_blocks, -(-n_ctx // block_size))
        self.cache = PagedKVCache(
            hp.n_layer,
            n_blocks,
            block_size,
            hp.n_head_kv,
            hp.head_dim,
            hp.head_dim_v,
            kv_dtype,
            model.device,
        )
        self.scheduler = Scheduler(
            self.cache.allocator, max_seqs, max_batch_tokens, prefill_chunk, whole_prompts
        )
        # GPU: fused kernels and graph-captured decode steps (None on the CPU).
        self.fast = FastPath.create(model, self.cache, n_ctx, max_seqs)
        # Launch decode steps ahead of reading their tokens (module docstring);
        # ROCMUX_HIP_DIRECT_OVERLAP=0 waits for every step.
        self.overlap = self.fast is not None and os.environ.get("ROCMUX_HIP_DIRECT_OVERLAP") != "0"
        self._inflight: _InFlight | None = None
        self._ids = itertools.count(1)
        self._incoming: deque[Sequence] = deque()
        self._cancelled: deque[Sequence] = deque()
        self._lock = threading.Lock()  # guards the two queues only
        self.steps = 0
        # Called with each step's chunks before it runs (tests and benchmarks watch the
        # batch sizes through it); on the stepping thread, so it must be quick.
        self.on_step: Callable[[list[ScheduledChunk]], None] | None = None

    # -- requests (any thread) --------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int,
        stop: tuple[str, ...] = (),
        record_gaps: bool = False,
    ) -> Sequence:
        """Queue a request; it joins the batch at the next step.

        ``record_gaps`` keeps the top-1 minus top-2 logit of every sampled step.
        """
        if not prompt:
            raise ValueError("the prompt is empty: there is no token to continue from")
        if len(prompt) >= self.n_ctx:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.n_ctx}")
        seq = Sequence(
            id=next(self._ids),
            prompt=list(prompt),
            max_tokens=max_tokens,
            stop=tuple(s for s in stop if s),
            sampling=params,
            generator=params.generator(),
            gaps=[] if record_gaps else None,
        )
        with self._lock:
            self._incoming.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Ask for ``seq`` to end; its blocks are freed when pending work is applied."""
        with self._lock:
            self._cancelled.append(seq)

    def apply_pending(self) -> None:
        """Read the tokens of a step in flight, then admit queued requests and carry out
        cancellations (call with no step running)."""
        self.drain()
        self._apply_queues()

    def _apply_queues(self) -> None:
        with self._lock:
            incoming = list(self._incoming)
            cancelled = list(self._cancelled)
            self._incoming.clear()
            self._cancelled.clear()
        for seq in incoming:
            self.scheduler.add(seq)
        for seq in cancelled:
            self.scheduler.finish(seq, "cancelled")

    def has_work(self) -> bool:
        with self._lock:
            queued = bool(self._incoming or self._cancelled)
        return queued or self.scheduler.has_work() or self._inflight is not None

    # -- stepping (one thread at a time) ------------------------------------------------

    def step(self) -> bool:
        """Run one batch; False when there was nothing to run."""
        self._apply_queues()
        if self._inflight is not None:
            if self._continue():
                self.steps += 1
                return True
            self.drain()
        chunks = self.scheduler.schedule()
        if not chunks:
            return False
        if self.on_step is not None:
            self.on_step(chunks)
        try:
            if self._can_launch(chunks):
                self._launch([c.seq for c in chunks], ahead=False)
            else:
                self._run(chunks)
        except Exception as exc:
            self._fail([c.seq for c in chunks], exc)
            raise
        finally:
            self._apply_queues()
        self.steps += 1
        return True

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        self._inflight = None
        for seq in seqs:
            seq.error = exc
            self.scheduler.finish(seq, "error")

    # -- decode steps launched ahead of their tokens (the fast path) ----------------------

    def _device_sampled(self, seq: Sequence) -> bool:
        return seq.sampling.repeat_penalty == 1.0 and seq.gaps is None

    def _can_launch(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether this step can go through :meth:`_launch`: single decode tokens within
        a bucket, every sequence sampled on the device."""
        return (
            self.overlap
            and self.fast is not None
            and pick_bucket(len(chunks), self.fast.buckets) is not None
            and all(c.n == 1 and c.completes and self._device_sampled(c.seq) for c in chunks)
        )

    def _continue(self) -> bool:
        """Launch the next step of the batch in flight, then read the one in flight;
        False (nothing done) when the batch changed or may end at its next token."""
        inflight = self._inflight
        assert inflight is not None
        seqs = inflight.seqs
        sched = self.scheduler
        if sched.running != seqs:  # one ended or was cancelled, or one was admitted
            return False
        if sched.waiting and len(sched.running) < sched.max_seqs:
            return False  # a waiting request can join: step it in
        for seq in seqs:
            # after the token in flight, one more must still be wanted
            if seq.n_generated + 1 >= seq.max_tokens or len(seq.tokens) + 1 >= self.n_ctx:
                return False
        for seq in seqs:
            assert seq.page_table is not None
            if not seq.page_table.ensure(seq.n_cached + 1):
                return False  # preemption: the scheduler's business
        if self.on_step is not None:
            self.on_step([ScheduledChunk(seq, 1) for seq in seqs])
        try:
            self._launch(seqs, ahead=True)
            self._collect(inflight)
        except Exception as exc:
            self._fail(seqs, exc)
            raise
        return True

    def _launch(self, seqs: list[Sequence], ahead: bool) -> None:
        """Start a decode step of ``seqs`` without waiting; with ``ahead``, each one's
        token is the one the step in flight chooses for it (the same row)."""
        assert self.fast is not None
        rows = []
        for i, seq in enumerate(seqs):
            assert seq.page_table is not None
            pos = seq.n_cached
            token = -(i + 1) if ahead else seq.tokens[pos]
            rows.append((token, pos, seq.page_table.blocks))
        params = None
        k_max = 1
        if not all(seq.sampling.greedy for seq in seqs):
            n_vocab = self.model.hp.n_vocab
            params = np.array(
                [
                    row_params(
                        seq.sampling,
                        n_vocab,
                        0.0
                        if seq.sampling.greedy
                        else float(torch.rand((), generator=seq.generator)),
                    )
                    for seq in seqs
                ],
                dtype=np.float32,
            )
            k_max = max(top_k_of(seq.sampling, n_vocab) for seq in seqs)
        step = self.fast.launch(rows, params, k_max)
        for seq in seqs:
            seq.n_cached += 1
        self._inflight = _InFlight(list(seqs), step)

    def _collect(self, inflight: _InFlight) -> None:
        """Wait for ``inflight``'s tokens and take them (those of sequences that ended
        meanwhile are dropped)."""
        if self._inflight is inflight:
            self._inflight = None
        assert self.fast is not None
        tokens = self.fast.collect(inflight.step)
        for seq, token in zip(inflight.seqs, tokens, strict=True):
            if not seq.done:
                self._accept(seq, token)

    def drain(self) -> None:
        """Read the tokens of the step in flight, if any (waits for the GPU)."""
        inflight = self._inflight
        if inflight is None:
            return
        try:
            self._collect(inflight)
        except Exception as exc:
            self._fail(inflight.seqs, exc)
            raise

    def _run(self, chunks: list[ScheduledChunk]) -> None:
        if self.fast is not None:
            logits, sampled = self.fast.forward(chunks)
        else:
            logits, sampled = self._forward(chunks)
        for chunk in chunks:
            chunk.seq.n_cached += chunk.n
        self._sample(logits, sampled)

    def _forward(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Logits of the chunks that complete (in order), through ``LlamaModel.forward``."""
        dev = self.model.device
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[SeqBatch] = []
        logit_rows: list[int] = []
        sampled: list[ScheduledChunk] = []
        for chunk in chunks:
            seq = chunk.seq
            assert seq.page_table is not None
            start, stop = seq.n_cached, seq.n_cached + chunk.n
            row = len(tokens)
            tokens.extend(seq.tokens[start:stop])
            positions.extend(range(start, stop))
            chunk_slots = seq.page_table.slots(start, stop)
            slots.extend(chunk_slots)
            ctx = torch.tensor(seq.page_table.slots(0, stop), dtype=torch.long, device=dev)
            seqs.append(SeqBatch(row, chunk.n, start, ctx))
            if chunk.completes:
                logit_rows.append(row + chunk.n - 1)
                sampled.append(chunk)
        logits = self.model.forward(
            torch.tensor(tokens, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            torch.tensor(slots, dtype=torch.long, device=dev),
            seqs,
            torch.tensor(logit_rows, dtype=torch.long, device=dev),
            self.cache.k,
            self.cache.v,
        )
        return logits, sampled

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledChunk]) -> None:
        greedy = [
            i
            for i, c in enumerate(sampled)
            if c.seq.sampling.greedy and c.seq.sampling.repeat_penalty == 1.0
        ]
        picks: dict[int, int] = {}
        if greedy:
            rows = logits if len(greedy) == logits.shape[0] else logits[greedy]
            # .cpu() waits for the device with the GIL released; .tolist() would hold it
            best = torch.argmax(rows, dim=-1).cpu().tolist()
            picks.update(zip(greedy, best, strict=True))
        for i, chunk in enumerate(sampled):
            seq = chunk.seq
            if seq.gaps is not None:
                top = torch.topk(logits[i], 2).values
                seq.gaps.append(float(top[0] - top[1]))
            token = picks.get(i)
            if token is None:
                token = sample(logits[i], seq.sampling, seq.generator, seq.tokens)
            self._accept(seq, token)

    def _accept(self, seq: Sequence, token: int) -> None:
        """Append a sampled token, stream its text, and end the sequence when due."""
        now = time.perf_counter()
        if seq.t_first_token is None:
            seq.t_first_token = now
        seq.tokens.append(token)
        if self.tokenizer.is_eog(token):
            self._end(seq, "stop")
            return
        text = seq.feed(self.tokenizer.piece(token))
        if text:
            seq.events.append(Token(text))
        if seq.finish_reason == "stop":  # a stop string
            self._end(seq, "stop")
        elif seq.n_generated >= seq.max_tokens or len(seq.tokens) >= self.n_ctx:
            self._end(seq, "length")

    def _end(self, seq: Sequence, reason: str) -> None:
        rest = seq.flush() if seq.finish_reason != "stop" else ""
        self.scheduler.finish(seq, reason)
        seq.events.append(
            Token(rest, seq.finish_reason, usage=self.usage(seq), timings=self.timings(seq))
        )

    @staticmethod
    def usage(seq: Sequence) -> Usage:
        return Usage(prompt_tokens=len(seq.prompt), completion_tokens=seq.n_generated)

    @staticmethod
    def timings(seq: Sequence) -> dict[str, float]:
        """llama-server's timing keys (milliseconds, tokens per second)."""
        start = seq.t_first_scheduled or seq.t_arrival
        first = seq.t_first_token or start
        end = seq.t_end or time.perf_counter()
        prompt_ms = (first - start) * 1000
        predicted_ms = (end - first) * 1000
        n_pred = max(seq.n_generated - 1, 0)
        return {
            "prompt_n": float(len(seq.prompt)),
            "prompt_ms": prompt_ms,
            "prompt_per_second": len(seq.prompt) / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
            "predicted_n": float(seq.n_generated),
            "predicted_ms": predicted_ms,
            "predicted_per_second": n_pred / predicted_ms * 1000 if predicted_ms > 0 else 0.0,
        }

    def release(self) -> None:
        """Drop the weights and the cache tensors; the engine cannot step afterwards."""
        if self._inflight is not None and self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        self._inflight = None
        if self.fast is not None:
            self.fast.release()
            self.fast = None
        self.model.unload()
        self.cache.k = torch.empty(0)
        self.cache.v = torch.empty(0)

    def running(self) -> list[Sequence]:
        return [s for s in self.scheduler.running if s.status is Status.RUNNING]
