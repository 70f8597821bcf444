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
    ids, probs = candidates(logits.cpu(), params)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(ids[choice])


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids the chain keeps from a (n_vocab,) row, best first, and their
    probabilities after temperature (a non-greedy ``params``)."""
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
    return ids, torch.softmax(values / params.temperature, dim=0)


# Columns of the per-row parameters of :func:`sample_rows`.
S_TEMP, S_TOP_K, S_TOP_P, S_LOG_MIN_P, S_UNIFORM, S_GREEDY, S_COLS = range(7)


def row_params(params: SamplingParams, n_vocab: int, uniform: float) -> tuple[float, ...]:
    """One row of :func:`sample_rows`'s parameters: the chain of ``params`` and the
    uniform draw in [0, 1) that picks the token."""
    if params.greedy:
        return (1.0, 1.0, math.inf, -math.inf, 0.0, 1.0)
    k = params.top_k if 0 < params.top_k < n_vocab else n_vocab
    top_p = params.top_p if params.top_p < 1.0 else math.inf
    log_min_p = math.log(params.min_p) if params.min_p > 0.0 else -math.inf
    return (params.temperature, float(k), top_p, log_min_p, uniform, 0.0)


def top_k_of(params: SamplingParams, n_vocab: int) -> int:
    """How many candidates :func:`sample_rows` must sort for ``params``."""
    if params.greedy:
        return 1
    return params.top_k if 0 < params.top_k < n_vocab else n_vocab


def sample_rows(
    logits: torch.Tensor, params: torch.Tensor, k_max: int, greedy: torch.Tensor
) -> torch.Tensor:
    """A token per row of (rows, n_vocab) float32 ``logits``, on their device, with no
    host synchronisation: the chain of :func:`sample` (top-k, top-p, min-p,
    temperature) per row, then the inverse of the kept tokens' cumulative distribution
    at the row's uniform draw instead of ``torch.multinomial``. ``params`` is
    (rows, S_COLS) float32 from :func:`row_params`; rows marked greedy take ``greedy``'s
    token (the arg-max). ``k_max``: the largest top-k among the rows."""
    n_vocab = logits.shape[-1]
    k_max = max(1, min(k_max, n_vocab))
    values, ids = torch.topk(logits, k_max, dim=-1)  # sorted, largest first
    col = torch.arange(k_max, device=logits.device)
    keep = col.unsqueeze(0) < params[:, S_TOP_K : S_TOP_K + 1]
    probs = torch.softmax(values.masked_fill(~keep, -math.inf), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    keep &= before < params[:, S_TOP_P : S_TOP_P + 1]
    keep &= values >= values[:, :1] + params[:, S_LOG_MIN_P : S_LOG_MIN_P + 1]
    keep[:, 0] = True
    scaled = values / params[:, S_TEMP : S_TEMP + 1]
    probs = torch.softmax(scaled.masked_fill(~keep, -math.inf), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = params[:, S_UNIFORM : S_UNIFORM + 1] * cdf[:, -1:]
    choice = (cdf <= target).sum(dim=-1).clamp(max=k_max - 1)
    # never a token the chain dropped (rounding at the end of the distribution)
    n_kept = keep.sum(dim=-1)
    choice = torch.minimum(choice, n_kept - 1)
    token = ids.gather(1, choice.unsqueeze(1)).squeeze(1)
    return torch.where(params[:, S_GREEDY] > 0, greedy.to(token.dtype), token)
