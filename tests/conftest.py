"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hybrid_vae.server.testing import serve_demo


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    """``hybrid-vae serve --demo`` on loopback (one per test module); its base URL."""
    with serve_demo() as base:
        yield base
