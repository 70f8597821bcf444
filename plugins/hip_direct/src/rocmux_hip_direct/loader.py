"""Loading a GGUF into a :class:`HipDirectModel` (imports torch; imported on load only).

``LoadConfig`` maps onto the engine: ``devices`` picks the torch device (``cpu``,
``cuda:N``, ``ROCmN``/``CUDAN``, or an index), ``gpu_layers=0`` forces the CPU,
``context_len`` is each sequence's limit (default: the model's, at most 4096),
``parallel`` the number of sequences batched together (default 4), ``threads``
torch's CPU threads. ``extra_flags`` take hip_direct's own options::

    --numerics fast|llamacpp   llamacpp: reproduce llama.cpp's CPU rounding (slower)
    --dtype f32|f16|bf16       compute dtype (default f32 on CPU, f16 on a GPU)
    --kv-dtype f16|f32|bf16    KV-cache dtype (default f16, as llama.cpp)
    --block-size N             tokens per KV-cache block (default 16)
    --max-batch-tokens N       tokens per engine step (default 512 on CPU, 4096 on a GPU)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rocmux.errors import InvalidFlag, InvalidModel
from rocmux.types import LoadConfig

from rocmux_hip_direct.chat_template import ChatTemplate
from rocmux_hip_direct.engine import Engine
from rocmux_hip_direct.gguf_file import GGUFFile
from rocmux_hip_direct.hparams import UnsupportedModel
from rocmux_hip_direct.model import LlamaModel
from rocmux_hip_direct.text_model import HipDirectModel
from rocmux_hip_direct.tokenizer import Tokenizer

DEFAULT_MAX_CONTEXT = 4096
DEFAULT_PARALLEL = 4
# Tokens per engine step. A CPU step costs in proportion to its tokens, so a small step
# keeps decode tokens flowing between prompt chunks. A GPU step of 512 tokens leaves the
# GPU mostly idle, and at 512 only one 512-token prompt fitted a step: concurrent
# prompts queued behind each other a step at a time. 4096 (vLLM's
# max_num_batched_tokens is of this order) prefills eight such prompts in one step.
CPU_BATCH_TOKENS = 512
CPU_PREFILL_CHUNK = 256
GPU_BATCH_TOKENS = 4096
# Engine steps per worker-thread trip on the GPU fast path (see HipDirectModel._burst).
GPU_BURST = 8
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
FLAGS = {
    "--numerics": ("fast", "llamacpp"),
    "--dtype": tuple(DTYPES),
    "--kv-dtype": tuple(DTYPES),
    "--block-size": None,
    "--max-batch-tokens": None,
}


def parse_extra_flags(extra: Sequence[str]) -> dict[str, str]:
    """``--flag value`` / ``--flag=value`` pairs, checked against :data:`FLAGS`."""
    out: dict[str, str] = {}
    items = list(extra)
    i = 0
    while i < len(items):
        item = items[i]
        name, sep, value = item.partition("=")
        if name not in FLAGS:
            known = ", ".join(FLAGS)
            raise InvalidFlag(f"hip_direct does not know the flag {name!r} (it knows {known})")
        if not sep:
            if i + 1 >= len(items):
                raise InvalidFlag(f"{name} needs a value")
            value = items[i + 1]
            i += 1
        choices = FLAGS[name]
        if choices is not None and value not in choices:
            raise InvalidFlag(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        if choices is None and not (value.isdigit() and int(value) > 0):
            raise InvalidFlag(f"{name} must be a positive integer, not {value!r}")
        out[name] = value
        i += 1
    return out


def pick_device(config: LoadConfig) -> torch.device:
    """The torch device ``config`` asks for (a GPU when there is one, else the CPU)."""
    if config.gpu_layers == 0:
        return torch.device("cpu")
    if config.devices:
        name = config.devices[0].strip()
        if name.lower() == "cpu":
            return torch.device("cpu")
        match = re.fullmatch(r"(?:cuda:|rocm|cuda|hip|gpu)?(\d+)", name, re.IGNORECASE)
        if match is None:
            raise InvalidFlag(f"hip_direct cannot use device {name!r}; use cpu, cuda:N or ROCmN")
        return torch.device("cuda", int(match[1]))
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def step_budget(device: torch.device, flag: str | None = None) -> tuple[int, int]:
    """(tokens per engine step, longest prompt chunk) on ``device``; ``flag`` is
    ``--max-batch-tokens`` when given.

    A GPU lets one prompt take the whole step, and several prompts share it; a CPU cuts
    prompts into chunks of at most 256 tokens.
    """
    gpu = device.type == "cuda"
    default = GPU_BATCH_TOKENS if gpu else CPU_BATCH_TOKENS
    max_batch = int(flag) if flag is not None else default
    return max_batch, max_batch if gpu else min(CPU_PREFILL_CHUNK, max_batch)


def load_model(path: Path, config: LoadConfig) -> HipDirectModel:
    """Read ``path`` and build the engine; blocking (run it in a worker thread)."""
    flags = parse_extra_flags(config.extra_flags)
    device = pick_device(config)
    if config.threads is not None and device.type == "cpu":
        torch.set_num_threads(config.threads)
    default_dtype = "f32" if device.type == "cpu" else "f16"
    dtype = DTYPES[flags.get("--dtype", default_dtype)]
    kv_dtype = DTYPES[flags.get("--kv-dtype", "f16")]
    numerics: Any = flags.get("--numerics", "fast")
    gguf = GGUFFile(path)
    try:
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
        n_ctx_train = int(gguf.get("{arch}.context_length", DEFAULT_MAX_CONTEXT))
        n_ctx = config.context_len or min(n_ctx_train, DEFAULT_MAX_CONTEXT)
        model = LlamaModel.load(gguf, device, dtype, n_ctx, numerics=numerics)
    except (UnsupportedModel, ValueError, KeyError) as exc:
        gguf.close()
        raise InvalidModel(f"hip_direct cannot load {path}: {exc}") from exc
    template = ChatTemplate(
        gguf.metadata.get("tokenizer.chat_template"),
        bos_token=_token_text(tokenizer, tokenizer.bos_id),
        eos_token=_token_text(tokenizer, tokenizer.eos_id),
    )
    gguf.close()  # every tensor is on the device now; the map is not needed
    max_batch, prefill_chunk = step_budget(device, flags.get("--max-batch-tokens"))
    engine = Engine(
        model,
        tokenizer,
        n_ctx=n_ctx,
        max_seqs=config.parallel or DEFAULT_PARALLEL,
        block_size=int(flags.get("--block-size", 16)),
        max_batch_tokens=max_batch,
        prefill_chunk=prefill_chunk,
        kv_dtype=kv_dtype,
        # a GPU step is cheap but a prompt's tail in the next one is not (scheduler.py)
        whole_prompts=device.type == "cuda",
    )
    return HipDirectModel(
        path=path,
        engine=engine,
        tokenizer=tokenizer,
        template=template,
        device=str(device),
        burst=GPU_BURST if engine.fast is not None else 1,
    )


def _token_text(tokenizer: Tokenizer, token: int | None) -> str:
    return tokenizer.tokens[token] if token is not None else ""
