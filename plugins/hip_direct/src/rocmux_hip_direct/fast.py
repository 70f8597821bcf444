"""The GPU fast path: fused kernels, paged decode attention and graph-captured decode.

:class:`FastPath` runs the same llama-family forward pass as ``LlamaModel.forward``
(``numerics="fast"``) with fewer, larger launches:

* Q/K/V are one matrix product (the three weights concatenated once at load; the
  model's own ``Linear`` weights become views of it, so no memory is added), as are
  gate/up; SwiGLU, RMSNorm with the residual add, and RoPE with the KV-cache store are
  each one kernel (:mod:`rocmux_hip_direct.fused`);
* decode tokens attend through a split-K kernel that reads the KV cache through the
  block table, so nothing is gathered; prompt chunks use PyTorch's fused attention,
  the fresh prompts of a step batched together (padded to the longest of a group of
  similar lengths), so concurrent prompts cost one attention call, not one each;
* a step whose chunks are all single tokens replays a CUDA/HIP graph captured for the
  smallest batch bucket (1, 2, 4, … up to ``max_seqs``) that holds it, with every
  per-step input (tokens, positions, slots, context lengths, the block table) in one
  static int32 buffer filled by one host-to-device copy;
* :meth:`FastPath.launch` runs such a step without waiting for it: the graph also takes
  each row's arg-max (sampled rows are drawn on the device after it), keeps the chosen
  tokens on the device, where the next step's graph reads them (a negative token in the
  input buffer, ``-(j + 1)``, means "row ``j``'s choice of the step before"), and copies
  them to pinned host memory behind an event. The engine launches step t+1 before it
  reads step t's tokens, so the host's work (stop checks, detokenizing, streaming)
  overlaps the GPU's.

Weights stay as the loader made them: dequantized once to the compute dtype (f16 on a
GPU by default), so every batch size gets the vendor BLAS (cuBLAS / hipBLASLt).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from rocmux_hip_direct.fused import add_rms_norm, paged_decode_attention, rope_store, swiglu
from rocmux_hip_direct.sampling import S_COLS, sample_rows

if TYPE_CHECKING:
    from rocmux_hip_direct.kv_cache import PagedKVCache
    from rocmux_hip_direct.model import Linear, LlamaModel
    from rocmux_hip_direct.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Columns of the packed per-step input buffer before the block table.
TOKEN, POSITION, SLOT, CTX_LEN, N_FIXED = 0, 1, 2, 3, 4
# Programs the split-K decode attention aims for (an H100 has 132 multiprocessors).
ATTN_PROGRAMS = 256
MAX_SPLIT = 16
# Fresh prompts attended as one padded batch may cost at most this much more attention
# work than their own lengths need (padding is computed and thrown away).
PAD_SLACK = 1.25


def decode_buckets(max_seqs: int, sizes: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """Batch sizes to capture: ``sizes`` below ``max_seqs``, and ``max_seqs`` itself."""
    if max_seqs < 1:
        raise ValueError("max_seqs must be positive")
    return tuple(sorted({s for s in sizes if 0 < s < max_seqs} | {max_seqs}))


def pick_bucket(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds ``n`` sequences; None when none does."""
    for b in buckets:
        if b >= n:
            return b
    return None


def split_count(batch: int, n_head_kv: int) -> int:
    """Context slices per (sequence, kv head) for split-K decode attention.

    Enough programs to fill the GPU when the batch is small; one slice once the batch
    alone does. A power of two, at most ``MAX_SPLIT``.
    """
    want = max(1, ATTN_PROGRAMS // max(1, batch * n_head_kv))
    return min(MAX_SPLIT, 1 << (want.bit_length() - 1))


def group_prompts(lengths: Sequence[int], slack: float = PAD_SLACK) -> list[list[int]]:
    """Indices of prompt chunks to attend together, a padded batch per group.

    Longest first, a chunk joins the open group while the group padded to its longest
    member holds at most ``slack`` times its real tokens. Each group lists its indices
    in ascending order, so chunks laid out back to back stay so.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        if groups:
            group = groups[-1]
            if (len(group) + 1) * lengths[group[0]] <= slack * (total + lengths[i]):
                group.append(i)
                total += lengths[i]
                continue
        groups.append([i])
        total = lengths[i]
    return [sorted(g) for g in groups]


def pack_decode(
    rows: Sequence[tuple[int, int, Sequence[int]]],
    buf: np.ndarray,
    bucket: int,
    page_size: int,
) -> None:
    """Fill ``buf[:bucket]`` (int32, (max_bucket, N_FIXED + width)) for a decode step.

    ``rows`` are (token, position, blocks) per sequence. Padding rows get slot -1 (the
    KV store skips them) and context length 0 (attention gives them zeros). Block-table
    columns past a sequence's blocks are left stale: its context length bounds them.
    """
    n = len(rows)
    if n > bucket:
        raise ValueError(f"{n} rows do not fit a bucket of {bucket}")
    for i, (token, pos, blocks) in enumerate(rows):
        buf[i, TOKEN] = token
        buf[i, POSITION] = pos
        buf[i, SLOT] = blocks[pos // page_size] * page_size + pos % page_size
        buf[i, CTX_LEN] = pos + 1
        buf[i, N_FIXED : N_FIXED + len(blocks)] = blocks
    buf[n:bucket, :N_FIXED] = (0, 0, -1, 0)


def unsupported_reason(model: LlamaModel) -> str | None:
    """Why the fast path cannot run ``model``; None when it can."""
    hp = model.hp

    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if model.numerics != "fast":
        return "numerics is not 'fast'"
    if hp.head_dim_v != hp.head_dim:
        return "key and value head sizes differ"
    if not pow2(hp.head_dim) or not pow2(hp.rope_dims // 2):
        return "head or RoPE size is not a power of two"
    rest = hp.head_dim - hp.rope_dims
    if rest and not pow2(rest):
        return "the unrotated part of a head is not a power of two"
    return None


@attrs.define(eq=False)
class _FusedLayer:
    attn_norm: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ffn_norm: torch.Tensor
    wgu: torch.Tensor
    wdown: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


def _fuse(linears: Sequence[Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for ``linears`` side by side; theirs become views of it."""
    weight = torch.cat([lin.weight for lin in linears], dim=0)
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat(
            [
                lin.bias
                if lin.bias is not None
                else weight.new_zeros(lin.weight.shape[0], dtype=weight.dtype)
                for lin in linears
            ]
        )
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = weight[start : start + n]
        if bias is not None and lin.bias is not None:
            lin.bias = bias[start : start + n]
        start += n
    return weight, bias


@attrs.define(eq=False)
class Launched:
    """A decode step launched by :meth:`FastPath.launch`: its ``n`` tokens arrive in
    ``host`` once ``event`` has passed (None: already there)."""

    n: int
    host: torch.Tensor
    event: torch.cuda.Event | None


@attrs.define(eq=False)
class _Resumed:
    """A prompt chunk after earlier ones: rows ``start:start+n`` at positions ``pos0..``,
    attending to the cached context through ``ctx_slots`` (positions 0..pos0+n-1)."""

    start: int
    n: int
    pos0: int
    ctx_slots: torch.Tensor


@attrs.define(eq=False)
class _Batch:
    """Prompt chunks from position 0, attended as one (B, heads, length, d) batch.

    Chunk ``i`` holds rows ``starts[i]:starts[i]+lengths[i]``. ``gather`` is None when
    the chunks lie back to back and are all ``length`` long (the rows are then a view);
    otherwise it holds (B, length) row indices, padding repeating a real row (finite
    keys and values, masked by causality), and ``keep``/``dest`` map the real rows of the
    flattened result to their output rows.
    """

    starts: list[int]
    lengths: list[int]
    length: int
    gather: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    dest: torch.Tensor | None = None

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], device: torch.device) -> _Batch:
        length = max(lengths)
        packed = all(
            n == length and s == starts[0] + i * length
            for i, (s, n) in enumerate(zip(starts, lengths, strict=True))
        )
        if packed:
            return cls(starts, lengths, length)
        gather = np.empty((len(starts), length), np.int64)
        keep: list[int] = []
        dest: list[int] = []
        for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
            gather[i, :n] = np.arange(s, s + n)
            gather[i, n:] = s + n - 1
            keep.extend(range(i * length, i * length + n))
            dest.extend(range(s, s + n))

        def tensor(x: object) -> torch.Tensor:
            return torch.as_tensor(x, dtype=torch.long).to(device)

        return cls(starts, lengths, length, tensor(gather), tensor(keep), tensor(dest))


class FastPath:
    """Runs engine steps on a GPU (or, with the eager fallbacks, anywhere)."""

    def __init__(
        self,
        model: LlamaModel,
        cache: PagedKVCache,
        n_ctx: int,
        max_seqs: int,
        graphs: bool | None = None,
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast path cannot run this model: {reason}")
        self.model = model
        self.hp = model.hp
        self.cache = cache
        self.device = model.device
        self.dtype = model.dtype
        self.page = cache.allocator.block_size
        self.width = -(-n_ctx // self.page)
        self.rope = model.rope.float().contiguous()
        self.layers = [
            _FusedLayer(
                attn_norm=layer.attn_norm,
                wqkv=qkv[0],
                bqkv=qkv[1],
                wo=layer.wo.weight,
                bo=layer.wo.bias,
                ffn_norm=layer.ffn_norm,
                wgu=_fuse([layer.w_gate, layer.w_up])[0],
                wdown=layer.w_down.weight,
                q_norm=layer.q_norm,
                k_norm=layer.k_norm,
            )
            for layer in model.layers
            for qkv in [_fuse([layer.wq, layer.wk, layer.wv])]
        ]
        self.buckets = decode_buckets(max_seqs)
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        rows, cols = self.buckets[-1], N_FIXED + self.width
        pin = self.device.type == "cuda"
        self._host = torch.zeros(rows, cols, dtype=torch.int32, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._dev = torch.zeros(rows, cols, dtype=torch.int32, device=self.device)
        # Each decode row's chosen token, kept on the device for the next step; its
        # copies to the host (two, used in turn: one may still be read while the next
        # is written); the sampling parameters of launched steps (two, likewise).
        self._next = torch.zeros(rows, dtype=torch.int32, device=self.device)
        self._tok_host = torch.zeros(2, rows, dtype=torch.int32, pin_memory=pin)
        self._tok_turn = 0
        self._par_host = torch.zeros(2, rows, S_COLS, dtype=torch.float32, pin_memory=pin)
        self._par_dev = torch.zeros(rows, S_COLS, dtype=torch.float32, device=self.device)
        self._par_copied: list[torch.cuda.Event | None] = [None, None]
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: object | None = None
        self._copied: torch.cuda.Event | None = None
        self.graph_steps = 0  # decode steps replayed from a graph
        self.staged_steps = 0  # decode steps through the same inputs, run eagerly
        self.eager_steps = 0  # steps with prompt chunks
        self.launched_steps = 0  # decode steps through launch(), tokens read later

    @classmethod
    def create(
        cls, model: LlamaModel, cache: PagedKVCache, n_ctx: int, max_seqs: int
    ) -> FastPath | None:
        """A fast path for a GPU model, graphs captured; None where it does not apply.

        ``ROCMUX_HIP_DIRECT_FAST=0`` turns it off; ``ROCMUX_HIP_DIRECT_GRAPHS=0`` keeps
        the fused kernels but runs decode steps eagerly.
        """
        if model.device.type != "cuda" or os.environ.get("ROCMUX_HIP_DIRECT_FAST") == "0":
            return None
        if unsupported_reason(model) is not None:
            return None
        graphs = os.environ.get("ROCMUX_HIP_DIRECT_GRAPHS") != "0"
        fast = cls(model, cache, n_ctx, max_seqs, graphs=graphs)
        if graphs:
            try:
                fast.capture()
            except RuntimeError as exc:  # a runtime without graph capture: run eagerly
                log.warning("hip_direct: decode-graph capture failed (%s); running eagerly", exc)
                fast._graphs.clear()
                fast.use_graphs = False
        return fast

    def release(self) -> None:
        """Drop the graphs and the fused weights."""
        self._graphs.clear()
        self._pool = None
        self.layers = []

    # -- the forward pass ---------------------------------------------------------------

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        scale = torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.hp.norm_eps)
        return (xf * scale * weight.float()).to(x.dtype)

    def _body(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attend: Callable[[int, torch.Tensor], torch.Tensor],
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (float32) of ``logit_rows`` (all rows when None)."""
        hp, dtype, eps = self.hp, self.dtype, self.hp.norm_eps
        n_tok = tokens.shape[0]
        dq, dk = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        neox = hp.rope_mode == "neox"
        # float32 residual stream, as LlamaModel.forward keeps it
        x = self.model.tok_embd[tokens].float()
        delta: torch.Tensor | None = None
        for il, layer in enumerate(self.layers):
            h = add_rms_norm(x, delta, layer.attn_norm, eps, dtype)
            qkv = F.linear(h, layer.wqkv, layer.bqkv)
            if layer.q_norm is not None:
                q = qkv[:, :dq].view(n_tok, hp.n_head, hp.head_dim)
                q.copy_(self._head_norm(q, layer.q_norm))
            if layer.k_norm is not None:
                k = qkv[:, dq : dq + dk].view(n_tok, hp.n_head_kv, hp.head_dim)
                k.copy_(self._head_norm(k, layer.k_norm))
            rope_store(
                qkv,
                positions,
                slots,
                self.rope,
                self.cache.k[il],
                self.cache.v[il],
                hp.n_head,
                hp.n_head_kv,
                hp.head_dim,
                hp.rope_dims,
                neox,
            )
            attn = attend(il, qkv)
            h = add_rms_norm(x, F.linear(attn, layer.wo, layer.bo), layer.ffn_norm, eps, dtype)
            delta = F.linear(swiglu(F.linear(h, layer.wgu)), layer.wdown)
        if logit_rows is not None:
            x = x[logit_rows]
            delta = delta[logit_rows] if delta is not None else None
        h = add_rms_norm(x, delta, self.model.output_norm, eps, dtype)
        out = self.model.output
        return F.linear(h, out.weight, out.bias).float()

    def _decode_attend(
        self, block_table: torch.Tensor, ctx_lens: torch.Tensor, n_split: int
    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        hp = self.hp
        dq = hp.n_head * hp.head_dim

        def attend(il: int, qkv: torch.Tensor) -> torch.Tensor:
            q = qkv[:, :dq].view(qkv.shape[0], hp.n_head, hp.head_dim)
            return paged_decode_attention(
                q,
                self.cache.k[il],
                self.cache.v[il],
                block_table,
                ctx_lens,
                self.page,
                hp.attn_scale,
                n_split,
            )

        return attend

    # -- steps -------------------------------------------------------------------------

    def forward(
        self, chunks: Sequence[ScheduledChunk]
    ) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Run one engine step: logits of the chunks that complete, and those chunks."""
        sampled = [c for c in chunks if c.completes]
        bucket = pick_bucket(len(chunks), self.buckets)
        if bucket is not None and all(c.n == 1 for c in chunks):
            if self.use_graphs:
                logits = self._decode_graph(chunks, bucket)
                self.graph_steps += 1
            else:
                logits = self.decode_eager(chunks)
                self.staged_steps += 1
            if len(sampled) < len(chunks):
                rows = [i for i, c in enumerate(chunks) if c.completes]
                logits = logits[torch.tensor(rows, device=self.device)]
            return logits, sampled
        self.eager_steps += 1
        return self._eager(chunks), sampled

    @staticmethod
    def _decode_rows(chunks: Sequence[ScheduledChunk]) -> list[tuple[int, int, list[int]]]:
        rows = []
        for c in chunks:
            seq = c.seq
            assert seq.page_table is not None
            rows.append((seq.tokens[seq.n_cached], seq.n_cached, seq.page_table.blocks))
        return rows

    def _stage(self, chunks: Sequence[ScheduledChunk], bucket: int) -> None:
        self._stage_rows(self._decode_rows(chunks), bucket)

    def _stage_rows(self, rows: Sequence[tuple[int, int, Sequence[int]]], bucket: int) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # the last copy out of the pinned buffer is done
        pack_decode(rows, self._host_np, bucket, self.page)
        self._dev[:bucket].copy_(self._host[:bucket], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _decode_graph(self, chunks: Sequence[ScheduledChunk], bucket: int) -> torch.Tensor:
        if bucket not in self._graphs:
            self.capture([bucket])
        self._stage(chunks, bucket)
        graph, out = self._graphs[bucket]
        graph.replay()
        return out[: len(chunks)]

    def _decode_inputs(
        self, bucket: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self._dev[:bucket]
        return d[:, TOKEN], d[:, POSITION], d[:, SLOT], d[:, CTX_LEN], d[:, N_FIXED:]

    def _decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input buffer's token column with each ``-(j + 1)`` replaced by the token
        that row ``j`` of the step before chose (still on the device)."""
        prev = self._next[(-1 - tokens).clamp(min=0)]
        return torch.where(tokens < 0, prev, tokens)

    def _decode_step(
        self, bucket: int, attend: Callable[[int, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """A decode step's body as the graphs hold it: logits of every bucket row, and
        their arg-max left in ``_next``."""
        tokens, positions, slots, _, _ = self._decode_inputs(bucket)
        out = self._body(self._decode_tokens(tokens), positions, slots, attend)
        self._next[:bucket].copy_(torch.argmax(out, dim=-1))
        return out

    def launch(
        self, rows: Sequence[tuple[int, int, Sequence[int]]], params: np.ndarray | None, k_max: int
    ) -> Launched:
        """Start a decode step (``len(rows)`` within a bucket) and return at once.

        ``rows`` as :func:`pack_decode`'s, a token ``-(j + 1)`` being row ``j``'s choice
        of the step launched before. ``params``: (rows, S_COLS) rows of
        :func:`~rocmux_hip_direct.sampling.row_params`, or None when every row is greedy;
        ``k_max`` the largest top-k among them. :meth:`collect` gives the tokens.
        """
        n = len(rows)
        bucket = pick_bucket(n, self.buckets)
        if bucket is None:
            raise ValueError("more sequences than the largest bucket")
        self._stage_rows(rows, bucket)
        with torch.inference_mode():
            if self.use_graphs:
                if bucket not in self._graphs:
                    self.capture([bucket])
                graph, out = self._graphs[bucket]
                graph.replay()
                self.graph_steps += 1
            else:
                _, _, _, lens, table = self._decode_inputs(bucket)
                split = split_count(bucket, self.hp.n_head_kv)
                out = self._decode_step(bucket, self._decode_attend(table, lens, split))
                self.staged_steps += 1
            if params is not None:
                turn = self._tok_turn
                event = self._par_copied[turn]
                if event is not None:
                    event.synchronize()
                host = self._par_host[turn, :n]
                host.copy_(torch.from_numpy(params))
                dev = self._par_dev[:n]
                dev.copy_(host, non_blocking=True)
                if self.device.type == "cuda":
                    self._par_copied[turn] = torch.cuda.Event()
                    self._par_copied[turn].record()  # type: ignore[union-attr]
                self._next[:n].copy_(sample_rows(out[:n], dev, k_max, self._next[:n]))
        turn, self._tok_turn = self._tok_turn, self._tok_turn ^ 1
        tok_host = self._tok_host[turn, :n]
        tok_host.copy_(self._next[:n], non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        self.launched_steps += 1
        return Launched(n, tok_host, done)

    @staticmethod
    def collect(step: Launched) -> list[int]:
        """The tokens of a launched step, once the GPU has made them (waits)."""
        if step.event is not None:
            step.event.synchronize()
        return step.host[: step.n].tolist()

    def decode_eager(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """A decode step through the graph's code path without the graph (tests)."""
        bucket = pick_bucket(len(chunks), self.buckets) or len(chunks)
        if bucket > self._dev.shape[0]:
            raise ValueError("more sequences than the largest bucket")
        self._stage(chunks, bucket)
        _, _, _, lens, table = self._decode_inputs(bucket)
        split = split_count(bucket, self.hp.n_head_kv)
        with torch.inference_mode():
            out = self._decode_step(bucket, self._decode_attend(table, lens, split))
        return out[: len(chunks)]

    @torch.inference_mode()
    def capture(self, buckets: Sequence[int] | None = None) -> None:
        """Capture a decode graph for each bucket (all of them by default), largest
        first so that the smaller ones fit in the memory pool the largest reserved."""
        todo = sorted(buckets or self.buckets, reverse=True)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        for bucket in todo:
            _, _, slots, lens, table = self._decode_inputs(bucket)
            # Warm-up inputs: no KV-cache writes, one context position, block 0.
            self._dev[:bucket].zero_()
            slots.fill_(-1)
            lens.fill_(1)
            attend = self._decode_attend(table, lens, split_count(bucket, self.hp.n_head_kv))

            def run() -> torch.Tensor:
                return self._decode_step(bucket, attend)  # noqa: B023

            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles the kernels, creates the BLAS handles
                    run()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = run()
            self._graphs[bucket] = (graph, out)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _eager(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """A step with prompt chunks (and any decode tokens) with the fused kernels.

        Rows are laid out decode tokens first, so their queries are the leading rows of
        the QKV matrix as in a decode graph; then the prompt chunks in schedule order.
        """
        dev = self.device
        decodes = [c for c in chunks if c.n == 1]
        prompts = [c for c in chunks if c.n > 1]
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        first_row: dict[int, int] = {}
        for chunk in (*decodes, *prompts):
            seq = chunk.seq
            assert seq.page_table is not None
            start, stop = seq.n_cached, seq.n_cached + chunk.n
            first_row[id(chunk)] = len(tokens)
            tokens.extend(seq.tokens[start:stop])
            positions.extend(range(start, stop))
            slots.extend(seq.page_table.slots(start, stop))
        # logits in schedule order: the order of the chunks that complete
        logit_rows = [first_row[id(c)] + c.n - 1 for c in chunks if c.completes]
        fresh = [c for c in prompts if c.seq.n_cached == 0]
        batches = [
            _Batch.build([first_row[id(fresh[i])] for i in group], [fresh[i].n for i in group], dev)
            for group in group_prompts([c.n for c in fresh])
        ]
        resumed = []
        for c in prompts:
            if c.seq.n_cached > 0:
                assert c.seq.page_table is not None
                ctx = c.seq.page_table.slots(0, c.seq.n_cached + c.n)
                resumed.append(
                    _Resumed(first_row[id(c)], c.n, c.seq.n_cached, torch.tensor(ctx, device=dev))
                )
        attend = self._mixed_attend(self._decode_context(decodes), batches, resumed)
        return self._body(
            torch.tensor(tokens, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            torch.tensor(slots, dtype=torch.long, device=dev),
            attend,
            torch.tensor(logit_rows, dtype=torch.long, device=dev),
        )

    def _decode_context(
        self, decodes: Sequence[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Block table, context lengths and split count of a mixed step's decode rows.

        They go through the decode graphs' own input buffer with a bucket's split count,
        so the attention kernel gets the argument layout it was compiled for when the
        graphs were captured: another layout (a narrower table, contiguous lengths) is
        another Triton specialisation, JIT-compiled on first use in the middle of
        serving while every running sequence waits.
        """
        n = len(decodes)
        if n == 0:
            return None
        bucket = pick_bucket(n, self.buckets)
        if bucket is None:  # more than the largest bucket (a FastPath made by hand)
            buf = np.zeros((n, N_FIXED + self.width), np.int32)
            pack_decode(self._decode_rows(decodes), buf, n, self.page)
            dev = torch.from_numpy(buf).to(self.device)
            return dev[:, N_FIXED:], dev[:, CTX_LEN], split_count(n, self.hp.n_head_kv)
        self._stage(decodes, bucket)
        _, _, _, lens, table = self._decode_inputs(bucket)
        return table[:n], lens[:n], split_count(bucket, self.hp.n_head_kv)

    def _mixed_attend(
        self,
        decode: tuple[torch.Tensor, torch.Tensor, int] | None,
        batches: Sequence[_Batch],
        resumed: Sequence[_Resumed],
    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        hp = self.hp
        dq, dk = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        gqa = hp.n_rep > 1
        kv_dtype = self.cache.k.dtype

        def attend(il: int, qkv: torch.Tensor) -> torch.Tensor:
            out = torch.empty(qkv.shape[0], dq, device=qkv.device, dtype=qkv.dtype)
            if decode is not None:
                table, lens, split = decode
                n_dec = table.shape[0]
                paged_decode_attention(
                    qkv[:n_dec, :dq].view(n_dec, hp.n_head, hp.head_dim),
                    self.cache.k[il],
                    self.cache.v[il],
                    table,
                    lens,
                    self.page,
                    hp.attn_scale,
                    split,
                    out=out[:n_dec],
                )
            for b in batches:
                n_seq, length = len(b.starts), b.length
                if b.gather is None:
                    rows = qkv[b.starts[0] : b.starts[0] + n_seq * length]
                    part = rows.view(n_seq, length, qkv.shape[1])
                else:
                    part = qkv[b.gather]
                # (B, heads, length, d), the last dimension contiguous: SDPA's flash kernel
                q = part[..., :dq].unflatten(-1, (hp.n_head, hp.head_dim)).transpose(1, 2)
                k = part[..., dq : dq + dk].unflatten(-1, (hp.n_head_kv, hp.head_dim))
                v = part[..., dq + dk :].unflatten(-1, (hp.n_head_kv, hp.head_dim))
                k, v = k.transpose(1, 2), v.transpose(1, 2)
                if kv_dtype != k.dtype:  # what later steps will read back
                    k, v = k.to(kv_dtype).to(q.dtype), v.to(kv_dtype).to(q.dtype)
                # causal over padded rows: a real query never sees the padding after it
                o = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=hp.attn_scale, enable_gqa=gqa
                )
                o = o.transpose(1, 2).reshape(n_seq * length, dq)
                if b.gather is None:
                    out[b.starts[0] : b.starts[0] + n_seq * length] = o
                else:
                    assert b.keep is not None
                    assert b.dest is not None
                    out[b.dest] = o[b.keep]
            for p in resumed:
                part = qkv[p.start : p.start + p.n]
                q = part[:, :dq].view(p.n, hp.n_head, hp.head_dim).transpose(0, 1).unsqueeze(0)
                k = self.cache.k[il][p.ctx_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
                v = self.cache.v[il][p.ctx_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
                n_ctx = p.ctx_slots.shape[0]
                key_pos = torch.arange(n_ctx, device=q.device)
                query_pos = torch.arange(p.pos0, p.pos0 + p.n, device=q.device)
                mask = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)
                o = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=hp.attn_scale, enable_gqa=gqa
                )
                out[p.start : p.start + p.n] = o[0].transpose(0, 1).reshape(p.n, dq)
            return out

        return attend


def bytes_per_decode_token(model: LlamaModel) -> int:
    """Weight bytes one decode step reads at batch 1: every matrix once, plus one
    embedding row (the KV cache read is context-dependent and counted apart)."""
    total = 0
    for layer in model.layers:
        for lin in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up):
            total += lin.weight.numel() * lin.weight.element_size()
        total += layer.w_down.weight.numel() * layer.w_down.weight.element_size()
        for t in (layer.attn_norm, layer.ffn_norm):
            total += t.numel() * t.element_size()
    out = model.output.weight
    total += out.numel() * out.element_size()
    emb = model.tok_embd
    total += math.prod(emb.shape[1:]) * emb.element_size()
    return total
