"""Choosing tokens and generating text over a ``ShardRuntime``: greedy, temperature and top-p
(nucleus) sampling with a seeded numpy Generator.

    result = generate(runtime, tokenizer, "The capital of France is", 16, Sampler())   # greedy
    result = generate(runtime, tokenizer, prompt, 64, Sampler(temperature=0.8, top_p=0.95, seed=1))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from anepack.errors import AnepackError


class Sampler:
    """Picks the next token from logits: greedy at temperature 0, else a draw from
    ``softmax(logits / temperature)`` restricted to the top-p nucleus, from a Generator seeded with ``seed``."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if not (math.isfinite(temperature) and temperature >= 0):
            raise AnepackError(None, f"temperature must be 0 (greedy) or positive, not {temperature}")
        if not 0 < top_p <= 1:
            raise AnepackError(None, f"top-p must be in (0, 1], not {top_p}")
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        probabilities = nucleus(softmax(np.asarray(logits, np.float64) / self.temperature), self.top_p)
        return int(self.rng.choice(probabilities.size, p=probabilities))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - np.max(logits))
    return shifted / shifted.sum()


def nucleus(probabilities: np.ndarray, top_p: float) -> np.ndarray:
    """``probabilities`` kept on the smallest set of most likely tokens whose mass reaches
    ``top_p`` (the token that crosses it included), renormalized; the rest 0."""
    if top_p >= 1:
        return probabilities
    order = np.argsort(-probabilities, kind="stable")
    mass_before = np.cumsum(probabilities[order]) - probabilities[order]
    kept = order[mass_before < top_p]
    result = np.zeros_like(probabilities)
    result[kept] = probabilities[kept]
    return result / result.sum()


class TextCodec(Protocol):
    """What generation needs from a tokenizer (``anepack.tokenizer.Tokenizer`` is one)."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of the prompt's prefill (which yields the first token) and of the decode steps."""

    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else math.inf

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens per second of the decode steps; None when there were none (one token generated)."""
        steps = self.generated_tokens - 1
        if steps <= 0:
            return None
        return steps / self.decode_seconds if self.decode_seconds > 0 else math.inf


@dataclass(frozen=True)
class GenerationResult:
    """The prompt's token ids, the continuation's ids (an end-of-sequence token included) and text."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    timings: Timings


def generate(
    runtime,
    tokenizer: TextCodec,
    prompt: str,
    max_tokens: int,
    sampler: Sampler,
    stop_at_eos: bool = True,
    progress: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Continue ``prompt`` by up to ``max_tokens`` tokens: one prefill, then one decode per token.

    ``runtime`` is a ``ShardRuntime`` (anything with ``reset``, ``prefill``, ``decode`` and
    ``context``). ``progress`` is called with the number of tokens generated so far.
    """
    if max_tokens < 1:
        raise AnepackError(None, f"--max-tokens must be at least 1, not {max_tokens}")
    prompt_ids = list(tokenizer.encode(prompt))
    # The last generated token is never fed back, so the cache needs max_tokens - 1 more slots.
    needed = len(prompt_ids) + max_tokens - 1
    if needed > runtime.context:
        raise AnepackError(None, f"the prompt ({len(prompt_ids)} tokens) and {max_tokens} new tokens need "
                                 f"{needed} positions; the shards were built for a context of {runtime.context}")
    runtime.reset()
    began = time.perf_counter()
    logits = runtime.prefill(prompt_ids)[-1]
    prefilled = time.perf_counter()
    generated: list[int] = []
    while True:
        token = sampler(logits)
        generated.append(token)
        if progress is not None:
            progress(len(generated))
        if len(generated) == max_tokens or (stop_at_eos and token == tokenizer.eos_id):
            break
        logits = runtime.decode(token)
    finished = time.perf_counter()
    timings = Timings(len(prompt_ids), len(generated), prefilled - began, finished - prefilled)
    return GenerationResult(prompt_ids, generated, tokenizer.decode(generated), timings)
