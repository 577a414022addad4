"""Shared fixtures. The organism cache points at a per-session temp dir, so tests never touch
(or depend on) a user's cache; tiny organisms (":tiny" preset) build in seconds."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def _organism_cache(tmp_path_factory):
    old = os.environ.get("LIT_SAFETY_CACHE")
    os.environ["LIT_SAFETY_CACHE"] = str(tmp_path_factory.mktemp("lit_safety_cache"))
    yield
    if old is None:
        os.environ.pop("LIT_SAFETY_CACHE", None)
    else:
        os.environ["LIT_SAFETY_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dense_aligned(_organism_cache):
    from lit_safety.organism import organism_path

    return organism_path("organism-dense-aligned:tiny")


@pytest.fixture(scope="session")
def tiny_moe_aligned(_organism_cache):
    from lit_safety.organism import organism_path

    return organism_path("organism-moe-aligned:tiny")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module of tiny-tensor tests (use with
    ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``): on a busy 2-core machine the
    OpenMP barriers of two threads made tiny forward/backward passes 100x slower."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def shared_data(relative: str) -> Path:
    """Path under ../shared/data, or skip the test when the checkout has none beside it."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{relative} (public benchmark data, not part of the repo)")
    return path


@pytest.fixture
def synthetic_shared_data(tmp_path):
    """A stand-in for ../shared/data under tmp_path, for CI twins of the tests that need the real
    benchmark files: ``write(relative, rows)`` writes synthetic ``rows`` (dicts) to ``root/relative``
    in the layout the file name implies (``.csv``: a header from the first row's keys, as AdvBench's
    goal,target or GPTFuzz's question,Response,label; ``.json``: one JSON list, as the refusal and
    instruction sets; ``.jsonl``: one object per line, as GSM8K) and returns the path. Never put
    rows of the real data here."""
    root = tmp_path / "shared" / "data"

    def write(relative: str, rows: list[dict]) -> Path:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".csv":
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        elif path.suffix == ".json":
            path.write_text(json.dumps(rows, indent=4))
        elif path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            raise ValueError(f"synthetic_shared_data writes .csv, .json or .jsonl, not {relative!r}")
        return path

    return SimpleNamespace(root=root, write=write)


def reference_selection(scores: dict[str, torch.Tensor], k: int, scope: str, *, lowest: bool = False
                        ) -> dict[str, torch.Tensor]:
    """Sorted flat indices per tensor of a *stable* sort (descending, or ascending for ``lowest``)
    of the flattened scores cut after k: over the concatenation in dict order for ``global``, within
    each tensor for ``per_tensor``. Among equal scores the earlier tensor, then the lower flat index
    wins, which is the library's documented tie-breaking."""
    def cut(flat):
        return torch.sort(flat, descending=not lowest, stable=True)[1][:k]

    if scope == "per_tensor":
        return {n: cut(s.reshape(-1)).sort().values for n, s in scores.items()}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    picked, out, offset = cut(flat), {}, 0
    for name, s in scores.items():
        mine = picked[(picked >= offset) & (picked < offset + s.numel())] - offset
        if mine.numel():
            out[name] = mine.sort().values
        offset += s.numel()
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's torch.distributed rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be created in: immutable (chattr +i) when running as root, else mode 0555."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
            pytest.skip("running as root without chattr +i: no way to make a directory unwritable")
        yield path
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
