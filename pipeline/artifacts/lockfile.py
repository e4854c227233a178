"""`kip doctor`: repair the DVC state a killed `dvc repro` leaves behind, so the next one resumes.

DVC (3.67.1, and its main branch as of late 2025) rewrites `dvc.lock` in place:
`dvc/utils/serialize/_common.py::_dump_data` opens it with mode "w+", which truncates it, then
serializes the YAML into it. A kill between the two (just after DVC prints "Updating lock file")
leaves an empty or cut-off `dvc.lock`, and every later DVC command stops with
"'./dvc.lock' validation failed". DVC's read/write lock `.dvc/tmp/rwlock` is rewritten the same way
(`dvc/rwlock.py::_edit_rwlock`), and an empty one stops every stage with "Unable to read
RWLock-file". Nothing in DVC's configuration makes these writes atomic, so we repair afterwards:

* a damaged `dvc.lock` (empty, not valid YAML, rejected by DVC's schema, or cut mid-line: DVC always
  ends it with a newline) is replaced by the version git has staged (DVC's `core.autostage` stages
  it after every successful command) or, failing that, committed, if that one is valid; otherwise it
  is removed. Either way it is a true record of some earlier state, and DVC re-checks every hash
  against the workspace: stages whose record is missing or stale simply run again (distill resuming
  from its checkpoint), and the outputs end byte-identical to an uninterrupted run.
* a `dvc.lock` that parses but that DVC's schema rejects was written whole: an edit (by hand, a
  merge, another tool), not a kill; the line says so and which field, and it is repaired alike.
  Whatever `dvc.lock` held is copied to `.dvc/tmp/dvc.lock.replaced-<UTC time>` first.
* a damaged `rwlock` is removed (it only lists processes that were running; there are none).

The repo lock `.dvc/tmp/lock` needs no help (an fcntl lock: the kernel releases it with the process),
nor do the entries a killed process left in a valid `rwlock`: DVC drops them itself, unless the system
has given the PID to a new process by then; we clear such stale entries too. We refuse to touch anything while a DVC process is running in the project. A `.git/index.lock` left
by a kill during DVC's autostage (`git add dvc.lock`) makes every later `dvc repro` fail at its end; we
report it but leave it, as only the user can know that no git command is running.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from pipeline.errors import UserError

LOCKFILE = "dvc.lock"


def find_root(start: Path) -> Path:
    """The DVC project containing `start`: the nearest directory at or above it with a `.dvc/`."""
    start = Path(start).resolve()
    for directory in (start, *start.parents):
        if (directory / ".dvc").is_dir():
            return directory
    raise UserError(f"{start} is not inside a DVC project (no .dvc directory here or above)")


def lockfile_problem(path: Path) -> str | None:
    """Why DVC would refuse `path` as its dvc.lock, or None if it is absent or loads and validates."""
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from dvc.utils.serialize import EncodingError
    from dvc.utils.strictyaml import YAMLSyntaxError, YAMLValidationError, load

    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if not text.strip():
        return "empty" if not text else "blank"
    if not text.endswith(b"\n"):  # DVC's YAML dump always ends with one; a write cut mid-line does not
        return "cut off mid-write"
    try:
        load(os.fspath(path), COMPILED_LOCKFILE_SCHEMA)
    except YAMLSyntaxError:
        return "cut off mid-write (not valid YAML)"
    except YAMLValidationError as err:
        return f"{EDITED}: DVC's schema rejects it ({_first_schema_error(err)})"
    except EncodingError:
        return "not UTF-8 text"
    return None


EDITED = "valid YAML"  # a killed write leaves a file cut short; one that parses was written whole, or edited


def _first_schema_error(err: Exception) -> str:
    """The first of voluptuous' complaints, one line, bounded."""
    cause = getattr(err, "__cause__", None)
    errors = getattr(cause, "errors", None) or [cause or err]
    return " ".join(str(errors[0]).split())[:160]


def rwlock_problem(path: Path) -> str | None:
    """Why DVC could not read its rwlock file at `path`, or None if it is absent or readable."""
    from dvc.rwlock import SCHEMA
    from voluptuous import Invalid

    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        SCHEMA(json.loads(text))
    except (ValueError, Invalid):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return "empty" if not text else "damaged"
    return None


def _holders(path: Path) -> tuple[list[str], list[str]]:
    """('pid N (cmd)' of the live, of the gone) processes listed in a readable rwlock file.

    A listed PID that now belongs to a process started after the file was last written was reused by
    the system: its DVC process is gone (DVC itself would wait on it forever).
    """
    import psutil

    try:
        mtime = path.stat().st_mtime
        lock = json.loads(path.read_bytes())
        infos = [*(lock.get("write") or {}).values(), *(i for v in (lock.get("read") or {}).values() for i in v)]
        listed = {int(info["pid"]): str(info.get("cmd", "")) for info in infos}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return [], []
    live, gone = [], []
    for pid, cmd in sorted(listed.items()):
        try:
            running = psutil.Process(pid).create_time() <= mtime + 1.0
        except psutil.Error:
            running = False
        (live if running else gone).append(f"pid {pid} ({cmd})")
    return live, gone


def _git_version(root: Path, spec: str) -> bytes | None:
    """`git show <spec>` run in `root` (e.g. ':./dvc.lock', the staged version), or None."""
    try:
        shown = subprocess.run(["git", "show", spec], cwd=root, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shown.stdout if shown.returncode == 0 else None


def _restore_from_git(root: Path, path: Path) -> str | None:
    """Replace `path` atomically by the first valid version git has (staged, then HEAD); its name."""
    for spec, name in ((f":./{path.name}", "the version staged in git"), (f"HEAD:./{path.name}", "the committed version")):
        content = _git_version(root, spec)
        if not content:
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            if lockfile_problem(tmp) is None:
                os.chmod(tmp, path.stat().st_mode & 0o777)
                os.replace(tmp, path)
                return name
        finally:
            tmp.unlink(missing_ok=True)
    return None


def _backup(path: Path) -> Path:
    """Copy `path` to `.dvc/tmp/<name>.replaced-<UTC time>` (git-ignored, so the checkout stays clean)
    before kip doctor replaces it."""
    import shutil
    import time

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = path.parent / ".dvc" / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    backup = folder / f"{path.name}.replaced-{stamp}"
    counter = 1
    while backup.exists():
        backup, counter = folder / f"{path.name}.replaced-{stamp}-{counter}", counter + 1
    shutil.copy2(path, backup)
    return backup


def _git_index_lock(root: Path) -> Path | None:
    """The git index's lock file of the repository holding `root`, if it exists."""
    try:
        shown = subprocess.run(["git", "rev-parse", "--git-path", "index.lock"], cwd=root, capture_output=True,
                               text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = root / shown.stdout.strip()
    return path if shown.returncode == 0 and shown.stdout.strip() and path.exists() else None


def repair(start: Path | str = ".") -> str:
    """Make the DVC project at or above `start` loadable again; one line saying what was done.

    Raises UserError if a DVC process is still working in the project.
    """
    from dvc.lock import LockError
    from dvc.repo import Repo

    root = find_root(Path(start))
    repo = Repo(os.fspath(root))
    try:
        tmp_dir = Path(repo.tmp_dir)
        rwlocks = [tmp_dir / "rwlock", tmp_dir / "exps" / "rwlock"]
        busy = [holder for path in rwlocks for holder in _holders(path)[0]]
        if busy:  # `dvc repro` releases the repo lock while a stage's command runs; its rwlock entries remain
            raise UserError(f"DVC is still running in {root}: {', '.join(busy)}; let it finish or stop it, then run kip doctor again")
        try:
            repo.lock.lock()
        except LockError:
            raise UserError(f"DVC is still running in {root} (it holds {tmp_dir / 'lock'}); "
                            "let it finish or stop it, then run kip doctor again") from None
        try:
            done = []
            for path in rwlocks:
                name = os.path.relpath(path, root)
                problem = rwlock_problem(path)
                if problem:
                    path.unlink()
                    done.append(f"removed the {problem} {name} (a DVC command was killed while writing it)")
                elif gone := _holders(path)[1]:
                    path.unlink()  # we hold the repo lock and nobody listed is running: every entry is stale
                    done.append(f"cleared {name} of killed DVC processes ({', '.join(gone)})")
            lock = root / LOCKFILE
            problem = lockfile_problem(lock)
            if problem:
                backup = _backup(lock) if lock.stat().st_size else None
                restored = _restore_from_git(root, lock)
                if restored is None:
                    lock.unlink()
                action = f"replaced it by {restored}" if restored else "removed it (git has no valid version of it)"
                cause = ("written whole, so edited by hand or by another tool, not a killed DVC" if problem.startswith(EDITED)
                         else "left by a DVC command killed while writing it")
                done.append(f"{LOCKFILE} was {problem}, {cause}: {action}"
                            + (f"; what it held is in {os.path.relpath(backup, root)}" if backup else ""))
            index_lock = _git_index_lock(root)
            if index_lock is not None:  # git's own lock: a git command may be running, so only say so
                done.append(f"{os.path.relpath(index_lock, root)} exists: a git command is running or was killed "
                            "(DVC's autostage runs `git add`); if none is running, delete it")
        finally:
            repo.lock.unlock()
    finally:
        repo.close()
    if not done:
        return f"nothing to repair in {root}: {LOCKFILE} and DVC's lock files are intact"
    return "; ".join(done) + "; run `dvc repro` to resume"


def restore_outputs(root: Path, stage: str) -> str | None:
    """Put back the outputs of `stage` that DVC deleted before running it, when the stage then failed.

    DVC removes a stage's outputs before its command runs, `cache: false` ones included, so a stage
    that fails (a wrong MLflow password, an unreachable store, a bad value) would otherwise leave
    them gone: the metrics a user committed, or ones not committed yet. What dvc.lock records for
    each missing output is looked up by md5 in DVC's cache (cached outputs; the run cache also keeps
    uncached ones), then in git (staged, then committed), and copied back atomically only if the md5
    matches. Returns one clause for the stage's error line, or None if nothing was missing.
    """
    import hashlib

    import yaml

    lock = Path(root) / LOCKFILE
    try:
        outs = (yaml.safe_load(lock.read_text()) or {})["stages"][stage]["outs"]
        recorded = {str(out["path"]): str(out["md5"]) for out in outs if "md5" in out}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    missing = {path: md5 for path, md5 in recorded.items() if not (Path(root) / path).exists()}
    if not missing:
        return None
    cache = _cache_dir(Path(root))
    restored, lost = [], []
    for path, md5 in sorted(missing.items()):
        candidates = [cache / md5[:2] / md5[2:]] if cache else []
        content = None
        for candidate in candidates:
            if candidate.is_file() and hashlib.md5(candidate.read_bytes()).hexdigest() == md5:
                content = candidate.read_bytes()
        for spec in (f":./{path}", f"HEAD:./{path}"):
            if content is None:
                blob = _git_version(Path(root), spec)
                if blob is not None and hashlib.md5(blob).hexdigest() == md5:
                    content = blob
        if content is None:
            lost.append(path)
            continue
        target = Path(root) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(tmp_name, target)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        restored.append(path)
    said = []
    if restored:
        said.append(f"put back {', '.join(restored)} (deleted by DVC before the stage ran) as {LOCKFILE} records")
    if lost:
        said.append(f"{', '.join(lost)} deleted by DVC and held neither by DVC's cache nor by git: "
                    "fix the error and run `dvc repro` to write them again")
    return "; ".join(said)


def _cache_dir(root: Path) -> Path | None:
    """DVC's md5-addressed file cache of the project (`.dvc/cache/files/md5` unless configured)."""
    try:
        from dvc.repo import Repo

        with Repo(os.fspath(root)) as repo:
            return Path(repo.cache.local.path)
    except Exception:  # a project DVC cannot open: git is still worth a try
        return None
