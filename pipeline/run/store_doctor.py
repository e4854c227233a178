"""`kip doctor` for the project's SQLite MLflow store: a store whose first creation was cut short.

MLflow creates a new SQLite store by running its ~60 schema migrations one after another, and they
are not one transaction. A full disk or a kill in the middle leaves a file at some revision between
none and MLflow's head; every later run then fails inside a migration that re-creates what exists
(`duplicate column name: step`, `table _alembic_tmp_runs already exists`, ...), for good.

A store left that way by its *first* creation holds no runs, so nothing is lost by setting it aside:
`kip doctor` moves it (and its SQLite journal) to `mlflow.db.half-created-<UTC time>` and the next
stage creates a fresh one. A store that holds runs is never touched: its schema is behind MLflow's
for another reason (an upgraded MLflow, an interrupted `mlflow db upgrade`), and the remedy is a backup
and `mlflow db upgrade`, which the line says. Reading is read-only (`mode=ro`) throughout.
"""
from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_SIDE_FILES = ("-journal", "-wal", "-shm")


@dataclass(frozen=True)
class StoreState:
    path: Path
    revision: str | None  # alembic_version, None if the table or its row is missing
    head: str
    runs: int
    leftovers: tuple[str, ...]  # alembic's temporary tables of a cut-short batch migration

    @property
    def healthy(self) -> bool:
        return self.revision == self.head and not self.leftovers

    def describe(self) -> str:
        where = f"schema revision {self.revision}" if self.revision else "no schema revision"
        extra = f", with alembic's temporary {', '.join(self.leftovers)}" if self.leftovers else ""
        return f"{self.path} is at {where}{extra} where this MLflow's is {self.head}, and holds {self.runs} runs"


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` tracking URI; None for any other store."""
    prefix = "sqlite:///"  # sqlite:///relative/path, sqlite:////absolute/path (SQLAlchemy's form)
    if not uri.startswith(prefix):
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


def inspect_store(path: Path) -> StoreState | None:
    """The store's schema state, read-only; None if there is no file or it is not an SQLite database."""
    if not path.is_file():
        return None
    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
        revision = None
        if "alembic_version" in tables:
            row = connection.execute("select version_num from alembic_version").fetchone()
            revision = row[0] if row else None
        runs = connection.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.DatabaseError:
        return None
    finally:
        connection.close()
    leftovers = tuple(sorted(t for t in tables if t.startswith("_alembic_tmp_")))
    return StoreState(path, revision, _get_latest_schema_revision(), int(runs), leftovers)


def problem(path: Path) -> str | None:
    """One clause for a stage's error line if the store is not at MLflow's schema; None if it is."""
    state = inspect_store(path)
    if state is None or state.healthy:
        return None
    if state.runs == 0:
        return f"{path} was left half-created by an interrupted first run (a full disk or a kill); run `kip doctor`"
    return f"{state.describe()}; back it up, then run `mlflow db upgrade sqlite:///{path}`"


def repair(path: Path) -> str | None:
    """Set aside a store its first creation left half-made; one line saying what was done, or None."""
    state = inspect_store(path)
    if state is None or state.healthy:
        return None
    if state.runs:
        return (f"{state.describe()}: left as it is (it holds runs); back it up, then run "
                f"`mlflow db upgrade sqlite:///{path}`")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = path.with_name(f"{path.name}.half-created-{stamp}")
    for suffix in _SIDE_FILES:  # a journal belongs to its database: keep them together
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.replace(side, Path(f"{backup}{suffix}"))
    os.replace(path, backup)
    return (f"{state.describe()}, left by an interrupted first run (a full disk or a kill): moved it to {backup.name}; "
            "the next stage creates a fresh store")
