"""anepack.synth: synthetic GGUFs that llama.cpp runs, seeded, with real-like weight statistics.

Every file is read back with gguf-py's GGUFReader or run by llama.cpp, never by anepack's
own reader, so the checks are independent of the writer.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from anepack import synth
from anepack.cli import main
from anepack.errors import AnepackError

ENGLISH = "The quick brown fox jumps over the lazy dog, and the model runs on the neural engine."
NON_ENGLISH = "Grüße aus Köln! Привет, мир. 東京で寿司を食べた。 ¿Qué tal? 🙂"
# About 60 tokens: crosses gemma3's 16-token sliding window several times.
PROMPT = (
    "When the small model reads a long prompt, each layer sees only the last few tokens, "
    "except the global layer, which sees the whole sequence from the first word to the last."
)
N_CTX = 128


def _reader_tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


def _excess_kurtosis(values: np.ndarray) -> float:
    centered = values.astype(np.float64).ravel() - values.mean()
    return float(np.mean(centered**4) / np.mean(centered**2) ** 2 - 3.0)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _llama_cpp_logits(path, prompt: str) -> tuple[list[int], np.ndarray]:
    from llama_cpp import Llama

    model = Llama(model_path=str(path), logits_all=True, n_ctx=N_CTX, n_batch=N_CTX, verbose=False)
    tokens = model.tokenize(prompt.encode(), add_bos=True)
    model.eval(tokens)
    logits = np.array(model.scores[: len(tokens)], dtype=np.float64)
    model.close()
    return tokens, logits


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


MODELS = {
    "gemma3": ("gemma3", {}),
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tied_embeddings": True}),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, model_dir):
    arch, dims = MODELS[request.param]
    return synth.write_synthetic_gguf(model_dir / f"{request.param}.gguf", arch, seed=7, **dims)


def test_llama_cpp_runs_the_model_with_non_degenerate_logits(model):
    tokens, logits = _llama_cpp_logits(model, PROMPT)
    reader = gguf.GGUFReader(model)
    arch = reader.fields["general.architecture"].contents()
    assert len(tokens) > 48
    if arch == "gemma3":
        # llama.cpp makes layer 5 global; the prompt is longer than several sliding windows.
        assert reader.fields["gemma3.block_count"].contents() >= 6
        assert len(tokens) > 3 * reader.fields["gemma3.attention.sliding_window"].contents()
    assert np.isfinite(logits).all()
    top = logits.argmax(axis=1)
    assert len(set(top.tolist())) >= len(tokens) // 4
    assert logits.std(axis=1).min() > 1.0
    assert _cosines(logits[1:], logits[:-1]).mean() < 0.8


def test_llama_cpp_applies_the_sliding_window_to_the_gemma3_model(model_dir):
    windowed = synth.write_synthetic_gguf(model_dir / "window16.gguf", "gemma3", seed=7, sliding_window=16)
    unwindowed = synth.write_synthetic_gguf(model_dir / "window512.gguf", "gemma3", seed=7, sliding_window=512)
    _, narrow = _llama_cpp_logits(windowed, PROMPT)
    _, wide = _llama_cpp_logits(unwindowed, PROMPT)
    cosines = _cosines(narrow, wide)
    # Same weights: identical while the prompt fits in the window, different once it does not.
    assert cosines[:16].min() > 0.99999
    assert cosines[16:].mean() < 0.9


def test_tied_option_drops_the_output_tensor(model_dir):
    tied = gguf.GGUFReader(synth.write_synthetic_gguf(model_dir / "t.gguf", "llama", layers=1, tied_embeddings=True))
    untied = gguf.GGUFReader(synth.write_synthetic_gguf(model_dir / "u.gguf", "llama", layers=1))
    assert "output.weight" not in {t.name for t in tied.tensors}
    assert "output.weight" in {t.name for t in untied.tensors}
    gemma = gguf.GGUFReader(synth.write_synthetic_gguf(model_dir / "g.gguf", "gemma3", layers=1))
    assert "output.weight" not in {t.name for t in gemma.tensors}


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
@pytest.mark.parametrize("text", [ENGLISH, NON_ENGLISH], ids=["english", "non-english"])
def test_llama_cpp_tokenizer_round_trips(model_dir, arch, text):
    from llama_cpp import Llama

    path = synth.write_synthetic_gguf(model_dir / f"vocab-{arch}.gguf", arch, layers=1)
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.encode(), add_bos=False)
    decoded = vocab.detokenize(tokens).decode()
    vocab.close()
    # SPM with add_space_prefix (llama) puts one space in front of the text.
    assert decoded.removeprefix(" ") == text
    pieces = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
    byte_tokens = [t for t in tokens if pieces[t].startswith("<0x")]
    if text == ENGLISH:
        assert not byte_tokens
        assert len(tokens) < len(text) / 3  # whole-word pieces, not characters
    else:
        assert len(byte_tokens) >= len("東京で寿司を食べた🙂".encode())


def test_same_seed_same_bytes_and_different_seed_different_weights(tmp_path):
    first = synth.write_synthetic_gguf(tmp_path / "a.gguf", "gemma3", layers=2, seed=3)
    again = synth.write_synthetic_gguf(tmp_path / "b.gguf", "gemma3", layers=2, seed=3)
    other = synth.write_synthetic_gguf(tmp_path / "c.gguf", "gemma3", layers=2, seed=4)
    assert first.read_bytes() == again.read_bytes()
    a, c = gguf.GGUFReader(first), gguf.GGUFReader(other)
    assert [t.name for t in a.tensors] == [t.name for t in c.tensors]
    for name in ("token_embd.weight", "blk.1.attn_q.weight", "blk.0.post_ffw_norm.weight"):
        wa, wc = _reader_tensor(a, name), _reader_tensor(c, name)
        assert wa.shape == wc.shape and np.all(wa != wc), name
    for name in ("token_embd.weight", "blk.1.attn_q.weight"):
        # Independent draws: correlation ~ N(0, 1/sqrt(32768)) or smaller.
        assert abs(np.corrcoef(_reader_tensor(a, name).ravel(), _reader_tensor(c, name).ravel())[0, 1]) < 0.05


def test_weight_statistics_are_heavy_tailed_with_outlier_channels(model_dir):
    reader = gguf.GGUFReader(synth.write_synthetic_gguf(model_dir / "stats.gguf", "gemma3", layers=2, seed=11))
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        weight = _reader_tensor(reader, name)
        assert _excess_kurtosis(weight) > 1.0, name
    for name in ("blk.0.attn_k.weight", "blk.1.ffn_gate.weight", "blk.0.attn_output.weight"):
        weight = _reader_tensor(reader, name)
        assert (np.abs(weight).max(axis=0) / weight.std()).max() >= 10.0, name
        # Whole input channels stand out (not just single heavy-tailed values), and only a few.
        channel_rms = np.sqrt((weight**2).mean(axis=0))
        ratio = channel_rms / np.median(channel_rms)
        assert ratio.max() >= 4.0 and np.sum(ratio > 2.0) <= 4, name
    for name in ("output_norm.weight", "blk.0.attn_q_norm.weight", "blk.1.ffn_norm.weight"):
        gains = _reader_tensor(reader, name)
        # GGUF Gemma norm weights already include the +1, so they sit around 1.
        assert gains.min() > 0 and 0.8 < gains.mean() < 1.25, name
    for name in ("blk.0.post_attention_norm.weight", "blk.1.post_ffw_norm.weight"):
        assert _reader_tensor(reader, name).min() > 1.5, name


@pytest.mark.parametrize(("weight_type", "ggml_type", "max_relative_error"), [
    ("f16", gguf.GGMLQuantizationType.F16, 1e-3),
    ("q8_0", gguf.GGMLQuantizationType.Q8_0, 0.02),
    ("q4_0", gguf.GGMLQuantizationType.Q4_0, 0.25),
])
def test_quantized_types_store_the_same_weights(tmp_path, weight_type, ggml_type, max_relative_error):
    # Bounds: f16 rounding is ~2e-4 relative; a 32-value block rounds to (absmax / levels), and
    # the outlier channels raise absmax, so q8_0 reaches ~1% and q4_0 ~15% here.
    exact = gguf.GGUFReader(synth.write_synthetic_gguf(tmp_path / "f32.gguf", "llama", layers=1, seed=5))
    stored = gguf.GGUFReader(
        synth.write_synthetic_gguf(tmp_path / "q.gguf", "llama", layers=1, seed=5, weight_type=weight_type)
    )
    for tensor in stored.tensors:
        assert tensor.tensor_type == (ggml_type if len(tensor.shape) == 2 else gguf.GGMLQuantizationType.F32)
        reference, decoded = _reader_tensor(exact, tensor.name), _reader_tensor(stored, tensor.name)
        relative = np.linalg.norm(decoded - reference) / np.linalg.norm(reference)
        assert relative < max_relative_error, tensor.name


def test_llama_cpp_reads_q8_0_weights_like_the_f32_ones(tmp_path):
    f32 = synth.write_synthetic_gguf(tmp_path / "f32.gguf", "gemma3", seed=2)
    q8 = synth.write_synthetic_gguf(tmp_path / "q8.gguf", "gemma3", seed=2, weight_type="q8_0")
    _, exact = _llama_cpp_logits(f32, PROMPT)
    _, quantized = _llama_cpp_logits(q8, PROMPT)
    assert _cosines(exact, quantized).min() > 0.99


@pytest.mark.parametrize(("arch", "dims", "problem"), [
    ("gemma3", {"n_head_kv": 3}, "must be a multiple of n_head_kv"),
    ("gemma3", {"head_dim": 33}, "head_dim must be positive and even"),
    ("llama", {"n_embd": 130}, "n_embd (130) must be a multiple of n_head (4)"),
    ("llama", {"n_vocab": 100}, "n_vocab must be between"),
    ("llama", {"n_experts": 4}, "unknown llama dimension(s) n_experts"),
    ("mamba", {}, "unknown synthetic architecture"),
    ("llama", {"n_ff": 100, "weight_type": "q8_0"}, "q8_0 needs row lengths divisible by 32"),
])
def test_bad_dimensions_raise_one_line_errors_and_write_nothing(tmp_path, arch, dims, problem):
    path = tmp_path / "bad.gguf"
    with pytest.raises(AnepackError) as caught:
        synth.write_synthetic_gguf(path, arch, **dims)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = synth.write_synthetic_gguf(tmp_path / "m.gguf", "llama", layers=1, seed=1)
    before = path.read_bytes()

    def interrupted(plan, seed):
        raise OSError("no space left on device")

    monkeypatch.setattr(synth, "synthesize_tensor", interrupted)
    with pytest.raises(OSError):
        synth.write_synthetic_gguf(path, "llama", layers=1, seed=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_cli_writes_the_model_and_reports_it_as_json(tmp_path):
    out = tmp_path / "cli.gguf"
    result = CliRunner().invoke(main, ["synth", "--arch", "llama", "--layers", "2", "--seed", "4",
                                       "--type", "q8_0", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    reader = gguf.GGUFReader(out)
    assert document["path"] == str(out) and document["arch"] == "llama" and document["layers"] == 2
    assert document["params"] == sum(int(t.n_elements) for t in reader.tensors)
    assert document["bytes"] == out.stat().st_size
    assert reader.fields["llama.block_count"].contents() == 2

    plain = CliRunner().invoke(main, ["synth", "--arch", "gemma3", "--layers", "1", "--out", str(tmp_path / "g.gguf")])
    assert plain.exit_code == 0 and str(tmp_path / "g.gguf") in plain.output

    failed = CliRunner().invoke(main, ["synth", "--arch", "gemma3", "--out", str(tmp_path / "missing" / "x.gguf")])
    assert failed.exit_code == 2


def test_moe_goes_with_moe_dims_only(tmp_path):
    """``--moe --dims 26b-a4b`` names one MoE model twice and is accepted (here it reaches the
    layer count check); ``--moe`` with a dense preset, or per-layer embeddings with any preset,
    is refused in one line before anything is written."""
    out = tmp_path / "x.gguf"
    accepted = CliRunner().invoke(main, ["synth", "--arch", "gemma4", "--moe", "--dims", "26b-a4b",
                                         "--layers", "0", "--out", str(out)])
    assert accepted.exit_code == 2 and "n_layer must be positive" in accepted.output, accepted.output
    for flags in (["--moe", "--dims", "dense"], ["--per-layer-embeddings", "--dims", "26b-a4b"]):
        refused = CliRunner().invoke(main, ["synth", "--arch", "gemma4", *flags, "--out", str(out)])
        assert refused.exit_code == 2 and "choose at most one" in refused.output, (flags, refused.output)
    assert not out.exists()
