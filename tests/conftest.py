"""Shared fixtures. The organism cache points at a per-session temp dir, so tests never touch
(or depend on) a user's cache; tiny organisms (":tiny" preset) build in seconds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

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


def shared_data(relative: str) -> Path:
    """Path under ../shared/data, or skip the test when the checkout has none beside it."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{relative} (public benchmark data, not part of the repo)")
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's torch.distributed rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
