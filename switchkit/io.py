"""I/O helpers shared by every stage: the rule for existing outputs (:func:`check_output`), atomic writes, and
JSONL reading with line-numbered errors."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


class InputError(ValueError):
    """Bad user input (file, row, key); the message is one line naming where."""


class OutputExistsError(InputError):
    """An output would replace something the user did not ask to replace (``overwrite=true`` asks)."""


def check_writable(path: str | os.PathLike) -> None:
    """``path`` can be created or replaced: its nearest existing ancestor (and ``path`` itself, when it is an
    existing folder that work goes into) is a folder that accepts new files."""
    target = Path(path)
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{target}: cannot create it: {parent} is a file, not a folder")
    for folder in [parent] + ([target] if target.is_dir() else []):
        try:  # a real probe: permission bits say nothing about read-only mounts, and root ignores them
            fd, probe = tempfile.mkstemp(prefix=".switchkit-probe-", dir=folder)
        except OSError as exc:
            raise InputError(f"{target}: cannot write in {folder} ({exc.strerror or exc})") from None
        os.close(fd)
        os.unlink(probe)


def check_output(path: str | os.PathLike, *, overwrite: bool, ours: bool = False, folder: bool = True) -> bool:
    """The one rule for existing outputs: never replace what the user did not ask to replace.

    ``path`` is a command's output (a folder, or a file when ``folder`` is False). It may be created when it does
    not exist, continued when it is ``ours`` (the same job's resumable or finished work: same fingerprint), and
    replaced only with ``overwrite``; an empty folder counts as absent. Anything else is an
    :class:`OutputExistsError` naming it. Returns True when an existing output is to be replaced. Call it before
    loading anything.
    """
    target = Path(path)
    check_writable(target)
    if not target.exists():
        return False
    wrong_kind = target.is_dir() != folder
    if not wrong_kind and (ours or (folder and not any(target.iterdir()))):
        return False
    if overwrite:
        return True
    what = ("a folder, not a file" if target.is_dir() else "a file, not a folder") if wrong_kind else \
        ("not empty" if folder else "a file that this job did not write")
    raise OutputExistsError(f"{target} exists and is {what}: set overwrite=true to replace it, or write elsewhere")


def clear_output(path: str | os.PathLike) -> None:
    """Delete an output that :func:`check_output` allowed to be replaced."""
    target = Path(path)
    if target.is_dir() and not target.is_symlink():
        _rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    Works for files and for folders (a folder is swapped in with one rename). An existing non-empty folder is
    replaced only with ``overwrite`` (decided by :func:`check_output`); files are replaced (state files).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    inner = tmp / target.name
    try:
        yield inner
        if inner.is_dir() and target.exists():
            if not overwrite and (not target.is_dir() or any(target.iterdir())):
                raise OutputExistsError(f"{target} exists: set overwrite=true to replace it, or write elsewhere")
            os.replace(target, tmp / ".old")
        os.replace(inner, target)
    finally:
        _rmtree(tmp)


_HASHES: dict[tuple[str, int, int], str] = {}  # (file, size, mtime) -> hash: each file is read once per process


def path_hash(path: str | os.PathLike) -> str:
    """A content hash of a file, or of a folder's files (names and contents; hidden files and ``*.md`` are
    skipped), so fingerprints follow what a model, task or input holds, not where it lies."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix != ".md"
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        body = "\n".join(f"{p.relative_to(path).as_posix()} {path_hash(p)}" for p in files)
        return hashlib.sha256(body.encode()).hexdigest()[:16]
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()[:16]
    return _HASHES[key]


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write a JSON file atomically (pretty-printed, UTF-8)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write a JSONL file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; a malformed line or a missing field is an :class:`InputError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'file not found'}")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    raise InputError(f"{path}:{lineno}: missing field {key!r}")
            rows.append(row)
    return rows
