"""The engine: model, KV cache, scheduler and sampler, advanced one step at a time.

``step()`` is synchronous and meant for a worker thread. Requests and cancellations
arrive from other threads through thread-safe queues and are applied at the start
and end of a step, so the scheduler's state is only ever touched by the thread that
steps (or, between steps, by whoever holds the caller's step lock).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from rocmux.types import Token, Usage

from rocmux_hip_direct.fast import FastPath
from rocmux_hip_direct.kv_cache import PagedKVCache
from rocmux_hip_direct.model import LlamaModel, SeqBatch
from rocmux_hip_direct.sampling import SamplingParams, sample
from rocmux_hip_direct.scheduler import ScheduledChunk, Scheduler, Sequence, Status

if TYPE_CHECKING:
    from rocmux_hip_direct.tokenizer import Tokenizer


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
        """Admit queued requests and carry out cancellations (call with no step running)."""
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
        return queued or self.scheduler.has_work()

    # -- stepping (one thread at a time) ------------------------------------------------

    def step(self) -> bool:
        """Run one batch; False when there was nothing to run."""
        self.apply_pending()
        chunks = self.scheduler.schedule()
        if not chunks:
            return False
        if self.on_step is not None:
            self.on_step(chunks)
        try:
            self._run(chunks)
        except Exception as exc:
            for chunk in chunks:
                chunk.seq.error = exc
                self.scheduler.finish(chunk.seq, "error")
            raise
        finally:
            self.apply_pending()
        self.steps += 1
        return True

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
        if self.fast is not None:
            self.fast.release()
            self.fast = None
        self.model.unload()
        self.cache.k = torch.empty(0)
        self.cache.v = torch.empty(0)

    def running(self) -> list[Sequence]:
        return [s for s in self.scheduler.running if s.status is Status.RUNNING]
