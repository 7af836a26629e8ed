"""Run history: SQLite round trip, newest-first listing, compare deltas, damaged files, CLI JSON."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from anepack.cli import main
from anepack.errors import AnepackError
from anepack.validate.history import RunStore
from anepack.validate.record import new_record


def layer(index: int, isolated: float, cumulative: float, passed: bool = True) -> dict:
    return {"layer": index, "isolated_min": isolated, "isolated_mean": isolated + 0.001,
            "cumulative_min": cumulative, "cumulative_mean": cumulative + 0.001, "passed": passed, "blame": []}


def prompt(name: str, min_cosine: float, mean_kl: float, top1: float) -> dict:
    return {"name": name, "tokens": 3, "min_cosine": min_cosine, "mean_cosine": min_cosine + 0.001,
            "max_kl": 2 * mean_kl, "mean_kl": mean_kl, "top1_agreement": top1, "first_failing_position": None,
            "passed": True, "cosine_per_position": [1.0, min_cosine, 1.0], "kl_per_position": [0.0, mean_kl, 0.0]}


def make_record(created: str, layers: list[dict], prompts: list[dict], recipe: str, shipped_bits: float) -> dict:
    record = new_record("gate")
    record.update(created=created, model="/models/gemma-3-270m.gguf", fingerprint="f" * 32,
                  recipe={"name": recipe, "toml": f'name = "{recipe}"\n'}, layers=layers, prompts=prompts,
                  bits={"layers_average": shipped_bits - 0.5, "shipped_average": shipped_bits}, passed=True)
    return record


@pytest.fixture
def three_runs(tmp_path) -> tuple[RunStore, list[dict]]:
    """Ids 1, 2, 3 created on Jan 1, Jan 3 and Jan 2 (given in UTC+2), so newest first is 2, 3, 1."""
    records = [
        make_record("2026-01-01T10:00:00Z", [layer(0, 0.990, 0.985), layer(1, 0.950, 0.940, passed=False)],
                    [prompt("prose", 0.991, 0.020, 0.95), prompt("code", 0.980, 0.050, 0.90)], "int8-tensor", 8.0),
        make_record("2026-01-03T09:00:00Z", [layer(0, 0.995, 0.993), layer(1, 0.990, 0.980), layer(2, 0.992, 0.975)],
                    [prompt("code", 0.990, 0.030, 0.93), prompt("list", 0.997, 0.010, 1.00)], "lut4-grouped", 4.5),
        make_record("2026-01-02T12:00:00+02:00", [layer(0, 0.999, 0.999)], [], "lut6", 6.2),
    ]
    store = RunStore(tmp_path / "history" / "runs.sqlite")
    assert [store.add(r) for r in records] == [1, 2, 3]
    return store, records


def test_round_trip_lists_newest_first(three_runs):
    store, records = three_runs
    for run_id, record in enumerate(records, start=1):
        assert store.get(run_id) == record
    rows = store.list()
    assert [row["id"] for row in rows] == [2, 3, 1]
    assert [row["id"] for row in store.list(limit=2)] == [2, 3]
    assert len(store) == 3
    newest = rows[0]
    assert (newest["model"], newest["recipe"], newest["kind"], newest["passed"]) == \
        ("gemma-3-270m.gguf", "lut4-grouped", "gate", True)
    assert newest["min_layer_cosine"] == 0.975  # lowest of every isolated and cumulative minimum
    assert newest["min_logit_cosine"] == 0.990 and newest["min_top1"] == 0.93 and newest["bits"] == 4.5
    assert rows[1]["min_logit_cosine"] is None  # a run without prompts
    assert store.latest() == 2


def test_compare_deltas_are_b_minus_a(three_runs):
    store, _ = three_runs
    diff = store.compare(1, 2)
    assert (diff["a"]["id"], diff["b"]["id"], diff["same_model"]) == (1, 2, True)
    layers = {row["layer"]: row for row in diff["layers"]}
    assert sorted(layers) == [0, 1, 2]
    assert layers[0]["isolated_min"]["delta"] == pytest.approx(0.995 - 0.990)
    assert layers[1]["cumulative_min"]["delta"] == pytest.approx(0.980 - 0.940)
    assert layers[2]["isolated_min"] == {"a": None, "b": 0.992, "delta": None}
    prompts = {row["name"]: row for row in diff["prompts"]}
    assert list(prompts) == ["prose", "code", "list"]
    assert prompts["code"]["min_cosine"]["delta"] == pytest.approx(0.990 - 0.980)
    assert prompts["code"]["mean_kl"]["delta"] == pytest.approx(0.030 - 0.050)
    assert prompts["code"]["top1_agreement"]["delta"] == pytest.approx(0.93 - 0.90)
    assert prompts["prose"]["min_cosine"]["b"] is None and prompts["list"]["mean_kl"]["a"] is None
    assert diff["summary"]["min_layer_cosine"]["delta"] == pytest.approx(0.975 - 0.940)
    assert diff["summary"]["bits"]["delta"] == pytest.approx(4.5 - 8.0)


def test_numpy_values_are_stored_as_plain_numbers(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    record = new_record("layers")
    record["layers"].append(layer(0, np.float32(0.5), np.float64(0.25)))
    record["timings"]["total_s"] = np.float64(1.5)
    run_id = store.add(record)
    stored = store.get(run_id)
    assert stored["layers"][0]["isolated_min"] == float(np.float32(0.5))
    assert stored["timings"]["total_s"] == 1.5
    assert store.list()[0]["min_layer_cosine"] == 0.25
    record["notes"].append(object())  # not JSON: rejected before anything is written
    with pytest.raises(TypeError):
        store.add(record)
    assert len(store) == 1


def test_env_var_sets_the_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ANEPACK_DB", str(tmp_path / "from-env.sqlite"))
    assert RunStore().path == tmp_path / "from-env.sqlite"


def one_line_error(excinfo: pytest.ExceptionInfo, path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_missing_corrupt_and_foreign_databases_are_one_line_errors(tmp_path):
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(AnepackError) as excinfo:
        RunStore(missing).list()
    assert "does not exist" in one_line_error(excinfo, missing)
    assert not missing.exists()

    corrupt = tmp_path / "corrupt.sqlite"
    garbage = np.random.default_rng(0).bytes(8192)
    corrupt.write_bytes(garbage)
    for action in (lambda s: s.list(), lambda s: s.get(1), lambda s: s.add(new_record("golden"))):
        with pytest.raises(AnepackError) as excinfo:
            action(RunStore(corrupt))
        assert "not a readable anepack run history" in one_line_error(excinfo, corrupt)
    assert corrupt.read_bytes() == garbage

    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    connection.close()
    with pytest.raises(AnepackError) as excinfo:
        RunStore(foreign).add(new_record("golden"))
    assert "not an anepack run history" in one_line_error(excinfo, foreign)

    store = RunStore(tmp_path / "runs.sqlite")
    store.add(new_record("golden"))
    with pytest.raises(AnepackError, match="no run 7 in the run history"):
        store.get(7)


def test_cli_runs_and_compare_print_json_with_ids(three_runs, tmp_path, monkeypatch):
    store, _ = three_runs
    monkeypatch.setenv("ANEPACK_DB", str(tmp_path / "elsewhere.sqlite"))  # --db must win over the env var
    runner = CliRunner()
    listed = runner.invoke(main, ["runs", "--db", str(store.path), "--json"])
    assert listed.exit_code == 0, listed.output
    document = json.loads(listed.stdout)
    assert [row["id"] for row in document["runs"]] == [2, 3, 1] and document["total"] == 3

    compared = runner.invoke(main, ["compare", "1", "latest", "--db", str(store.path), "--json"])
    assert compared.exit_code == 0, compared.output
    document = json.loads(compared.stdout)
    assert (document["a"]["id"], document["b"]["id"]) == (1, 2)
    assert document["layers"][1]["isolated_min"]["delta"] == pytest.approx(0.990 - 0.950)

    table = runner.invoke(main, ["compare", "1", "3", "--db", str(store.path)])
    assert table.exit_code == 0 and "per layer" in table.stdout

    empty = runner.invoke(main, ["runs", "--json"])  # the env var's file does not exist yet
    assert empty.exit_code == 0 and json.loads(empty.stdout)["runs"] == []
    missing = runner.invoke(main, ["compare", "1", "2"])  # but a run that is not there is an error
    assert missing.exit_code == 2
    assert missing.stderr.strip().splitlines() == [
        f"anepack: error: {tmp_path / 'elsewhere.sqlite'}: no run history here (the file does not exist)"]
