"""Token sampling with llama-server's sampler order and defaults.

The chain is llama.cpp's default: repetition penalty, top-k, top-p, min-p, then
temperature and a draw from the softmax. Temperature 0 (or top-k 1) is greedy. Each
request has its own ``torch.Generator``, so a seed reproduces its tokens whatever else
runs in the same batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import attrs
import torch
from rocmux.types import GenerateConfig

# llama-server's defaults (common_params_sampling).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_LAST_N = 64


@attrs.frozen(kw_only=True)
class SamplingParams:
    """One request's sampler settings, defaults filled in."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    min_p: float = DEFAULT_MIN_P
    repeat_penalty: float = 1.0
    repeat_last_n: int = DEFAULT_REPEAT_LAST_N
    seed: int | None = None

    @classmethod
    def from_config(cls, config: GenerateConfig) -> SamplingParams:
        def pick(value: object, default: object) -> object:
            return default if value is None else value

        return cls(
            temperature=float(pick(config.temperature, DEFAULT_TEMPERATURE)),  # type: ignore[arg-type]
            top_k=int(pick(config.top_k, DEFAULT_TOP_K)),  # type: ignore[call-overload]
            top_p=float(pick(config.top_p, DEFAULT_TOP_P)),  # type: ignore[arg-type]
            min_p=float(pick(config.min_p, DEFAULT_MIN_P)),  # type: ignore[arg-type]
            repeat_penalty=float(pick(config.repeat_penalty, 1.0)),  # type: ignore[arg-type]
            seed=config.seed,
        )

    @property
    def greedy(self) -> bool:
        """True when the choice is the arg-max (after any repetition penalty)."""
        return self.temperature <= 0.0 or self.top_k == 1

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with ``seed`` (a random seed when there is none)."""
        seed = self.seed if self.seed is not None else random.SystemRandom().getrandbits(63)
        return torch.Generator(device="cpu").manual_seed(seed)


def apply_repeat_penalty(
    logits: torch.Tensor, recent: Sequence[int], penalty: float
) -> torch.Tensor:
    """llama.cpp's penalty: each distinct recent token's logit divided (if > 0) or
    multiplied (if <= 0) by ``penalty``."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    recent: Sequence[int] = (),
) -> int:
    """One token id from a (n_vocab,) float32 row of logits."""
    logits = apply_repeat_penalty(
        logits.float(), recent[-params.repeat_last_n :], params.repeat_penalty
    )
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.cpu()
    k = params.top_k if 0 < params.top_k < logits.shape[0] else logits.shape[0]
    values, ids = torch.topk(logits, k)  # sorted, largest first
    keep = torch.ones_like(values, dtype=torch.bool)
    if params.top_p < 1.0:
        probs = torch.softmax(values, dim=0)
        before = torch.cumsum(probs, dim=0) - probs
        keep &= before < params.top_p
    if params.min_p > 0.0:
        keep &= values >= values[0] + math.log(params.min_p)
    keep[0] = True  # min_keep = 1
    values, ids = values[keep], ids[keep]
    probs = torch.softmax(values / params.temperature, dim=0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(ids[choice])
