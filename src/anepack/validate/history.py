"""Run history: every run record in one SQLite file, listed newest first and compared pairwise.

One ``runs`` table holds indexed summary columns (for listing without parsing records) and
the full record as JSON text. The schema version lives in SQLite's ``user_version``. Each
write is one transaction, so a process killed mid-write leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import platformdirs

from anepack.errors import AnepackError
from anepack.validate.record import RunRecord, checked, parse_created, summarize

SCHEMA_VERSION = 1
DB_ENV = "ANEPACK_DB"

_SCHEMA = (
    """CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created TEXT NOT NULL,
        created_utc TEXT NOT NULL,
        kind TEXT NOT NULL,
        model TEXT,
        fingerprint TEXT,
        recipe TEXT,
        passed INTEGER NOT NULL,
        forced INTEGER NOT NULL,
        min_layer_cosine REAL,
        min_logit_cosine REAL,
        min_top1 REAL,
        bits REAL,
        record TEXT NOT NULL
    )""",
    "CREATE INDEX runs_by_time ON runs (created_utc DESC, id DESC)",
    "CREATE INDEX runs_by_fingerprint ON runs (fingerprint)",
    "CREATE INDEX runs_by_recipe ON runs (recipe)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

_SUMMARY_COLUMNS = ("id", "created", "kind", "model", "fingerprint", "recipe", "passed", "forced",
                    "min_layer_cosine", "min_logit_cosine", "min_top1", "bits")


def default_db_path() -> Path:
    """``$ANEPACK_DB`` if set, else ``runs.sqlite`` in the user's data directory."""
    override = os.environ.get(DB_ENV)
    if override:
        return Path(override)
    return Path(platformdirs.user_data_dir("anepack")) / "runs.sqlite"


def _delta(a: float | None, b: float | None) -> dict[str, float | None]:
    return {"a": a, "b": b, "delta": None if a is None or b is None else b - a}


class RunStore:
    """The run history in one SQLite file; ``path=None`` means ``default_db_path()``.

    Reading a database that does not exist is an error (nothing has been recorded there);
    ``add`` creates the file and its directory.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else default_db_path()

    @contextmanager
    def _connect(self, create: bool) -> Iterator[sqlite3.Connection]:
        if not self.path.exists():
            if not create:
                raise AnepackError(self.path, "no run history here (the file does not exist)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"{self.path.resolve().as_uri()}?mode={'rwc' if create else 'ro'}"
        try:
            # isolation_level=None: transactions are explicit, see _transaction.
            connection = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
        except sqlite3.Error as err:
            raise AnepackError(self.path, f"cannot open the run history ({err})") from None
        try:
            if self._schema_version(connection, create) != SCHEMA_VERSION:
                with self._transaction(connection):
                    # Re-read under the write lock: another process may have created it meanwhile.
                    if self._schema_version(connection, create) == 0:
                        for statement in _SCHEMA:
                            connection.execute(statement)
            yield connection
        except sqlite3.DatabaseError as err:
            raise AnepackError(self.path, f"not a readable anepack run history ({err})") from None
        finally:
            connection.close()

    @staticmethod
    @contextmanager
    def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def _schema_version(self, connection: sqlite3.Connection, create: bool) -> int:
        """The schema version, 0 for a new empty file; raises unless it is ours or can become ours."""
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return version
        if version > SCHEMA_VERSION:
            raise AnepackError(self.path, f"run history schema {version} is newer than this anepack "
                                          f"understands ({SCHEMA_VERSION}); upgrade anepack")
        if version != 0 or connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise AnepackError(self.path, "an SQLite file that is not an anepack run history")
        if not create:
            raise AnepackError(self.path, "the run history is empty (no runs table yet)")
        return 0

    def add(self, record: RunRecord) -> int:
        """Store ``record`` (checked, numpy values made plain) and return its run id."""
        record = checked(record)
        summary = summarize(record)
        row = {
            "created": record["created"],
            "created_utc": parse_created(record["created"]).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "kind": record["kind"],
            "model": record["model"],
            "fingerprint": record["fingerprint"],
            "recipe": None if record["recipe"] is None else record["recipe"]["name"],
            "passed": int(record["passed"]),
            "forced": int(record["forced"]),
            **summary,
            "record": json.dumps(record),
        }
        columns = ", ".join(row)
        placeholders = ", ".join(f":{name}" for name in row)
        with self._connect(create=True) as connection, self._transaction(connection):
            cursor = connection.execute(f"INSERT INTO runs ({columns}) VALUES ({placeholders})", row)
            return int(cursor.lastrowid)

    def get(self, run_id: int) -> RunRecord:
        with self._connect(create=False) as connection:
            found = connection.execute("SELECT record FROM runs WHERE id = ?", (run_id,)).fetchone()
        if found is None:
            raise AnepackError(self.path, f"no run {run_id} in the run history")
        try:
            return json.loads(found[0])
        except json.JSONDecodeError:
            raise AnepackError(self.path, f"run {run_id} holds a damaged record") from None

    def list(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Summary rows, newest first: id, created, kind, model basename, recipe, verdict, headline numbers."""
        query = f"SELECT {', '.join(_SUMMARY_COLUMNS)} FROM runs ORDER BY created_utc DESC, id DESC"
        with self._connect(create=False) as connection:
            rows = connection.execute(query + " LIMIT ?", (-1 if limit is None else limit,)).fetchall()
        summaries = []
        for row in rows:
            summary = dict(zip(_SUMMARY_COLUMNS, row))
            summary["model"] = None if summary["model"] is None else Path(summary["model"]).name
            summary["passed"] = bool(summary["passed"])
            summary["forced"] = bool(summary["forced"])
            summaries.append(summary)
        return summaries

    def __len__(self) -> int:
        with self._connect(create=False) as connection:
            return int(connection.execute("SELECT count(*) FROM runs").fetchone()[0])

    def latest(self) -> int:
        """The id of the newest run."""
        newest = self.list(limit=1)
        if not newest:
            raise AnepackError(self.path, "the run history has no runs yet")
        return int(newest[0]["id"])

    def compare(self, a: int, b: int) -> dict[str, Any]:
        """Per-layer and per-prompt differences of run ``b`` from run ``a`` (``delta = b - a``).

        Layers match by index and prompts by name; one present in only one run gets ``None``
        on the other side and a ``None`` delta.
        """
        record_a, record_b = self.get(a), self.get(b)
        layers_a = {layer["layer"]: layer for layer in record_a["layers"]}
        layers_b = {layer["layer"]: layer for layer in record_b["layers"]}
        layers = []
        for index in sorted(layers_a.keys() | layers_b.keys()):
            left, right = layers_a.get(index, {}), layers_b.get(index, {})
            layers.append({"layer": index, **{key: _delta(left.get(key), right.get(key))
                                              for key in ("isolated_min", "cumulative_min")}})
        prompts_a = {p["name"]: p for p in record_a["prompts"]}
        prompts_b = {p["name"]: p for p in record_b["prompts"]}
        prompts = []
        for name in [*prompts_a, *(n for n in prompts_b if n not in prompts_a)]:
            left, right = prompts_a.get(name, {}), prompts_b.get(name, {})
            prompts.append({"name": name, **{key: _delta(left.get(key), right.get(key))
                                             for key in ("min_cosine", "mean_kl", "top1_agreement")}})
        summary_a, summary_b = summarize(record_a), summarize(record_b)
        return {
            "a": _run_header(a, record_a),
            "b": _run_header(b, record_b),
            # None when either run has no model fingerprint to compare.
            "same_model": (None if None in (record_a["fingerprint"], record_b["fingerprint"])
                           else record_a["fingerprint"] == record_b["fingerprint"]),
            "summary": {key: _delta(summary_a[key], summary_b[key]) for key in summary_a},
            "layers": layers,
            "prompts": prompts,
        }


def _run_header(run_id: int, record: RunRecord) -> dict[str, Any]:
    return {
        "id": run_id,
        "created": record["created"],
        "kind": record["kind"],
        "model": record["model"],
        "recipe": None if record["recipe"] is None else record["recipe"]["name"],
        "passed": record["passed"],
    }
