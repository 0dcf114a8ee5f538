"""``DecodeQueue``: order, back-pressure, per-item errors, shutdown, and that decoding overlaps producing.

Real threads, real futures; the engine tests decode real latents with a real diffusers VAE on the CPU.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time

import pytest
import torch
from hybrid_vae.extension.fixture import build_tiny_vae, load_fixture_vae
from hybrid_vae.extension.orchestrator import DecodeResult, HybridDecoder
from hybrid_vae.extension.queue import DecodeQueue
from hybrid_vae.policy.errors import LatentError


@pytest.fixture(scope="module")
def fixture_vae() -> torch.nn.Module:
    try:
        return load_fixture_vae()
    except FileNotFoundError:  # the trained fixture is not committed yet: same architecture, random weights
        return build_tiny_vae("sd15")


def _queue_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("test-q")]


def _sleepy(x: int, *, delay: float = 0.0) -> int:
    time.sleep(delay)
    return x * 10


def test_results_in_submission_order_with_several_workers() -> None:
    rng = random.Random(0)
    delays = [rng.uniform(0.0, 0.03) for _ in range(24)]
    with DecodeQueue(_sleepy, workers=4, maxsize=24, name="test-q") as q:
        futs = [q.submit(i, delay=d) for i, d in enumerate(delays)]
    assert list(q.results()) == [i * 10 for i in range(24)]
    assert [f.result() for f in futs] == [i * 10 for i in range(24)]
    # workers really ran concurrently: later items finished before earlier ones at least once
    assert any(delays[i] > delays[i + 1] + 0.01 for i in range(23))


def test_results_from_a_consumer_thread_while_producing() -> None:
    got: list[int] = []
    with DecodeQueue(_sleepy, workers=2, maxsize=2, name="test-q") as q:
        consumer = threading.Thread(target=lambda: got.extend(q.results(timeout=10)))
        consumer.start()
        for i in range(10):
            q.submit(i, delay=0.005)
    consumer.join(10)
    assert not consumer.is_alive()
    assert got == [i * 10 for i in range(10)]


def test_results_until_closed_false_stops_when_caught_up_and_continues_later() -> None:
    with DecodeQueue(_sleepy, maxsize=8, name="test-q") as q:
        for i in range(3):
            q.submit(i)
        assert list(q.results(until_closed=False)) == [0, 10, 20]
        q.submit(3)
        assert list(q.results(until_closed=False)) == [30]
        assert list(q.results(until_closed=False)) == []


def test_back_pressure_blocks_then_times_out_with_a_clear_error() -> None:
    gate = threading.Event()
    started = threading.Event()

    def blocked(x: int) -> int:
        started.set()
        gate.wait(10)
        return x

    q = DecodeQueue(blocked, workers=1, maxsize=2, name="test-q")
    try:
        q.submit(0)
        assert started.wait(5)  # item 0 is running, so it no longer counts as waiting
        q.submit(1)
        q.submit(2)
        assert q.pending() == 2 and q.running() == 1
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"2 latents waiting \(maxsize=2\), 1 decoding"):
            q.submit(3, timeout=0.2)
        assert 0.18 <= time.monotonic() - t0 < 2.0
        assert q.pending() == 2  # nothing was queued by the failed submit

        # a blocking submit returns only once a worker takes an item
        returned = threading.Event()
        blocker = threading.Thread(target=lambda: (q.submit(4), returned.set()))
        blocker.start()
        assert not returned.wait(0.3)
        gate.set()
        assert returned.wait(5)
        blocker.join(5)
    finally:
        gate.set()
        q.close()
    assert list(q.results()) == [0, 1, 2, 4]


def test_an_error_belongs_to_its_item_and_the_queue_goes_on() -> None:
    def flaky(x: int) -> int:
        if x % 3 == 1:
            raise ValueError(f"bad item {x}")
        return x

    with DecodeQueue(flaky, workers=2, name="test-q") as q:
        futs = [q.submit(i) for i in range(7)]
    for i, f in enumerate(futs):
        if i % 3 == 1:
            with pytest.raises(ValueError, match=f"bad item {i}"):
                f.result()
        else:
            assert f.result() == i
    # results(): the error is raised at its place; a new call continues with the next item
    it = q.results()
    assert next(it) == 0
    with pytest.raises(ValueError, match="bad item 1"):
        next(it)
    rest = list(q.results(return_exceptions=True))
    assert [r if not isinstance(r, Exception) else "err" for r in rest] == [2, 3, "err", 5, 6]


def test_close_joins_every_worker_and_refuses_new_work() -> None:
    q = DecodeQueue(_sleepy, workers=3, name="test-q")
    futs = [q.submit(i, delay=0.01) for i in range(6)]
    assert len(_queue_threads()) == 3
    q.close(wait=True)
    assert _queue_threads() == []
    assert all(f.done() and f.result() == i * 10 for i, f in enumerate(futs))  # waiting work was finished
    with pytest.raises(RuntimeError, match="closed"):
        q.submit(99)
    q.close()  # idempotent


def test_close_wakes_a_submit_blocked_on_a_full_queue() -> None:
    gate, started = threading.Event(), threading.Event()
    q = DecodeQueue(lambda x: (started.set(), gate.wait(10)), workers=1, maxsize=1, name="test-q")
    q.submit(0)
    assert started.wait(5)
    q.submit(1)  # fills the queue: item 0 runs, item 1 waits
    errors: list[BaseException] = []

    def late() -> None:
        try:
            q.submit(3)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=late)
    t.start()
    time.sleep(0.1)
    q.close(wait=False)
    t.join(5)
    gate.set()
    q.close(wait=True)
    assert len(errors) == 1 and "closed" in str(errors[0])
    assert _queue_threads() == []


def test_close_cancel_pending_and_the_with_block_error_path() -> None:
    gate = threading.Event()
    started = threading.Event()

    def slow(x: int) -> int:
        started.set()
        gate.wait(10)
        return x

    futs: list[concurrent.futures.Future[int]] = []
    with pytest.raises(KeyError), DecodeQueue(slow, workers=1, maxsize=8, name="test-q") as q:
        futs = [q.submit(i) for i in range(4)]
        assert started.wait(5)
        threading.Timer(0.2, gate.set).start()
        raise KeyError("producer crashed")
    assert futs[0].result(5) == 0  # the decode in progress finished
    assert all(f.cancelled() for f in futs[1:])
    assert _queue_threads() == []
    with pytest.raises(concurrent.futures.CancelledError):
        list(q.results())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="workers=0"):
        DecodeQueue(_sleepy, workers=0)
    with pytest.raises(ValueError, match="maxsize=0"):
        DecodeQueue(_sleepy, maxsize=0)
    with pytest.raises(TypeError, match=r"\.decode"):
        DecodeQueue(42)
    q = DecodeQueue(_sleepy, keep_results=False, name="test-q")
    f = q.submit(2)
    q.close()
    assert f.result() == 20
    with pytest.raises(RuntimeError, match="keep_results"):
        next(q.results())


def _overlap_run(decode_one: object, n: int) -> list[object]:
    """Produce n items while the queue decodes them, and prove the two overlap by the order of events alone.

    Producing item i + 1 waits until the worker has *started* decoding item i, and decoding item i waits until
    the caller has *started* producing item i + 1. Both can only happen if a decode runs while the next item is
    being produced: a queue that decoded inside ``submit`` (or after the producer finished) deadlocks, and the
    waits' generous timeouts turn that into a failure. No clock is read: speed is a benchmark's business
    (bench/queue_bench.py writes the measured speed-up to docs/benchmarks.md)."""
    producing = [threading.Event() for _ in range(n + 1)]
    decoding = [threading.Event() for _ in range(n)]

    def decode(i: int) -> object:
        decoding[i].set()
        assert producing[i + 1].wait(30), f"decode {i} ran without item {i + 1} being produced"
        return decode_one(i)  # type: ignore[operator]

    with DecodeQueue(decode, workers=1, maxsize=4, name="test-q") as q:
        for i in range(n):
            producing[i].set()
            if i > 0:
                assert decoding[i - 1].wait(30), f"item {i} was produced while item {i - 1} waited to decode"
            q.submit(i)
        producing[n].set()
        out = list(q.results(until_closed=False))
    assert all(e.is_set() for e in decoding)
    return out


def test_decoding_overlaps_producing_the_next_item() -> None:
    assert _overlap_run(lambda i: i * 10, 16) == [i * 10 for i in range(16)]


@pytest.mark.slow
def test_the_real_engine_decodes_while_the_next_latent_is_produced(fixture_vae: torch.nn.Module) -> None:
    """The same proof with real decodes (the engine, a real diffusers VAE on the CPU) on the queue's worker."""
    dec = HybridDecoder()
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0)) * 0.18215
    out = _overlap_run(lambda _i: dec.decode(z, fixture_vae, family="sd15"), 4)
    assert len(out) == 4 and all(isinstance(r, DecodeResult) and r.tensor.shape == (1, 3, 96, 96) for r in out)


def test_with_a_hybrid_decoder_an_engine_error_stays_with_its_item(fixture_vae: torch.nn.Module) -> None:
    good = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.18215
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    with DecodeQueue(HybridDecoder(), workers=1, name="test-q") as q:
        f1 = q.submit(good, vae=fixture_vae, family="sd15")
        f2 = q.submit(bad, vae=fixture_vae, family="sd15")
        f3 = q.submit(good, vae=fixture_vae, family="sd15")
    assert isinstance(f1.result(), DecodeResult) and f1.result().tensor.shape == (1, 3, 64, 64)
    with pytest.raises(LatentError, match="NaN"):
        f2.result()
    assert torch.equal(f3.result().tensor, f1.result().tensor)
