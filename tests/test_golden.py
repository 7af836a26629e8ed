"""Golden files: prompt loading, the default prompt set, and record/check through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from anepack.errors import AnepackError
from anepack.golden import Golden, GoldenPrompt, load_prompts
from anepack.tokenizer import Tokenizer


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anepack.cli", *args], capture_output=True, text=True)


def test_prompt_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(AnepackError, match=r"prompts.jsonl: line 2 is not valid JSON"):
        load_prompts(path)
    path.write_text('{"name": "x"}\n')
    with pytest.raises(AnepackError, match=r"line 1 needs a non-empty string field 'text'"):
        load_prompts(path)


def test_default_prompt_set_is_varied_and_sized(default_model_path):
    prompts = load_prompts()
    assert len(prompts) >= 8
    tokenizer = Tokenizer(default_model_path)
    lengths = [len(tokenizer.encode(p.text)) for p in prompts]
    assert all(6 <= n <= 64 for n in lengths), lengths
    names = {p.name for p in prompts}
    assert {"prose", "code", "arithmetic", "list", "french", "japanese"} <= names
    assert any(ord(c) > 0x3000 for p in prompts for c in p.text)  # a non-Latin script


def test_golden_round_trip_is_atomic(tmp_path):
    rng = np.random.default_rng(0)
    golden = Golden("model.gguf", "abc", "test")
    golden.prompts.append(GoldenPrompt("a", "text", np.arange(5), rng.standard_normal((5, 7))))
    path = golden.save(tmp_path / "g.npz")
    loaded = Golden.load(path)
    assert loaded.prompts[0].tokens.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(loaded.prompts[0].logits, golden.prompts[0].logits.astype(np.float16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npz"]
    (tmp_path / "bad.npz").write_bytes(b"not an archive")
    with pytest.raises(AnepackError, match="bad.npz: not a golden file"):
        Golden.load(tmp_path / "bad.npz")


def test_golden_check_on_the_f32_default_model_meets_the_exact_bars(tmp_path, default_model_f32_path):
    golden_path = tmp_path / "golden.npz"
    recorded = run_cli("golden", "record", str(default_model_f32_path), "--out", str(golden_path), "--json")
    assert recorded.returncode == 0, recorded.stderr
    assert len(json.loads(recorded.stdout)["prompts"]) == len(load_prompts())

    checked = run_cli("golden", "check", str(default_model_f32_path), str(golden_path),
                      "--min-cosine", "0.9999", "--min-top1", "1.0", "--json")
    assert checked.returncode == 0, checked.stderr
    doc = json.loads(checked.stdout)
    assert doc["same_model_file"] and doc["passed"]
    assert doc["quantized_weight_types"] == []
    for prompt in doc["prompts"]:
        assert prompt["min_cosine"] >= 0.9999 and prompt["top1_agreement"] == 1.0, prompt["name"]

    table = run_cli("golden", "check", str(default_model_f32_path), str(golden_path), "--min-cosine", "0.9999")
    assert table.returncode == 0 and "PASS" in table.stdout


def test_golden_check_on_the_q4_k_m_default_model(tmp_path, default_model_path):
    """llama.cpp quantizes activations for Q4_K_M weights (tests/test_llamacpp_emulation.py shows
    each matmul agrees once that is reproduced, and why the stack still drifts): the exact
    reference agrees on average, not at every position."""
    golden_path = tmp_path / "golden.npz"
    assert run_cli("golden", "record", "--out", str(golden_path)).returncode == 0
    checked = run_cli("golden", "check", str(golden_path), "--json")
    assert checked.returncode == 0, checked.stderr
    doc = json.loads(checked.stdout)
    assert doc["same_model_file"]
    # the file stores its matrices as Q5_0, Q4_K, Q6_K and Q8_0 (the tied head: token_embd)
    assert doc["quantized_weight_types"] == ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]
    assert all(p["mean_cosine"] >= 0.99 and p["min_cosine"] >= 0.9 for p in doc["prompts"])
    positions = sum(p["tokens"] for p in doc["prompts"])
    agreeing = sum(p["top1_agreement"] * p["tokens"] for p in doc["prompts"])
    assert agreeing / positions >= 0.93
    # the worst position misses the 0.99 bar (README: 0.949), and the verdict says why and what to do
    assert not doc["passed"]
    table = run_cli("golden", "check", str(golden_path))
    assert "FAIL" in table.stdout and "anepack dequant" in table.stdout, table.stdout


def test_fp16_check_reports_the_residual_overflow(tmp_path, default_model_path):
    prompts = tmp_path / "one.jsonl"
    prompts.write_text('{"name": "short", "text": "The capital of France is"}\n')
    golden_path = tmp_path / "short.npz"
    assert run_cli("golden", "record", "--prompts", str(prompts), "--out", str(golden_path)).returncode == 0
    checked = run_cli("golden", "check", str(golden_path), "--fp16", "--json")
    assert checked.returncode == 0, checked.stderr
    overflow = json.loads(checked.stdout)["prompts"][0]["fp16_overflow"]
    # the float32 reference first exceeds 65504 after layer 7 (0-based), at the BOS position
    assert overflow["layer"] == 7 and overflow["position"] == 0 and abs(overflow["value"]) > 65504
    table = run_cli("golden", "check", str(golden_path), "--fp16")
    assert "fp16 overflow in short: layer 7, position 0" in table.stdout


def test_top1_bar_is_pooled_over_positions_unless_asked_per_prompt():
    from anepack.golden import Thresholds, compare, verdict

    vocab = 8
    eye = np.eye(vocab, dtype=np.float32)
    exact_a = eye[np.arange(10) % vocab]
    exact_b = eye[np.arange(30) % vocab]
    # prompt a: 2 of 10 positions prefer the runner-up by a hair (cosine stays near 1)
    test_a = exact_a.copy()
    for row in (3, 7):
        test_a[row, (row + 1) % vocab] = 1.01
    checks = [compare("a", exact_a, test_a), compare("b", exact_b, exact_b.copy())]
    assert checks[0].top1_agreement == pytest.approx(0.8)
    pooled = Thresholds(min_cosine=0.5, min_top1=0.9)
    summaries = [c.summary(pooled) for c in checks]
    assert verdict(summaries, pooled) == {"top1_pooled": pytest.approx(38 / 40), "passed": True}
    per_prompt = Thresholds(min_cosine=0.5, min_top1=0.9, top1_per_prompt=True)
    summaries = [c.summary(per_prompt) for c in checks]
    assert not summaries[0]["passed"] and not verdict(summaries, per_prompt)["passed"]
    strict = Thresholds(min_cosine=0.5, min_top1=0.96)
    assert not verdict([c.summary(strict) for c in checks], strict)["passed"]


def test_top1_counts_a_tie_in_the_float16_golden_logits_as_agreement():
    from anepack.metrics import top1_agreement

    # llama.cpp's 9.7207 and 9.7211 (a real case, synthetic E2B seed 11) both store as 9.71875
    golden = np.array([[1.0, 9.7207, 2.0, 9.7211], [1.0, 9.7207, 2.0, 9.7211]], np.float32).astype(np.float16)
    assert golden[0, 1] == golden[0, 3]
    test = np.array([[1.0, 9.7207, 2.0, 9.7211], [1.0, 9.7207, 9.8, 9.7211]], np.float32)
    assert top1_agreement(golden, test).tolist() == [True, False]
    # argmax of the golden row names token 1; the test's token 3 ties with it
    assert np.argmax(golden[0]) == 1 and np.argmax(test[0]) == 3


def test_rowwise_cosine_in_blocks_matches_the_closed_form(monkeypatch):
    from anepack import metrics

    monkeypatch.setattr(metrics, "_COSINE_BLOCK_ELEMENTS", 4)  # two rows of two per block
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]], np.float32)
    b = np.array([[1.0, 1.0], [-3.0, -4.0], [2.0, 2.0], [0.0, 0.0], [0.0, 5.0]], np.float32)
    assert metrics.rowwise_cosine(a, b).tolist() == pytest.approx([2 ** -0.5, -1.0, 1.0, 1.0, 0.0])
    assert metrics.rowwise_cosine(a.reshape(5, 1, 2), b.reshape(5, 1, 2)).shape == (5, 1)
    assert float(metrics.rowwise_cosine(a[1], b[1])) == pytest.approx(-1.0)


def test_golden_file_of_another_vocabulary_is_refused_and_of_another_file_noted(tmp_path, synthetic_moe_path):
    from click.testing import CliRunner

    from anepack.cli import main
    from anepack.source import open_gguf

    with open_gguf(synthetic_moe_path) as gguf:
        vocab = gguf.config.vocab_size
    tokens = np.array([2, 10, 11, 12, 13, 14, 15, 16], np.int32)
    logits = np.random.default_rng(0).standard_normal((len(tokens), vocab)).astype(np.float16)
    other = Golden("elsewhere.gguf", "not this file", "test", [GoldenPrompt("p", "text", tokens, logits)])
    other.save(tmp_path / "other.golden")
    narrow = Golden("elsewhere.gguf", "not this file", "test", [GoldenPrompt("p", "text", tokens, logits[:, :100])])
    narrow.save(tmp_path / "narrow.golden")

    runner = CliRunner()
    for command in (["golden", "check", str(synthetic_moe_path)], ["validate", "golden", str(synthetic_moe_path),
                                                                    "--recipe", "int8-per-channel", "--golden"]):
        refused = runner.invoke(main, [*command, str(tmp_path / "narrow.golden")])
        assert refused.exit_code == 2
        assert refused.stderr.strip().splitlines() == [
            f"anepack: error: {tmp_path / 'narrow.golden'}: golden logits have 100 entries per position but "
            f"{synthetic_moe_path} has a {vocab}-token vocabulary"]
    checked = runner.invoke(main, ["golden", "check", str(synthetic_moe_path), str(tmp_path / "other.golden")])
    assert checked.exit_code == 0 and "note: golden logits recorded on another file (elsewhere.gguf)" in checked.stdout
    # random logits fail: the notes name what applies to this model (routed, float32 weights)
    assert "note: this model routes tokens to experts" in checked.stdout and "anepack dequant" not in checked.stdout
    validated = runner.invoke(main, ["validate", "golden", str(synthetic_moe_path), "--recipe", "int8-per-channel",
                                     "--golden", str(tmp_path / "other.golden"), "--db", str(tmp_path / "runs.sqlite")])
    assert validated.exit_code == 0, validated.output
    assert "golden logits recorded on another file (elsewhere.gguf)" in validated.stdout
