"""Atomic artifact writing: a crash never leaves a half-written file, figure or directory behind."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any


def check_parent_exists(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail fast (before any long work) when ``path`` cannot be created.

    The directory itself and one missing parent level are created when written (so the configs'
    default ``outputs/<job>`` works in a fresh checkout); a deeper missing parent is almost always
    a typo and is reported, naming the parent.
    """
    path = Path(path).expanduser()
    if not path.parent.is_dir() and not path.parent.parent.is_dir():
        raise FileNotFoundError(f"{what} path {path}: parent directory {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Write to a temp file next to ``path`` and rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory that replaces ``path`` only if the block finishes.

    An existing ``path`` is kept until the new one is complete, then swapped out, so an
    interrupted run leaves the previous result intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Write a matplotlib figure to ``path`` as PNG (atomically) and close it, even on failure."""
    # matplotlib is an optional, heavy dependency: imported only when a figure is saved.
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def as_config(cls: type, value: Any, what: str) -> Any:
    """A ``cls`` dataclass from an instance, a dict of its fields (hparams of a checkpoint, a Python
    caller) or None (the defaults); anything else is a TypeError naming ``what``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"{what} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def config_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (for hparams, JSON and checkpoints loadable with weights_only)."""
    if not is_dataclass(config):
        raise TypeError(f"expected a dataclass, got {type(config).__name__}")
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


@contextlib.contextmanager
def directory_lock(root: str | os.PathLike) -> Iterator[None]:
    """One holder at a time of ``root/.lock`` (created with ``root``): one builder per cache entry,
    e.g. when several DDP ranks ask for the same organism or judge at once."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_root() -> Path:
    """Root of lit-safety's caches (organisms, judges, converted GGUF models): ``$LIT_SAFETY_CACHE``,
    else ``$XDG_CACHE_HOME/lit_safety`` (default ``~/.cache/lit_safety``)."""
    env = os.environ.get("LIT_SAFETY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "lit_safety"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
