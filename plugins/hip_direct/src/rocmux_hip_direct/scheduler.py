"""Sequences and the continuous-batching scheduler (plain Python, no torch).

Each step the scheduler picks, within a token budget: one token for every running
sequence that is decoding, then prompt chunks for sequences still prefilling, then
new sequences from the waiting queue while blocks and seats last (with
``whole_prompts``, as on a GPU, a prompt is not cut to fit what other prompts left of
the budget: it goes first in the next step). A sequence whose
next token finds no free block makes the youngest running sequence give its blocks
back; that one later recomputes its prompt and output (recompute preemption).
"""

from __future__ import annotations

import codecs
import enum
import time
from collections import deque
from collections.abc import Sequence as Seq
from typing import Any

import attrs

from rocmux_hip_direct.kv_cache import BlockAllocator, PageTable


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@attrs.define(eq=False)
class Sequence:
    """One request: its tokens, cache pages, sampler state and streamed text."""

    id: int
    prompt: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    sampling: Any = None  # SamplingParams (torch-side), opaque here
    generator: Any = None  # its torch.Generator
    tokens: list[int] = attrs.field(factory=list)
    n_cached: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: BaseException | None = None
    page_table: PageTable | None = None
    # top-1 minus top-2 logit at each sampled step, when asked for (parity checks)
    gaps: list[float] | None = None
    # text: everything decoded so far, and how much of it went out
    text: str = ""
    emitted: int = 0
    events: deque[Any] = attrs.field(factory=deque)
    t_arrival: float = attrs.field(factory=time.perf_counter)
    t_first_scheduled: float | None = None
    t_first_token: float | None = None
    t_end: float | None = None
    _decoder: Any = attrs.field(factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def __attrs_post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def n_pending(self) -> int:
        """Tokens whose keys and values are not cached yet."""
        return len(self.tokens) - self.n_cached

    @property
    def done(self) -> bool:
        return self.status is Status.FINISHED

    def feed(self, piece: bytes) -> str:
        """Add a generated token's bytes; return the text that may go out now.

        Text that could be the start of a stop string is held back until it is known
        not to be one; a stop string found ends the sequence (``finish_reason`` stop)
        and is not part of the output.
        """
        self.text += self._decoder.decode(piece)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i != -1]
            if hits:
                end = min(hits)
                self.finish_reason = "stop"
                final = True
            elif not final:
                end -= _held_back(self.text, self.stop)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def flush(self) -> str:
        """The held-back text when the sequence ends without a stop string."""
        self.text += self._decoder.decode(b"", final=True)
        return self._release(final=True)


def _held_back(text: str, stops: Seq[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best


@attrs.define(eq=False)
class ScheduledChunk:
    """``n`` tokens of ``seq`` starting at position ``seq.n_cached``."""

    seq: Sequence
    n: int

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the last token, so a new token is sampled."""
        return self.seq.n_cached + self.n == len(self.seq.tokens)


class Scheduler:
    """Admission, chunked prefill and decode batching over a block allocator."""

    def __init__(
        self,
        allocator: BlockAllocator,
        max_seqs: int,
        max_batch_tokens: int,
        prefill_chunk: int,
        whole_prompts: bool = False,
    ) -> None:
        self.allocator = allocator
        self.max_seqs = max_seqs
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        # A waiting prompt that only part of the step's budget is left for waits for the
        # next step instead of being cut, when other prompts already share this one: a
        # cut leaves a tail that attends to the cached context through a slower path
        # (the GPU sets this; a CPU step's cost does not care).
        self.whole_prompts = whole_prompts
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.page_table = PageTable(self.allocator)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str | None) -> None:
        """End ``seq`` (any state) and free its blocks."""
        if seq.status is Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.page_table is not None:
            seq.page_table.release()
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason
        seq.t_end = time.perf_counter()

    def _preempt(self, victim: Sequence) -> None:
        assert victim.page_table is not None
        victim.page_table.release()
        victim.n_cached = 0
        victim.status = Status.WAITING
        self.running.remove(victim)
        self.waiting.appendleft(victim)

    def schedule(self) -> list[ScheduledChunk]:
        """The chunks to run this step (empty when there is nothing to do)."""
        chunks: list[ScheduledChunk] = []
        budget = self.max_batch_tokens
        # 1. one token for each decoding sequence, oldest first
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.n_pending != 1 or budget < 1:
                continue
            assert seq.page_table is not None
            while not seq.page_table.ensure(seq.n_cached + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                chunks.append(ScheduledChunk(seq, 1))
                budget -= 1
        # 2. prompt chunks of sequences already admitted
        prompt_tokens = 0
        for seq in self.running:
            if budget < 1:
                break
            if seq.n_pending > 1:
                n = min(seq.n_pending, budget, self.prefill_chunk)
                assert seq.page_table is not None
                if seq.page_table.ensure(seq.n_cached + n):
                    chunks.append(ScheduledChunk(seq, n))
                    budget -= n
                    prompt_tokens += n
        # 3. admit new sequences while seats, budget and blocks last
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            n = min(seq.n_pending, budget, self.prefill_chunk)
            if self.whole_prompts and n < seq.n_pending and prompt_tokens:
                break  # first in the next step (a prompt alone in a step is still cut)
            assert seq.page_table is not None
            if not seq.page_table.ensure(seq.n_cached + n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.t_first_scheduled is None:
                seq.t_first_scheduled = time.perf_counter()
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
            prompt_tokens += n
        return chunks
