"""Fixtures shared by the replay's test files."""

from __future__ import annotations

import random
import shutil
import tempfile

import pytest


@pytest.fixture
def sockets():
    """A short directory for the workers' lookup sockets (a Unix socket path has 107 bytes)."""
    d = tempfile.mkdtemp(prefix="kvr-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 30000) for _ in range(n)]
