"""``DecodeQueue``: decode latents on worker threads while the caller produces the next ones.

The seed's queueing pattern (a worker thread that takes latents from a ``queue.Queue`` and decodes
them while the main thread keeps generating), made safe::

    from hybrid_vae.extension.dropin import hybrid_decode
    from hybrid_vae.extension.queue import DecodeQueue

    with DecodeQueue(functools.partial(hybrid_decode, vae=vae), workers=1, maxsize=4) as q:
        for prompt in prompts:
            q.submit(pipe(prompt, output_type="latent").images)   # blocks while 4 are waiting
        for image in q.results(until_closed=False):               # in submission order
            image.save(...)

What it guarantees:

* **bounded**: at most ``maxsize`` latents wait for a worker; :meth:`DecodeQueue.submit` blocks while
  the queue is full (back-pressure: generation cannot run away from decoding and fill memory), and
  with ``timeout=`` raises :class:`TimeoutError` saying how full the queue is;
* **futures**: every submission returns a :class:`concurrent.futures.Future`; an error (a failed decode,
  :class:`~policy.errors.DecodeFailedError` naming the saved latent, ...) is set on that item's future
  only, and the workers carry on with the next item;
* **order**: :meth:`DecodeQueue.results` yields results in submission order, whichever worker finished
  first;
* **clean shutdown**: :meth:`DecodeQueue.close` (and leaving the ``with`` block) stops accepting work,
  finishes (or cancels) what is waiting and joins every worker thread; submitting after close raises
  :class:`RuntimeError`.

Workers: one is right for a single GPU (two decodes racing for its memory gain nothing) and for a
remote endpoint that serialises anyway; more help when decodes go to several endpoints or to a server
that batches concurrent requests.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("hybrid_vae.queue")

__all__ = ["DecodeQueue"]


@dataclasses.dataclass
class _Item:
    seq: int
    latents: Any
    kwargs: dict[str, Any]
    future: concurrent.futures.Future[Any]


def _as_callable(decoder_or_fn: Any) -> Callable[..., Any]:
    """A HybridDecoder-like object (has ``decode``) or any callable ``fn(latents, **kw)``."""
    if callable(decoder_or_fn) and not hasattr(decoder_or_fn, "decode"):
        return decoder_or_fn  # type: ignore[no-any-return]
    decode = getattr(decoder_or_fn, "decode", None)
    if callable(decode):
        return decode  # type: ignore[no-any-return]
    raise TypeError(f"DecodeQueue needs a decoder with .decode(latents, **kw) or a callable fn(latents, **kw); "
                    f"got {type(decoder_or_fn).__name__}")


class DecodeQueue:
    """A bounded queue of decodes run by worker threads, with futures and ordered results.

    Args:
        decoder_or_fn: what decodes one item: a :class:`~extension.orchestrator.HybridDecoder` (its
            ``decode(latents, **kw)`` is called, so pass ``vae=`` and ``family=`` to :meth:`submit`), or any
            callable ``fn(latents, **kw)``, e.g. ``functools.partial(hybrid_decode, vae=vae)``.
        workers (`int`, defaults to `1`): worker threads.
        maxsize (`int`, defaults to `8`): latents that may wait for a worker; :meth:`submit` blocks beyond it.
            Items being decoded do not count. Smaller keeps less memory in latents; larger absorbs bursts.
        keep_results (`bool`, defaults to `True`): keep finished results until :meth:`results` hands them
            out. Set False when you only use the futures, so a long run does not keep every image.
        name (`str`, defaults to `"hybrid-vae-decode"`): thread name prefix (shows in debuggers and logs).

    Raises:
        ValueError: ``workers`` or ``maxsize`` below 1.
        TypeError: ``decoder_or_fn`` is neither a decoder nor a callable.
    """

    def __init__(self, decoder_or_fn: Any, *, workers: int = 1, maxsize: int = 8, keep_results: bool = True,
                 name: str = "hybrid-vae-decode") -> None:
        if workers < 1:
            raise ValueError(f"workers={workers}: need at least 1 worker thread")
        if maxsize < 1:
            raise ValueError(f"maxsize={maxsize}: need room for at least 1 waiting latent")
        self._fn = _as_callable(decoder_or_fn)
        self.maxsize, self.keep_results = maxsize, keep_results
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Item] = collections.deque()
        self._undelivered: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        self._seq = 0
        self._running = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # ---- producer side ---------------------------------------------------------------------------
    def submit(self, latents: Any, *, timeout: float | None = None, **kw: Any) -> concurrent.futures.Future[Any]:
        """Queue one decode; return its future.

        Args:
            latents: what the decoder takes (a latent tensor).
            timeout (`float | None`, defaults to `None`): seconds to wait for room when ``maxsize`` latents
                are waiting; None waits as long as it takes (back-pressure).
            **kw: passed to the decoder with the latents (``vae=``, ``family=``, ``endpoint=``, ...).

        Raises:
            TimeoutError: no room within ``timeout`` (nothing was queued).
            RuntimeError: the queue is closed (also when it closes while this call waits for room).
        """
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not self._closed and len(self._waiting) >= self.maxsize:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"DecodeQueue full: {len(self._waiting)} latents waiting (maxsize={self.maxsize}), "
                                       f"{self._running} decoding; no room within {timeout} s. Decodes are slower than "
                                       "generation: add workers, raise maxsize, or wait longer")
                self._cv.wait(remaining)
            if self._closed:
                raise RuntimeError("DecodeQueue is closed: cannot submit after close(); create a new queue")
            fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
            self._waiting.append(_Item(self._seq, latents, kw, fut))
            self._seq += 1
            if self.keep_results:
                self._undelivered.append(fut)
            self._cv.notify_all()
        return fut

    # ---- workers ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if not self._waiting:  # closed and drained
                    return
                item = self._waiting.popleft()
                self._running += 1
                self._cv.notify_all()  # room for a blocked submit
            try:
                if item.future.set_running_or_notify_cancel():
                    try:
                        result = self._fn(item.latents, **item.kwargs)
                    except BaseException as exc:  # the item's error, not the queue's
                        log.warning("hybrid-vae queue: item %d failed: %s: %s", item.seq, type(exc).__name__, exc)
                        item.future.set_exception(exc)
                    else:
                        item.future.set_result(result)
            finally:
                item.latents = None  # do not keep the latent alive through the future's item
                with self._cv:
                    self._running -= 1
                    self._cv.notify_all()

    # ---- consumer side ---------------------------------------------------------------------------
    def results(self, *, timeout: float | None = None, return_exceptions: bool = False,
                until_closed: bool = True) -> Iterator[Any]:
        """Yield each item's result in submission order, once (a later call continues where one stopped).

        Args:
            timeout (`float | None`, defaults to `None`): longest wait for the next result (TimeoutError).
            return_exceptions (`bool`, defaults to `False`): yield a failed item's exception instead of
                raising it. When it is raised, the iterator ends there; call ``results()`` again to go on
                with the next item.
            until_closed (`bool`, defaults to `True`): after the last submitted item, wait for more until
                the queue is closed (use it from a consumer thread). False: stop once every item submitted
                so far was handed out (use it from the producing thread).

        Raises:
            RuntimeError: the queue was made with ``keep_results=False``.
            TimeoutError: ``timeout`` passed without the next result.
            concurrent.futures.CancelledError: the next item was cancelled (close with ``cancel_pending``).
        """
        if not self.keep_results:
            raise RuntimeError("results() needs DecodeQueue(keep_results=True); with keep_results=False use the futures "
                               "that submit() returned")
        while True:
            with self._cv:
                end = None if timeout is None else time.monotonic() + timeout
                while not self._undelivered:
                    if self._closed or not until_closed:
                        return
                    remaining = None if end is None else end - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"no new item submitted within {timeout} s")
                    self._cv.wait(remaining)
                fut = self._undelivered[0]
            try:
                exc = fut.exception(timeout=timeout)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"the next result was not ready within {timeout} s") from None
            except concurrent.futures.CancelledError:
                with self._cv:
                    self._undelivered.popleft()
                raise
            with self._cv:
                self._undelivered.popleft()
            if exc is not None:
                if return_exceptions:
                    yield exc
                    continue
                raise exc
            yield fut.result()

    # ---- state and shutdown ----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        """Latents waiting for a worker (not those being decoded)."""
        with self._cv:
            return len(self._waiting)

    def running(self) -> int:
        """Decodes in progress."""
        with self._cv:
            return self._running

    def close(self, wait: bool = True, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting work and shut the workers down.

        Args:
            wait (`bool`, defaults to `True`): block until every worker thread has exited (after finishing
                what is waiting, unless cancelled). False returns at once; the workers still finish and exit.
            cancel_pending (`bool`, defaults to `False`): cancel the latents still waiting (their futures
                report cancelled); decodes in progress always finish.
            timeout (`float | None`): with ``wait``, the longest wait for the workers in seconds; they are
                left to finish in the background when it passes (logged).

        Calling it again is harmless.
        """
        with self._cv:
            self._closed = True
            if cancel_pending:
                while self._waiting:
                    item = self._waiting.popleft()
                    item.future.cancel()
            self._cv.notify_all()
        if not wait:
            return
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t is threading.current_thread():
                continue  # close() from inside a decode: the worker exits when it returns
            t.join(None if end is None else max(0.0, end - time.monotonic()))
            if t.is_alive():
                log.warning("hybrid-vae queue: worker %s still running after %s s", t.name, timeout)

    def __enter__(self) -> DecodeQueue:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # an error in the with-block: do not make the caller wait for latents nobody will look at
        self.close(wait=True, cancel_pending=exc_type is not None)
