"""Golden references: prompts, their token ids and llama.cpp's logits at every position.

``record`` runs llama.cpp (the independent referee) on a model and stores what it produced;
``check`` compares any logits function (the numpy reference, later quantized stacks or built
shards) against a stored golden file, per prompt and per position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from anepack import __version__
from anepack.atomic import atomic_output
from anepack.errors import AnepackError
from anepack.metrics import kl_divergence, rowwise_cosine, top1_agreement
from anepack.source.fingerprint import file_fingerprint

GOLDEN_FORMAT = 1
MIN_PROMPT_TOKENS = 2


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str


def default_prompts_path() -> Path:
    return Path(str(resources.files("anepack") / "data" / "prompts.jsonl"))


def load_prompts(path: str | os.PathLike[str] | None = None) -> list[Prompt]:
    """Read a JSONL prompt file: one object per line with ``text`` and an optional ``name``."""
    path = Path(path) if path is not None else default_prompts_path()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AnepackError(path, "no such prompt file") from None
    except UnicodeDecodeError:
        raise AnepackError(path, "prompt file is not UTF-8") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise AnepackError(path, f"line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"]:
            raise AnepackError(path, f"line {number} needs a non-empty string field 'text'")
        prompts.append(Prompt(str(item.get("name", f"prompt-{len(prompts) + 1}")), item["text"]))
    if not prompts:
        raise AnepackError(path, "prompt file has no prompts")
    return prompts


# How a check's notes begin when the golden logits come from another model file.
OTHER_FILE_NOTE = "golden logits recorded on another file"


@dataclass
class GoldenPrompt:
    name: str
    text: str
    tokens: np.ndarray  # int32 [T]
    logits: np.ndarray  # float16 [T, vocab], llama.cpp's


@dataclass
class Golden:
    model: str
    fingerprint: str
    referee: str
    prompts: list[GoldenPrompt] = field(default_factory=list)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a temporary file in the same directory, then a rename."""
        path = Path(path)
        meta = {
            "format": GOLDEN_FORMAT,
            "anepack": __version__,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "referee": self.referee,
            "prompts": [{"name": p.name, "text": p.text} for p in self.prompts],
        }
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        for index, prompt in enumerate(self.prompts):
            arrays[f"tokens_{index}"] = prompt.tokens.astype(np.int32)
            arrays[f"logits_{index}"] = prompt.logits.astype(np.float16)
        with atomic_output(path) as partial, open(partial, "wb") as handle:
            np.savez(handle, **arrays)
        return path

    def check_model(self, golden_path: str | os.PathLike[str], model_path: str | os.PathLike[str],
                    vocab_size: int) -> str | None:
        """Refuse a model whose vocabulary is not as wide as these logits; a note when the
        logits were recorded on another file (a dequantized copy, another quantization)."""
        for prompt in self.prompts:
            if prompt.logits.shape[-1] != vocab_size:
                raise AnepackError(golden_path, f"golden logits have {prompt.logits.shape[-1]} entries per position "
                                                f"but {model_path} has a {vocab_size}-token vocabulary")
        if file_fingerprint(model_path) != self.fingerprint:
            return f"{OTHER_FILE_NOTE} ({self.model}), not on {model_path}"
        return None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Golden:
        path = Path(path)
        try:
            archive = np.load(path, allow_pickle=False)
            meta = json.loads(archive["meta"].tobytes().decode())
            golden = cls(meta["model"], meta["fingerprint"], meta["referee"])
            for index, item in enumerate(meta["prompts"]):
                golden.prompts.append(
                    GoldenPrompt(item["name"], item["text"], archive[f"tokens_{index}"], archive[f"logits_{index}"])
                )
        except FileNotFoundError:
            raise AnepackError(path, "no such golden file") from None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise AnepackError(path, f"not a golden file written by anepack golden record ({err})") from None
        return golden


def record(
    model_path: str | os.PathLike[str],
    prompts: Iterable[Prompt],
    progress: Callable[[str], None] | None = None,
) -> Golden:
    """Tokenize each prompt with the model's own vocabulary and keep llama.cpp's logits."""
    from anepack.llamacpp import LlamaCppReferee

    referee = LlamaCppReferee(model_path)
    golden = Golden(str(model_path), file_fingerprint(model_path), referee.describe())
    for prompt in prompts:
        if progress is not None:
            progress(prompt.name)
        tokens = np.asarray(referee.tokenize(prompt.text), dtype=np.int32)
        if len(tokens) < MIN_PROMPT_TOKENS:
            raise AnepackError(None, f"prompt {prompt.name!r} has fewer than {MIN_PROMPT_TOKENS} tokens")
        golden.prompts.append(GoldenPrompt(prompt.name, prompt.text, tokens, referee.logits(tokens)))
    return golden


@dataclass(frozen=True)
class Thresholds:
    """Golden bars. Cosine is checked at every position; top-1 agreement is pooled over every
    position of every prompt (llama.cpp's "same top p"), or per prompt with ``top1_per_prompt``.

    Pooled is the validators' default because a small model's near-ties make one prompt's
    agreement a coin toss: on Gemma 3 270M, INT8 per-channel on the LM head alone, at logit
    cosine >= 0.9998 everywhere, already flips 2 of 24 prose tokens (0.917).
    """

    min_cosine: float = 0.97
    min_top1: float = 0.90
    top1_per_prompt: bool = False


@dataclass
class PromptCheck:
    name: str
    n_tokens: int
    cosine: np.ndarray  # per position
    kl: np.ndarray  # per position, KL(golden || test)
    top1: np.ndarray  # per position, bool

    @property
    def top1_agreement(self) -> float:
        return float(self.top1.mean())

    def first_failure(self, thresholds: Thresholds) -> int | None:
        below = np.flatnonzero(self.cosine < thresholds.min_cosine)
        return int(below[0]) if below.size else None

    def passed(self, thresholds: Thresholds) -> bool:
        top1_ok = not thresholds.top1_per_prompt or self.top1_agreement >= thresholds.min_top1
        return self.first_failure(thresholds) is None and top1_ok

    def summary(self, thresholds: Thresholds) -> dict:
        return {
            "name": self.name,
            "tokens": self.n_tokens,
            "min_cosine": float(self.cosine.min()),
            "mean_cosine": float(self.cosine.mean()),
            "max_kl": float(self.kl.max()),
            "mean_kl": float(self.kl.mean()),
            "top1_agreement": self.top1_agreement,
            "top1_matches": int(self.top1.sum()),
            "first_failing_position": self.first_failure(thresholds),
            "passed": self.passed(thresholds),
            "cosine_per_position": self.cosine.tolist(),
            "kl_per_position": self.kl.tolist(),
        }


def verdict(summaries: list[dict], thresholds: Thresholds) -> dict:
    """The set's verdict from its prompts' summaries: pooled top-1 agreement and pass/fail."""
    positions = sum(p["tokens"] for p in summaries)
    pooled = sum(p["top1_matches"] for p in summaries) / positions if positions else float("nan")
    top1_ok = thresholds.top1_per_prompt or pooled >= thresholds.min_top1
    return {"top1_pooled": pooled, "passed": bool(summaries) and all(p["passed"] for p in summaries) and top1_ok}


def compare(name: str, golden_logits: np.ndarray, test_logits: np.ndarray) -> PromptCheck:
    golden32 = np.asarray(golden_logits, dtype=np.float32)
    if golden32.shape != test_logits.shape:
        raise AnepackError(None, f"prompt {name!r}: logits shape {test_logits.shape} != golden {golden32.shape}")
    # Position by position: the float64 temporaries of the metrics over a whole [T, vocab]
    # block would be several times the size of the logits themselves.
    rows = [(golden32[i:i + 1], test_logits[i:i + 1]) for i in range(len(golden32))]
    return PromptCheck(
        name,
        len(golden32),
        np.concatenate([rowwise_cosine(g, t) for g, t in rows]),
        np.concatenate([kl_divergence(g, t) for g, t in rows]),
        np.concatenate([top1_agreement(g, t) for g, t in rows]),
    )


def check(
    golden: Golden,
    logits_fn: Callable[[np.ndarray], np.ndarray],
    progress: Callable[[str], None] | None = None,
) -> list[PromptCheck]:
    """Run ``logits_fn`` on each golden prompt's tokens and compare position by position."""
    results = []
    for prompt in golden.prompts:
        if progress is not None:
            progress(prompt.name)
        results.append(compare(prompt.name, prompt.logits, logits_fn(prompt.tokens)))
    return results
