"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hybrid_vae.server.testing import serve_demo


@pytest.fixture(scope="session", autouse=True)
def _identity_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Endpoint identity verdicts (extension.identity) go to a file of this test session, never the user's cache
    (subprocesses inherit it)."""
    from hybrid_vae.extension.identity import ENV_IDENTITY

    saved = os.environ.get(ENV_IDENTITY)
    os.environ[ENV_IDENTITY] = str(tmp_path_factory.mktemp("identity") / "identity.json")
    yield
    if saved is None:
        os.environ.pop(ENV_IDENTITY, None)
    else:
        os.environ[ENV_IDENTITY] = saved


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    """``hybrid-vae serve --demo`` on loopback (one per test module); its base URL."""
    with serve_demo() as base:
        yield base
