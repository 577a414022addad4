"""Atomic artifact writing: a crash never leaves a half-written file, figure or directory behind.

- :func:`atomic_file` / :func:`atomic_dir`: one file or directory, written under a temp name and
  swapped in with one rename (a directory with one ``renameat2(RENAME_EXCHANGE)`` where the file
  system has it). Published files get the umask's modes, not the temp file's private 0600/0700.
- :func:`publish`: a run's whole result (``model/``, mask, hparams, summary, ...) as one unit: staged
  in ``output_dir/.result-<pid>-<random>/`` with a ``manifest.json`` (SHA-256 of every file) written
  last, then published by replacing one symlink, ``output_dir/.result``. The names readers use
  (``output_dir/model``, ``output_dir/summary.json``, ...) are symlinks into ``.result``, so a reader
  sees the previous result or the new one, complete, whenever the writer dies.
- :func:`claim_output_dir`: what a job does before any work: the location is writable, no other run
  uses it (a lock naming its holder), what killed runs left is cleaned up, and a finished result of
  another run is not replaced unless asked to.

Temp names carry the writer's PID (``.<name>.<pid>.<random>.tmp``, ``.<name>.old-<pid>``,
``.result-<pid>-<random>``), so :func:`recover_interrupted` can tell leftovers of dead processes from
work in progress.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class OutputDirError(RuntimeError):
    """An output directory that a run must not write into (in use by another run, or holding a
    finished result that it would replace); the message says what to do instead."""


def check_parent_exists(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail fast (before any long work) when ``path`` cannot be created.

    The directory itself and one missing parent level are created when written (so the configs'
    default ``outputs/<job>`` works in a fresh checkout); a deeper missing parent is almost always
    a typo and is reported, naming the parent. The nearest existing directory must take new files:
    a probe file is created and removed there (a read-only file system or a directory without write
    permission is a PermissionError naming both, not an OSError after training).
    """
    path = Path(path).expanduser()
    if not path.parent.is_dir() and not path.parent.parent.is_dir():
        raise FileNotFoundError(f"{what} path {path}: parent directory {path.parent} does not exist")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} exists and is not a directory")
    where = next(p for p in (path, path.parent, path.parent.parent) if p.is_dir())
    try:
        fd, probe = tempfile.mkstemp(prefix=f".write-probe.{os.getpid()}.", suffix=".tmp", dir=where)
    except OSError as err:
        raise PermissionError(f"{what} {path}: cannot create files in {where} ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Write to a temp file next to ``path`` and rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would stay on the published file
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

    An existing ``path`` is kept until the new one is complete, then the two are exchanged in one
    step (``renameat2(RENAME_EXCHANGE)``; where the file system lacks it, two renames whose
    interruption the next writer repairs), so an interrupted run leaves the previous result intact.
    What dead writers of ``path`` left beside it is restored or removed first (logged).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(path.parent, name=path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp's 0700 (and 0600 of writers using temp files) would stay on what is published
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, path)


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes the umask gives new files: directories (and
    files with an owner-execute bit) 0777 & ~umask, other files 0666 & ~umask; symlinks untouched."""
    umask = current_umask()

    def fix(path: str, directory: bool) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return
        wanted = 0o777 & ~umask if directory or st.st_mode & stat.S_IXUSR else 0o666 & ~umask
        if stat.S_IMODE(st.st_mode) != wanted:
            os.chmod(path, wanted)

    fix(str(root), True)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            fix(os.path.join(parent, name), True)
        for name in files:
            fix(os.path.join(parent, name), False)


def _swap_in(new: Path, path: Path) -> None:
    """Put ``new`` (a directory, file or symlink) at ``path``: one step where ``path`` does not exist,
    or is a file or symlink that ``new`` (not a directory) replaces, or the file system can exchange
    the two; else two renames (``path`` to ``.<name>.old-<pid>``, then ``new`` to ``path``)."""
    if not os.path.lexists(path) or (not new.is_dir() or new.is_symlink()) and not _real_dir(path):
        os.replace(new, path)
        return
    if _exchange(new, path):  # new is at path now, and the old entry at new's name
        _remove(new)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(new, path)
    _remove(old)


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    if _real_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    with contextlib.suppress(OSError, AttributeError):
        function = ctypes.CDLL(None, use_errno=True).renameat2
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return function
    return None


_RENAMEAT2 = _renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries ``a`` and ``b`` atomically; False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def current_umask() -> int:
    """The process umask (read from /proc where it can be, without changing it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as handle:
            return int(next(line for line in handle if line.startswith("Umask:")).split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<rand>[^.]+)\.tmp$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")
_UNIT = re.compile(r"^\.result-(?P<pid>\d+)-[^.]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(directory: str | os.PathLike, name: str | None = None) -> list[str]:
    """Repair what writers killed mid-write left in ``directory`` (only around ``name`` if given):
    a ``.<name>.old-<pid>`` of a dead process is put back as ``<name>`` when ``<name>`` is missing (a
    swap cut between its two renames) and removed otherwise; its ``.<name>.<pid>.<random>.tmp`` files
    and directories are removed. Entries of live processes are left alone. Returns the messages,
    each also logged as a warning."""
    directory = Path(directory)
    messages = []
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return messages
    for entry in entries:
        old = _OLD.match(entry)
        if old and (name is None or old["name"] == name) and not _alive(int(old["pid"])):
            target = directory / old["name"]
            if not os.path.lexists(target):
                os.replace(directory / entry, target)
                messages.append(f"{target}: restored the previous version from {directory / entry} (left by process "
                                f"{old['pid']}, which died while replacing it)")
            else:
                _remove(directory / entry)
                messages.append(f"{directory}: removed {directory / entry} (the replaced version of {target}; "
                                f"process {old['pid']} died before removing it)")
    for entry in entries:
        tmp = _TMP.match(entry)
        if tmp and (name is None or tmp["name"] == name) and not _alive(int(tmp["pid"])) \
                and os.path.lexists(directory / entry):
            _remove(directory / entry)
            messages.append(f"{directory}: removed {directory / entry} (unfinished write of process {tmp['pid']}, "
                            "which died)")
    for message in messages:
        log.warning(message)
    return messages


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
    if isinstance(value, dict):
        value = cls(**value)
    if not isinstance(value, cls):
        raise TypeError(f"{what} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    # jsonargparse (4.53) hands a nested dataclass's ``str | None`` option given as ``null`` on the
    # command line (``--data.suite.task_data null``) over as the string "None": that means None.
    nulls = {f.name: None for f in fields(value) if getattr(value, f.name) == "None" and "None" in str(f.type)}
    return replace(value, **nulls) if nulls else value


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


LOCK_NAME = ".lit-safety.lock"
RESULT = ".result"
MANIFEST = "manifest.json"


class DirectoryLock:
    """This process's hold on ``root/.lit-safety.lock`` (see :func:`try_lock`)."""

    _held: dict[str, list] = {}  # realpath -> [open handle, count]: one flock per process, re-entrant
    _guard = threading.Lock()

    def __init__(self, key: str) -> None:
        self.key = key
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        with self._guard:
            entry = self._held.get(self.key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._held[self.key]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                entry[0].close()

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def try_lock(root: str | os.PathLike, what: str = "output_dir") -> DirectoryLock:
    """Hold ``root/.lit-safety.lock`` (creating ``root``) without waiting: another process that holds
    it is an :class:`OutputDirError` naming the directory and that process's PID. Re-entrant within a
    process (a run that holds it can publish); released by :meth:`DirectoryLock.release` or when the
    process ends, however it ends."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(root)
    with DirectoryLock._guard:
        entry = DirectoryLock._held.get(key)
        if entry is not None:
            entry[1] += 1
            return DirectoryLock(key)
        handle = open(os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666), "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputDirError(f"{what} {root} is in use by another lit-safety run (process {holder}, lock "
                                 f"{root / LOCK_NAME}); wait for it to finish or choose another {what}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        DirectoryLock._held[key] = [handle, 1]
        return DirectoryLock(key)


def claim_output_dir(path: str | os.PathLike, *, job: str, overwrite: bool = False, artifacts: Iterable[str] = (),
                     replaces: Iterable[str | None] = (), what: str = "output_dir",
                     advice: str = "") -> DirectoryLock:
    """Everything a job checks about its output directory before any work, in one call: the location
    is writable (:func:`check_parent_exists`), no other run uses it (:func:`try_lock`, held until
    released), what killed runs left is repaired (:func:`recover_interrupted` and stale result
    units), and a finished result already there (:func:`published_result`) is replaced only with
    ``overwrite`` or when its job is one of ``replaces`` (None: output of an earlier version);
    ``advice`` ends that error (what to do instead). Returns the held lock."""
    path = check_parent_exists(path, what)
    lock = try_lock(path, what)
    try:
        recover_results(path)
        found = published_result(path, artifacts=artifacts)
        if found is not None and not overwrite and found["job"] not in set(replaces):
            when = f", {found['created']}" if found.get("created") else ""
            origin = f"{found['job']}{when}" if found["job"] else "written by an earlier lit-safety version"
            raise OutputDirError(f"{what} {path} already holds the finished result of another run ({origin}: "
                                 f"{', '.join(found['files'])}); nothing was written. "
                                 f"{advice or f'Choose another {what}, or remove that result first.'}")
    except BaseException:
        lock.release()
        raise
    return lock


def _current_unit(out: Path) -> Path | None:
    pointer = out / RESULT
    if not pointer.is_symlink():
        return None
    target = out / os.readlink(pointer)
    return target if target.is_dir() else None


def published_result(out_dir: str | os.PathLike, artifacts: Iterable[str] = ()) -> dict[str, Any] | None:
    """The finished result in ``out_dir``: its manifest (``job``, ``created``, ``files``: the published
    top-level names) when one was published, else, for output of an earlier lit-safety version
    (plain files, no manifest), ``{"job": None, "files": [...]}`` listing which of ``artifacts`` are
    there; None when there is none."""
    out = Path(out_dir)
    unit = _current_unit(out)
    if unit is not None and (unit / MANIFEST).is_file():
        manifest = json.loads((unit / MANIFEST).read_text())
        names = sorted({name.split("/")[0] for name in manifest["files"]})
        return {"job": manifest.get("job"), "created": manifest.get("created"), "files": names}
    legacy = sorted(name for name in set(artifacts) if os.path.lexists(out / name) and not (out / name).is_symlink())
    return {"job": None, "files": legacy} if legacy else None


def recover_results(out_dir: str | os.PathLike) -> list[str]:
    """:func:`recover_interrupted` for ``out_dir``, plus result units of dead processes that never
    got published (or were replaced and not removed yet) and links to names the published result
    does not have. Returns the messages (also logged)."""
    out = Path(out_dir)
    messages = recover_interrupted(out)
    current = _current_unit(out)
    removed = []
    for entry in sorted(os.listdir(out)) if out.is_dir() else []:
        unit = _UNIT.match(entry)
        path = out / entry
        if unit and (current is None or path.name != current.name) and not _alive(int(unit["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"{out}: removed {path} (a result of process {unit['pid']} that is not the published one: "
                           "unfinished when the process died, or replaced)")
        elif path.is_symlink() and os.readlink(path).startswith(f"{RESULT}/") and not path.exists():
            os.unlink(path)
    for message in removed:
        log.warning(message)
    return messages + removed


def _manifest(unit: Path, job: str) -> dict[str, Any]:
    """SHA-256 and size of every file under ``unit`` (each fsynced), for its ``manifest.json``."""
    files = {}
    for root, dirs, names in os.walk(unit):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            relative = path.relative_to(unit).as_posix()
            if relative == MANIFEST:
                continue
            files[relative] = {"sha256": file_sha256(path, fsync=True), "bytes": path.stat().st_size}
    return {"job": job, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), "files": files}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst``: the same files as ``src`` (hard links where the file system allows, else copies)."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if _real_dir(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(str(src), str(dst))


def _point_link(out: Path, name: str) -> None:
    """Make ``out/name`` the symlink ``.result/name``: created where missing, swapped in (one
    exchange) for a plain file or directory of an earlier version, whose content must already be in
    the published unit."""
    path = out / name
    target = f"{RESULT}/{name}"
    if path.is_symlink() and os.readlink(path) == target:
        return
    tmp = out / f".{name}.{os.getpid()}.link.tmp"
    _remove(tmp)
    os.symlink(target, tmp)
    _swap_in(tmp, path)


def _adopt_legacy(out: Path, names: list[str], job: str | None) -> None:
    """Plain files and directories that an earlier lit-safety version wrote as ``out/<name>`` become
    links into a published unit holding the same files, one name at a time: a reader sees the same
    content throughout. Afterwards the previous result is one unit that the next publish replaces whole."""
    unit = _current_unit(out)
    fresh = unit is None
    if fresh:
        unit = Path(tempfile.mkdtemp(prefix=f"{RESULT}-{os.getpid()}-", dir=out))
        os.chmod(unit, 0o777 & ~current_umask())
    old_manifest = json.loads((unit / MANIFEST).read_text()) if (unit / MANIFEST).is_file() else {}
    for name in names:
        _remove(unit / name)
        _link_tree(out / name, unit / name)
    manifest = _manifest(unit, old_manifest.get("job", job))
    with atomic_file(unit / MANIFEST) as handle:
        json.dump(manifest, handle, indent=2)
    if fresh:
        _set_pointer(out, unit)
    for name in names:
        _point_link(out, name)


def _set_pointer(out: Path, unit: Path) -> None:
    tmp = out / f"{RESULT}.{os.getpid()}.link.tmp"
    _remove(tmp)
    os.symlink(unit.name, tmp)
    os.replace(tmp, out / RESULT)  # the one step that publishes
    _fsync_dir(out)


@contextlib.contextmanager
def publish(out_dir: str | os.PathLike, *, job: str, artifacts: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a staging directory inside ``out_dir``; when the block finishes, everything in it becomes
    ``out_dir``'s result in one step, replacing the previous result as a whole (names it does not
    have disappear with it). ``artifacts``: the names this job can write, so that plain files of an
    earlier version with those names count as the previous result too. An exception in the block
    leaves the previous result as it was. Holds ``out_dir``'s lock (:func:`try_lock`) meanwhile."""
    out = Path(out_dir)
    with try_lock(out):
        recover_results(out)
        stage = Path(tempfile.mkdtemp(prefix=f"{RESULT}-{os.getpid()}-", dir=out))
        try:
            yield stage
            apply_umask(stage)
            manifest = _manifest(stage, job)
            with atomic_file(stage / MANIFEST) as handle:  # last: a unit with a manifest is complete
                json.dump(manifest, handle, indent=2)
            _fsync_dir(stage)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        names = sorted(name for name in os.listdir(stage) if name != MANIFEST)
        legacy = sorted(name for name in set(names) | set(artifacts)
                        if os.path.lexists(out / name) and not (out / name).is_symlink())
        if legacy:
            _adopt_legacy(out, legacy, None)
        previous = _current_unit(out)
        for name in names:  # new names: links that show nothing until the pointer moves
            _point_link(out, name)
        _set_pointer(out, stage)
        if previous is not None and previous != stage:
            shutil.rmtree(previous, ignore_errors=True)
        recover_results(out)  # links to names the new result does not have


def verify_published(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Check that what ``out_dir`` shows is its published result, file by file against the manifest's
    SHA-256 (through the names readers use: ``out_dir/model/...``); returns the manifest. Any
    difference is an :class:`OutputDirError` listing the files."""
    out = Path(out_dir)
    unit = _current_unit(out)
    if unit is None or not (unit / MANIFEST).is_file():
        raise OutputDirError(f"{out} has no published result ({RESULT} -> a directory with {MANIFEST})")
    manifest = json.loads((unit / MANIFEST).read_text())
    problems = []
    for name in sorted({name.split("/")[0] for name in manifest["files"]}):
        if not (out / name).is_symlink() or os.readlink(out / name) != f"{RESULT}/{name}":
            problems.append(f"{name} is not the link {RESULT}/{name}")
    for relative, entry in manifest["files"].items():
        path = out / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{relative} differs from the manifest")
    if problems:
        raise OutputDirError(f"{out}: the result does not match its manifest {unit / MANIFEST}: " + "; ".join(problems))
    return manifest


def cache_root() -> Path:
    """Root of lit-safety's caches (organisms, judges, converted GGUF models): ``$LIT_SAFETY_CACHE``,
    else ``$XDG_CACHE_HOME/lit_safety`` (default ``~/.cache/lit_safety``)."""
    env = os.environ.get("LIT_SAFETY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "lit_safety"


def file_sha256(path: str | os.PathLike, *, fsync: bool = False) -> str:
    """SHA-256 of a file's bytes (hex); ``fsync``: also flush the file to disk while it is open."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest()
