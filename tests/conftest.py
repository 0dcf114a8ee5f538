"""Fixtures shared by several test modules, and the strict mode every test runs in."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from hybrid_vae.extension.orchestrator import ENV_STRICT
from hybrid_vae.server.testing import serve_demo


def pytest_configure(config: pytest.Config) -> None:
    """Strict mode (``HYBRID_VAE_STRICT=1``, inherited by the CLI subprocesses): a programming error inside a
    plan (TypeError, AttributeError, ...) is raised instead of being reported and decoded by the next plan,
    so a bug can never pass a test as a quiet fallback. A test of the fallback itself passes ``strict=False``."""
    os.environ.setdefault(ENV_STRICT, "1")


@pytest.fixture(scope="session", autouse=True)
def _user_cache_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Endpoint identity verdicts (extension.identity) and learned timings and peaks (policy.learned, which the
    ComfyUI node keeps by default) go to files of this test session, never the user's cache (subprocesses inherit
    them)."""
    from hybrid_vae.extension.identity import ENV_IDENTITY
    from hybrid_vae.policy.learned import ENV_LEARNED

    files = {ENV_IDENTITY: "identity.json", ENV_LEARNED: "learned.json"}
    saved = {k: os.environ.get(k) for k in files}
    base = tmp_path_factory.mktemp("user-cache")
    for k, name in files.items():
        os.environ[k] = str(base / name)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    """``hybrid-vae serve --demo`` on loopback (one per test module); its base URL."""
    with serve_demo() as base:
        yield base


@pytest.fixture
def cuda_peak() -> Callable[[Callable[[], Any]], tuple[Any, int]]:
    """``cuda_peak(fn) -> (fn's result, its CUDA peak allocated bytes over what was allocated before)``, run
    without gradients (the CUDA tests compare a plan's peak with the full decode's)."""
    import torch

    def measure(fn: Callable[[], Any]) -> tuple[Any, int]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    return measure


@pytest.fixture
def lagging_mover() -> Callable[..., type]:
    """``lagging_mover(lazy_drain=False)``: the CUDA mover's deferred writes
    (:class:`extension.stream_store.DeferredMover`, the same code) on the CPU: a tile's read is copied when it is
    requested (one tile ahead of the compute), and its writes land one tile late (``settle``) or at the end of the
    pass (``drain``). The CUDA mover itself needs a GPU; this checks the executors never read a buffer before the
    writes it needs have landed. ``lazy_drain=True`` is the bug the check must catch: a pass ends with one write
    still pending. The class's ``made`` lists its instances (``late``: writes that landed after their tile)."""
    from hybrid_vae.extension.stream_store import DeferredMover

    def make(*, lazy_drain: bool = False) -> type:
        class Lagging(DeferredMover):
            made: ClassVar[list[Lagging]] = []  # every instance, for the test to check it ran

            def __init__(self, device: Any, ledger: Any) -> None:
                super().__init__(device, ledger)
                self.made.append(self)
                self.late = 0  # writes that landed after the tile that made them

            def put(self, view: Any, tile: Any) -> None:
                self._count(0, tile.numel() * tile.element_size())
                self.defer(view, tile.clone())

            def _finish(self, keep: int) -> None:
                self.late += max(0, len(self.pending) - keep)
                super()._finish(keep)

            def drain(self) -> None:
                self._finish(1 if lazy_drain else 0)

        return Lagging

    return make
