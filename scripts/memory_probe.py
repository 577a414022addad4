"""Process-memory probes shared by the benchmark scripts (Linux /proc, glibc).

Benchmarks run each measured method in a fresh subprocess with ``MALLOC_ENV`` (a fixed 1 MiB mmap
threshold, so freed tensors go back to the OS and RSS follows live memory), take a baseline with
:func:`rss_bytes` after :func:`malloc_trim`, reset the high-water mark with :func:`reset_peak`, and
read :func:`peak_bytes` at the end.
"""

from __future__ import annotations

import resource

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
