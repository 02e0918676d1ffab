"""The job records: one SQLite database in the service's state directory, one ``jobs`` table.

SQLite in WAL mode: a record written is on disk when the call returns (a killed service loses
no job it answered 201 for), readers never wait for the writer. One connection, used under a
lock by the service's threads (HTTP handlers and job runners).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import fields, replace
from pathlib import Path

from lipsync_ray.errors import ServiceError
from lipsync_ray.service.jobs import JobOptions, JobRecord, JobState

__all__ = ["JobStore"]

log = logging.getLogger(__name__)

DB_NAME = "jobs.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    avatar TEXT NOT NULL,
    state TEXT NOT NULL,
    options TEXT NOT NULL,          -- JobOptions as JSON
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    frames_done INTEGER NOT NULL DEFAULT 0,
    frames_total INTEGER,
    error TEXT,
    frames_reused INTEGER NOT NULL DEFAULT 0  -- found done in the work dir when the run began
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
"""

_COLUMNS = tuple(f.name for f in fields(JobRecord))


class JobStore:
    """The ``jobs`` table of ``<state_dir>/jobs.sqlite3``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / DB_NAME
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ServiceError(f"cannot open the job database: {exc}", path=self.path) from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, record: JobRecord) -> None:
        """Insert or replace ``record``."""
        row = _row(record)
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})",
                [row[c] for c in _COLUMNS],
            )

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            cur = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)
            )
            row = cur.fetchone()
        return None if row is None else _record(row)

    def list(self, limit: int = 100) -> list[JobRecord]:
        """The newest ``limit`` jobs, newest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY created_at DESC, rowid DESC "
                "LIMIT ?",
                (limit,),
            ).fetchall()
        return [_record(r) for r in rows]

    def unfinished(self) -> list[JobRecord]:
        """Jobs a restarted service must run again (queued or running), oldest first."""
        states = tuple(s.value for s in JobState if not s.finished)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE state IN "
                f"({', '.join('?' for _ in states)}) ORDER BY created_at, rowid",
                states,
            ).fetchall()
        return [_record(r) for r in rows]

    def update(self, record: JobRecord, **changes) -> JobRecord:
        """``record`` with ``changes``, stored and returned."""
        new = replace(record, **changes)
        self.put(new)
        return new


def _row(record: JobRecord) -> dict:
    return {
        **{c: getattr(record, c) for c in _COLUMNS},
        "state": record.state.value,
        "options": json.dumps(record.options.to_dict(), sort_keys=True),
    }


def _record(row: Iterable) -> JobRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["state"] = JobState(values["state"])
    values["options"] = JobOptions.from_dict(json.loads(values["options"]))
    return JobRecord(**values)
