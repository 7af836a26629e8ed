"""Shard runtime: logits of the saved shards run by the MIL interpreter against the numpy
reference on the same dequantized weights, the KV cache across prefill chunks and decode steps,
greedy generation against greedy decoding of the reference, sampling against closed forms."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from anepack.cli import main
from anepack.coreml import builder
from anepack.coreml.builder import build_shards, choose_alpha
from anepack.errors import AnepackError
from anepack.golden import load_prompts
from anepack.metrics import rowwise_cosine
from anepack.reference import build
from anepack.runtime.host_files import read_config, tokenizer_path, write_host_files
from anepack.runtime.sampling import Sampler, generate
from anepack.runtime.shards import ShardRuntime
from anepack.runtime.host_files import CONFIG_FILE
from anepack.runtime.sampling import nucleus
from anepack.source import open_gguf
from anepack.synth import write_synthetic_gguf
from anepack.tokenizer import Tokenizer
from anepack.validate.recipes import load_recipe, parse_recipe
from anepack.validate.weights import RecipeWeights

MIN_COSINE = 0.999  # the bar: the artifact computes what the simulation computes

# Linear, LUT, vector LUT, int8-LUT and fp16 weights in one model.
GEMMA_RECIPE = """
name = "mixed-gemma"
[[rule]]
tensors = "blk.*.attn_q.weight"
format = "lut4-g16"
[[rule]]
tensors = "blk.*.attn_v.weight"
format = "vlut2x8"
[[rule]]
tensors = "blk.*.attn_*"
format = "int8-channel"
[[rule]]
tensors = "blk.*.ffn_*"
format = "lut4-g16-int8lut"
[[rule]]
tensors = "output.weight"
format = "lut6-tensor"
"""

LLAMA_RECIPE = """
name = "mixed-llama"
[[rule]]
tensors = "blk.*.attn_*"
format = "uint4-channel-affine"
[[rule]]
tensors = "blk.*.ffn_*"
format = "lut4-g16-pcs"
[[rule]]
tensors = "output.weight"
format = "fp16"
"""

# Chunks of 8 with the golden prompts cut to 17-21 tokens: a prefill spans up to 3 calls and
# ends in a padded chunk or (17 tokens) a one-token decode call. Gemma's window of 4 is crossed
# inside and across chunks; its 6 layers hold 5 sliding and 1 global (llama.cpp: il % 6 == 5);
# the budget splits them over 2 packages. Llama's LM head is cut into 3 packages (768-row
# chunks). At D 64 / head_dim 32 one position fell to 0.99908 (fp16 alone), hence D 128.
GEMMA_DIMS = dict(layers=6, n_embd=128, n_head=2, n_head_kv=1, head_dim=64, n_ff=256, sliding_window=4)
GEMMA_BUILD = dict(alpha=0.5, chunk=8, context=128, max_shard_mb=0.3)
LLAMA_BUILD = dict(alpha=0.5, chunk=8, context=128, max_shard_mb=0.25)
LLAMA_VOCAB_CHUNK = 768


def _built(root, arch, recipe, build_options, seed, **dims):
    gguf = open_gguf(write_synthetic_gguf(root / f"{arch}.gguf", arch, seed=seed, **dims))
    weights = RecipeWeights(gguf, parse_recipe(recipe))
    out = root / "shards"
    write_host_files(gguf, out)
    build_shards(gguf, weights, out, **build_options)
    return gguf, build(gguf.config, weights), out


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A synthetic Gemma 3 built into shards, and the reference on the recipe's dequantized weights."""
    return _built(tmp_path_factory.mktemp("runtime-gemma"), "gemma3", GEMMA_RECIPE, GEMMA_BUILD, 31, **GEMMA_DIMS)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A synthetic Llama 3.1+ (per-pair RoPE factors, which turn several pairs' angles within these
    prompts; tests/test_reference.py shows they matter) built into shards, and its reference."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builder, "MAX_VOCAB_CHUNK", LLAMA_VOCAB_CHUNK)
        return _built(tmp_path_factory.mktemp("runtime-llama"), "llama", LLAMA_RECIPE, LLAMA_BUILD, 32, layers=2,
                      llama3_rope=True)


@pytest.fixture(params=["gemma", "llama"])
def model(request):
    return request.getfixturevalue(request.param)


def _golden_tokens(out, lengths=range(17, 22)) -> list[list[int]]:
    """The default golden prompts in the model's own vocabulary, cut to at most 17..21 tokens."""
    with Tokenizer(tokenizer_path(out)) as tokenizer:
        ids = [tokenizer.encode(prompt.text) for prompt in load_prompts()]
    lengths = list(lengths)
    return [tokens[:lengths[index % len(lengths)]] for index, tokens in enumerate(ids)]


def _reference_greedy(reference, prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(np.argmax(reference.forward(np.array(tokens)).logits[-1])))
    return tokens[len(prompt):]


def _reference_agreement(reference, prompt: list[int], generated: list[int]) -> int:
    """How many leading ``generated`` tokens greedy decoding of the reference reproduces.

    Greedy decoding gives ``generated`` exactly when each token is the reference's argmax after
    the tokens before it, so one forward pass over prompt + generated decides it (instead of one
    pass per token).
    """
    tokens = np.array(prompt + generated[:-1])
    hidden = reference.embed(tokens)
    for il in range(reference.config.n_layers):
        hidden = reference.layer(il, hidden)
    choices = np.argmax(reference.final(hidden[len(prompt) - 1:]), axis=-1)
    disagree = np.flatnonzero(choices != np.array(generated))
    return len(generated) if disagree.size == 0 else int(disagree[0])


def test_shard_logits_match_the_reference_on_the_golden_prompts(model):
    gguf, reference, out = model
    runtime = ShardRuntime(out, "mil")
    assert len(runtime.manifest.shards) >= 3  # gemma: 2 layer packages; llama: 3 head packages
    for tokens in _golden_tokens(out):
        cosines = rowwise_cosine(runtime.logits(tokens), reference.forward(np.array(tokens)).logits)
        assert cosines.min() >= MIN_COSINE, (tokens, cosines)


def test_decode_steps_continue_a_prefill_as_one_long_prefill(model):
    gguf, reference, out = model
    tokens = _golden_tokens(out, [21])[0]
    runtime = ShardRuntime(out, "mil")
    whole = runtime.logits(tokens)
    runtime.reset()
    stepped = [runtime.prefill(tokens[:10])]  # a full chunk, then a padded one
    stepped += [runtime.decode(token)[None] for token in tokens[10:]]
    stepped = np.concatenate(stepped)
    assert runtime.position == len(tokens)
    # Both paths run the same fp16 graph; only float32 summation order differs before rounding.
    assert rowwise_cosine(stepped, whole).min() >= 0.9999
    assert rowwise_cosine(stepped, reference.forward(np.array(tokens)).logits).min() >= MIN_COSINE


def test_greedy_generation_matches_greedy_decoding_of_the_reference(model):
    gguf, reference, out = model
    runtime = ShardRuntime(out, "mil")
    with Tokenizer(tokenizer_path(out)) as tokenizer:
        for prompt in load_prompts()[:2]:
            result = generate(runtime, tokenizer, prompt.text, 12, Sampler(), stop_at_eos=False)
            assert result.prompt_tokens == tokenizer.encode(prompt.text)
            assert _reference_agreement(reference, result.prompt_tokens, result.tokens) == 12


def test_cli_generate_prints_the_reference_greedy_continuation(gemma):
    gguf, reference, out = gemma
    prompt = load_prompts()[0].text
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt", prompt, "--max-tokens", "6",
                                       "--no-stop", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    with Tokenizer(gguf.path) as tokenizer:  # the source model's own vocabulary
        expected = _reference_greedy(reference, tokenizer.encode(prompt), 6)
        assert document["tokens"] == expected
        assert document["text"] == tokenizer.decode(expected)
    assert document["timings"]["decode_tokens_per_s"] > 0


def test_host_files_carry_the_config_and_the_source_vocabulary(gemma):
    gguf, _, out = gemma
    assert read_config(out) == gguf.config
    text = "Grüße aus Köln! The quick brown fox, 東京 🙂 <bos>"
    with Tokenizer(gguf.path) as source, Tokenizer(tokenizer_path(out)) as stored:
        assert stored.encode(text) == source.encode(text)
        assert (stored.bos_id, stored.eos_id, stored.vocab_size) == (source.bos_id, source.eos_id, source.vocab_size)
    assert tokenizer_path(out).stat().st_size < gguf.path.stat().st_size / 10


def test_runtime_errors_are_one_line(gemma, tmp_path):
    gguf, _, out = gemma
    runtime = ShardRuntime(out, "mil")
    with pytest.raises(AnepackError, match="exceed the build's context of 128"):
        runtime.prefill(np.arange(129) % 100)
    with pytest.raises(AnepackError, match="outside the vocabulary"):
        runtime.decode(gguf.config.vocab_size)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for item in out.iterdir():
        if item.name != CONFIG_FILE:
            (incomplete / item.name).symlink_to(item)
    with pytest.raises(AnepackError) as error:
        ShardRuntime(incomplete, "mil")
    assert str(error.value) == f"{incomplete / CONFIG_FILE}: missing: the build did not store the model config " \
                               "(anepack convert writes it)"


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_coreml_backend_refuses_to_run_off_macos(gemma):
    with pytest.raises(AnepackError, match="the coreml backend needs macOS") as error:
        ShardRuntime(gemma[2], "coreml")
    assert "\n" not in str(error.value)


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts only on macOS")
def test_coreml_backend_matches_the_reference(gemma):
    gguf, reference, out = gemma
    runtime = ShardRuntime(out, "coreml")
    for tokens in _golden_tokens(out)[:3]:
        cosines = rowwise_cosine(runtime.logits(tokens), reference.forward(np.array(tokens)).logits)
        assert cosines.min() >= MIN_COSINE, cosines


# --- sampling -----------------------------------------------------------------------------


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probabilities = np.array([0.15, 0.5, 0.05, 0.3])
    np.testing.assert_allclose(nucleus(probabilities, 0.7), [0, 0.5 / 0.8, 0, 0.3 / 0.8])
    np.testing.assert_allclose(nucleus(probabilities, 0.85), [0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95])
    np.testing.assert_allclose(nucleus(probabilities, 0.4), [0, 1, 0, 0])
    np.testing.assert_array_equal(nucleus(probabilities, 1.0), probabilities)


@pytest.mark.parametrize("temperature, top_p, expected", [
    (1.0, 1.0, [0.6, 0.3, 0.1]),
    (2.0, 1.0, np.sqrt([0.6, 0.3, 0.1]) / np.sqrt([0.6, 0.3, 0.1]).sum()),  # p^(1/T), renormalized
    (1.0, 0.85, [2 / 3, 1 / 3, 0.0]),
])
def test_sampling_frequencies_follow_the_tempered_nucleus(temperature, top_p, expected):
    sampler = Sampler(temperature, top_p, seed=7)
    logits = np.log([0.6, 0.3, 0.1]).astype(np.float32)
    draws = np.bincount([sampler(logits) for _ in range(20000)], minlength=3) / 20000
    np.testing.assert_allclose(draws, expected, atol=0.015)  # > 4 standard errors
    if expected[2] == 0:
        assert draws[2] == 0


def test_sampler_rejects_bad_settings():
    with pytest.raises(AnepackError, match="temperature"):
        Sampler(temperature=-1)
    with pytest.raises(AnepackError, match="top-p"):
        Sampler(top_p=0)


class _ScriptedRuntime:
    """Logits that make greedy decoding emit ``script`` token by token."""

    context = 16

    def __init__(self, script: list[int], vocab: int = 8):
        self.script, self.vocab, self.step = script, vocab, 0

    def reset(self):
        self.step = 0

    def _next(self):
        logits = np.zeros(self.vocab, np.float32)
        logits[self.script[self.step]] = 1
        self.step += 1
        return logits

    def prefill(self, tokens):
        return np.stack([np.zeros(self.vocab, np.float32)] * (len(tokens) - 1) + [self._next()])

    def decode(self, token):
        return self._next()


class _Characters:
    eos_id = 0

    def encode(self, text):
        return [ord(c) % 8 for c in text]

    def decode(self, ids):
        return "".join(str(i) for i in ids)


def test_generation_stops_at_end_of_sequence_and_at_max_tokens():
    stopped = generate(_ScriptedRuntime([3, 5, 0, 4]), _Characters(), "ab", 10, Sampler())
    assert stopped.tokens == [3, 5, 0] and stopped.text == "350"
    assert stopped.timings.generated_tokens == 3 and stopped.timings.prompt_tokens == 2
    assert generate(_ScriptedRuntime([3, 5, 0, 4]), _Characters(), "ab", 4, Sampler(), stop_at_eos=False).tokens \
        == [3, 5, 0, 4]
    assert generate(_ScriptedRuntime([3, 5, 0, 4]), _Characters(), "ab", 2, Sampler()).tokens == [3, 5]
    with pytest.raises(AnepackError, match="need 17 positions"):
        generate(_ScriptedRuntime([3] * 20), _Characters(), "abcdefgh", 10, Sampler())


# --- the default model ----------------------------------------------------------------------

# Four golden prompts continued for 16 greedy tokens (the bar: 3 of 4 agree).
GREEDY_PROMPTS = ("short", "arithmetic", "science", "dialogue")
GREEDY_TOKENS = 16


@pytest.fixture(scope="module")
def default_build(default_model_path, tmp_path_factory):
    """The default model built once with int8-per-channel (alpha from the reference's own peak)
    and the reference logits of every golden prompt on the same dequantized weights."""
    gguf = open_gguf(default_model_path)
    weights = RecipeWeights(gguf, load_recipe("int8-per-channel"))
    reference = build(gguf.config, weights)
    with Tokenizer(default_model_path) as tokenizer:
        prompts = {prompt.name: tokenizer.encode(prompt.text) for prompt in load_prompts()}
    expected, peak = {}, 0.0
    for name, tokens in prompts.items():
        result = reference.forward(np.array(tokens))
        expected[name] = result.logits
        peak = max([peak] + [float(np.abs(hidden).max()) for hidden in result.hidden_states])
    out = tmp_path_factory.mktemp("default-shards")
    write_host_files(gguf, out)
    build_shards(gguf, weights, out, alpha=choose_alpha(peak), chunk=32, context=128)
    return ShardRuntime(out, "mil"), reference, prompts, expected


@pytest.mark.slow
def test_default_model_shards_match_the_reference_on_every_golden_prompt(default_build):
    runtime, _, prompts, expected = default_build
    worst = {name: float(rowwise_cosine(runtime.logits(tokens), expected[name]).min())
             for name, tokens in prompts.items()}
    assert min(worst.values()) >= MIN_COSINE, worst


@pytest.mark.slow
def test_default_model_greedy_continuations_agree_with_the_reference(default_build):
    runtime, reference, _, _ = default_build
    prompts = {prompt.name: prompt.text for prompt in load_prompts()}
    agreement = {}
    with Tokenizer(tokenizer_path(runtime.out_dir)) as tokenizer:
        for name in GREEDY_PROMPTS:
            result = generate(runtime, tokenizer, prompts[name], GREEDY_TOKENS, Sampler(), stop_at_eos=False)
            agreement[name] = _reference_agreement(reference, result.prompt_tokens, result.tokens)
    assert sum(count == GREEDY_TOKENS for count in agreement.values()) >= 3, agreement
