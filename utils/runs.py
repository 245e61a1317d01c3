"""Run folders, manifests, atomic writes, hashing and seeding.

    folder = module_dir(args.run_id, "03_sft", args.output_dir)   # outputs/run_001/03_sft/
    with Manifest(folder, "03_sft", vars(args), cfg, seed=cfg["training"]["seed"]) as manifest:
        manifest.add_input("train", "datasets/finqa_processed/train.jsonl")
        ...
        manifest.add_output("final", folder / "ckpt_sft" / "final")
        manifest.metrics["exec_acc"] = 0.41

manifest.json is written when the block starts (status "running") and when it ends ("complete",
or "failed" with the error, which then propagates). Every write goes to a temporary file in the
same folder and is renamed over the target, so a reader never sees half a file. A folder has one
writer: entering the block takes lock_folder(folder), and a second live process stops in one line.
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from utils.cli import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
VERSION_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate")


# --- folders ---
def timestamp() -> str:
    """Now, as ISO-8601 UTC (e.g. 2025-11-25T02:40:00+00:00)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def validate_run_id(run_id: str) -> str:
    """Return run_id, or raise ValueError if it cannot safely name a folder."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise UsageError(f"--run_id {run_id!r}: use only letters, digits, '_' and '-' "
                         f"(it names the folder outputs/<run_id>/), e.g. run_001")
    return run_id


def module_dir(run_id: str, module: str, output_dir: str | Path | None = None,
               root: str | Path = "outputs") -> Path:
    """The module's output folder, created: output_dir if given, else <root>/<run_id>/<module>.

    root is relative to the working directory (scripts run from the repo root); pass
    cfg["paths"]["output_root"] to follow the config.
    """
    validate_run_id(run_id)
    folder = Path(output_dir) if output_dir else Path(root) / run_id / module
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- files ---
def _json_default(obj):
    """JSON for the few non-JSON values that reach manifests: paths, numpy/torch scalars, sets."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable: {obj!r}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text to path via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared and read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj) -> Path:
    """Write obj as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def atomic_write_jsonl(path: str | Path, rows) -> Path:
    """Write one JSON object per line, atomically."""
    lines = [json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows]
    return atomic_write_text(path, "".join(lines))


def _rerun(writer: str | None) -> str:
    """The fix for a broken file: rerun the script that writes it (named when the caller knows it)."""
    return f"rerun python {writer}" if writer else "rerun the script that writes it"


def _json_problem(error: Exception, line: bool = True) -> str:
    """What is wrong with a JSON text (with the line of a JSON error when `line`), for an error message;
    never the text itself: it may be huge."""
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno}: invalid JSON ({error.msg})" if line else f"invalid JSON ({error.msg})"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error.reason} at byte {error.start})"
    return "invalid JSON (nested too deeply to read)"  # RecursionError: json recurses per bracket


def read_json(path: str | Path, writer: str | None = None):
    """Read a JSON file; errors name the file, the line and the fix (rerun `writer`, the script that writes it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise UsageError(f"{path}: {_json_problem(err)}; the file may be truncated or corrupt, "
                         f"{_rerun(writer)}") from None


def read_jsonl_numbered(path: str | Path, writer: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) of each line of a JSONL file (blank lines skipped); errors name the file, the
    line and the fix (rerun `writer`, the script that writes it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with path.open("rb") as handle:  # decoded line by line, so a bad byte's error names its line
        for lineno, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
                if not text.strip():
                    continue
                row = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                raise UsageError(f"{path}: line {lineno}: {_json_problem(err, line=False)}; the file may be truncated "
                                 f"or corrupt, {_rerun(writer)}") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}; "
                                 f"{_rerun(writer)}")
            rows.append((lineno, row))
    return rows


def short_repr(value, limit: int = 60) -> str:
    """repr(value), cut: an error message must not repeat a huge field."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_records(path: str | Path, fields: dict, writer: str, required=None) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL file of records that `writer` wrote, checked: each has the
    `required` fields (default: all of `fields`) and each field of `fields` it has passes its check.
    fields: {name: (check, what it should be)}; other fields are kept (records are extensible).
    Errors name the file, the line and the field, with the fix (rerun `writer`)."""
    numbered = read_jsonl_numbered(path, writer)
    for lineno, row in numbered:
        if missing := [name for name in (fields if required is None else required) if name not in row]:
            raise UsageError(f"{path}: line {lineno} lacks {', '.join(missing)}; {_rerun(writer)}")
        for name, value in row.items():
            check, wanted = fields.get(name, (None, None))
            if check is not None and not check(value):
                raise UsageError(f"{path}: line {lineno}: {name} should be {wanted}, got {short_repr(value)}; "
                                 f"{_rerun(writer)}")
    return numbered


def read_jsonl(path: str | Path, writer: str | None = None) -> list[dict]:
    """Read a JSONL file (blank lines skipped); errors name the file, the line and the fix."""
    return [row for _, row in read_jsonl_numbered(path, writer)]


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks (model files do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder: over its files' relative paths and digests, sorted
    (so a checkpoint folder gets one stable fingerprint)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


# --- seeding ---
def seed_everything(seed: int) -> None:
    """Seed Python's random, numpy and torch (CPU and every GPU); torch imported only if installed."""
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)  # also seeds every CUDA device


# --- environment ---
def git_info(repo: str | Path = REPO_ROOT) -> dict:
    """{"commit": sha or None, "dirty": bool or None}; None when git or the checkout is missing."""
    def git(*cmd):
        try:
            done = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"commit": commit.strip() if commit else None,
            "dirty": bool(status.strip()) if status is not None else None}


def package_versions() -> dict:
    """Installed versions of python and the training stack (None when a package is absent)."""
    versions = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name() -> str:
    """'cuda:<GPU name>' (x N when several), 'mps' or 'cpu'. Looks only at a torch the module
    already imported: a module that never imported torch ran on the CPU."""
    torch = sys.modules.get("torch")
    if torch is None:
        return "cpu"
    try:
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            return f"cuda:{torch.cuda.get_device_name(0)}" + (f" x{count}" if count > 1 else "")
        if torch.backends.mps.is_available():
            return "mps"
    except Exception:  # a broken driver must not stop a run from recording itself
        pass
    return "cpu"


# --- one writer per folder ---
LOCK_FILE = ".writer.lock"
_held_locks: set[Path] = set()


def _lock_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs. On another host it cannot be told: taken as alive.

    A killed process stays in the process table as a zombie until its parent (for an orphan: init, on its
    own schedule) reaps it, and signalling a zombie succeeds: its state in /proc says it has ended."""
    if holder.get("host") != platform.node():
        return True
    try:
        pid = int(holder["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, KeyError, TypeError, ValueError):  # not ours to signal (it runs), or a malformed lock
        return True
    try:  # /proc/<pid>/stat: "pid (command) state ...", the command may hold spaces and parentheses
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS) or the process ended in between
        return not Path("/proc").is_dir()
    return state not in ("Z", "X")


def _release(path: Path) -> None:
    holder = _lock_holder(path)
    if holder and holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def lock_folder(folder: str | Path) -> None:
    """Make this process the one writer of `folder` until it exits (a no-op when it already is).

    A live process holding the folder stops this one with one line naming its process id and the
    folder (UsageError: exit 2, nothing written). A lock left by a process that died (killed or
    crashed: it never released it) is taken over, as a resumed stage takes over a killed one's
    folder. The lock file is complete whenever it exists: written aside, then hard-linked into place,
    which fails when another process got there first.
    """
    folder = Path(folder).resolve()
    if folder in _held_locks:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": platform.node(), "started_at": timestamp(), "command": shlex.join(sys.argv)}
    for _ in range(3):
        fd, staging = tempfile.mkstemp(dir=folder, prefix=".lock-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        try:
            os.link(staging, path)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None or _alive(holder):
                who = (f"process {holder['pid']} on {holder['host']} (since {holder['started_at']}: "
                       f"{holder['command'][:200]})" if holder else "another process")
                raise UsageError(f"{folder} is being written by {who}: wait for it to end, or write elsewhere "
                                 f"(another --run_id or --output_dir); if that process is gone, delete {path}")
            path.unlink(missing_ok=True)  # its writer died without releasing it
            continue
        finally:
            os.unlink(staging)
        _held_locks.add(folder)
        atexit.register(_release, path)
        return
    raise UsageError(f"{path}: could not take the lock (it changed hands three times); run again")


# --- manifest ---
class Manifest:
    """manifest.json of one module run; a context manager (see the module docstring)."""

    def __init__(self, folder: str | Path, module: str, args=None, config: dict | None = None,
                 seed: int | None = None, main_process: bool = True):
        self.main_process = main_process  # other processes of a multi-process run record nothing
        self.folder = Path(folder)
        self.path = self.folder / "manifest.json"
        self.module = module
        self.args = dict(vars(args) if isinstance(args, argparse.Namespace) else args or {})
        self.config = config
        if seed is None and config:
            seed = (config.get("training") or {}).get("seed")
        self.seed = seed
        self.inputs: dict[str, dict] = {}
        self.outputs: dict[str, str] = {}
        self.metrics: dict = {}
        self.status = "running"
        self.started_at = self.finished_at = self.duration_s = self.error = None
        self._t0 = None
        self._git = self._versions = None

    def add_input(self, name: str, path: str | Path) -> str:
        """Record an input file or folder with its sha256; returns the digest."""
        if not Path(path).exists():
            raise FileNotFoundError(f"input {name!r}: {path} does not exist")
        if not self.main_process:
            return ""
        digest = sha256_path(path)
        self.inputs[name] = {"path": str(path), "sha256": digest}
        return digest

    def add_output(self, name: str, path: str | Path) -> None:
        self.outputs[name] = str(path)

    def to_dict(self) -> dict:
        data = {
            "module": self.module,
            "status": self.status,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_s": self.duration_s,
            "command": shlex.join(sys.argv),
            "args": self.args,
            "config": self.config,
            "seed": self.seed,
            "git": self._git,
            "versions": self._versions,
            "device": device_name(),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": self.metrics,
        }
        if self.error is not None:
            data["error"] = self.error
        return data

    def write(self) -> Path:
        """Write manifest.json now (e.g. to record metrics mid-run)."""
        return atomic_write_json(self.path, self.to_dict()) if self.main_process else self.path

    def __enter__(self) -> "Manifest":
        if self.main_process:
            lock_folder(self.folder)
        self.started_at, self._t0 = timestamp(), time.monotonic()
        self._git, self._versions = git_info(), package_versions()
        self.status = "running"
        self.write()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.finished_at = timestamp()
        self.duration_s = round(time.monotonic() - self._t0, 3)
        if exc_type is None:
            self.status = "complete"
        else:
            self.status = "failed"
            self.error = f"{exc_type.__name__}: {exc}"
        self.write()
        return False  # never swallow the exception
