"""Scaffolding shared by the benchmark scripts (``scripts/bench_*.py``) and the reproduction driver.

Process-memory probes (Linux /proc, glibc): a benchmark runs each measured method in a fresh
subprocess with :data:`MALLOC_ENV` (a fixed 1 MiB mmap threshold, so freed tensors go back to the
OS and RSS follows live memory), takes a baseline with :func:`rss_bytes` after :func:`malloc_trim`,
resets the high-water mark with :func:`reset_peak`, and reads :func:`peak_bytes` at the end.

Method runs: :func:`run_workers` runs a script once per method in a fresh subprocess (``--worker
METHOD --result PATH``); :func:`methods_or_work` is the script's entry in either role (the worker
runs, the parent gets the ``--methods`` comma list, read by :func:`parse_methods`), with the
options :func:`add_method_arguments` adds; :func:`run_config` is the settings a benchmark records in
its JSON output, :func:`cpu_facts` the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# glibc raises its mmap threshold after large frees (up to 32 MiB), after which freed tensors stay
# in the heap and RSS stops tracking live memory; a fixed threshold disables that adjustment.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so a baseline holds only live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    return status_kb("VmRSS") * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (``/proc/self/clear_refs``); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kb("VmHWM") <= status_kb("VmRSS") + 1024
    except OSError:
        return False


def peak_bytes(reset_worked: bool) -> int:
    """VmHWM since :func:`reset_peak` when it worked, else the lifetime peak (ru_maxrss)."""
    if reset_worked:
        return status_kb("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")
"""/proc/cpuinfo flags of native bf16 units (without them bf16 autocast is emulated, and slow)."""


def cpu_facts() -> dict[str, Any]:
    """The CPU a figure comes from: ``model`` name, ``avx2`` / ``avx512f`` and its ``bf16_units``
    (:data:`BF16_FLAGS`; empty: no native bf16), from /proc/cpuinfo ("?" and no flags elsewhere)."""
    flags: set[str] = set()
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"model": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "bf16_units": sorted(f for f in BF16_FLAGS if f in flags)}


def add_method_arguments(parser: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    """``--methods`` (a comma list of ``methods``, default all) and the worker-only ``--worker`` /
    ``--result`` that :func:`run_workers` passes (hidden from ``--help``)."""
    parser.add_argument("--methods", default=",".join(methods), help=f"comma list of {tuple(methods)}")
    parser.add_argument("--worker", choices=methods, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def parse_methods(text: str, known: Sequence[str]) -> list[str]:
    """The methods of a ``--methods a,b`` comma list; exits naming the known ones on an unknown one."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = set(methods) - set(known)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {tuple(known)}")
    return methods


def methods_or_work(args: argparse.Namespace, worker: Callable[[argparse.Namespace], Any],
                    known: Sequence[str]) -> list[str]:
    """In a worker subprocess (``--worker`` given, as :func:`run_workers` does): run ``worker(args)``
    and exit; in the parent: the methods of ``args.methods`` (:func:`parse_methods`)."""
    if args.worker:
        worker(args)
        raise SystemExit(0)
    return parse_methods(args.methods, known)


def run_workers(script: str, methods: Sequence[str], argv: Sequence[str] | None = None, *,
                env: Mapping[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """Run ``script`` once per method, each in a fresh subprocess with the parent's arguments
    (``argv``, default ``sys.argv[1:]``) plus ``--worker METHOD --result PATH``; yields (method,
    PATH) after each run. PATH lies in a temporary directory that lives until the iteration ends
    (a worker may write more files next to it)."""
    forwarded = list(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            result = os.path.join(tmp, f"{method}.json")
            command = [sys.executable, os.path.abspath(script), *forwarded, "--worker", method, "--result", result]
            subprocess.run(command, check=True, env=None if env is None else dict(env))
            yield method, result


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """A benchmark's settings for its JSON output: its arguments, paths as strings, without the
    worker-only ``worker`` and ``result``."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "result")}
