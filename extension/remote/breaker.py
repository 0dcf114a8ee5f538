"""The circuit breaker the remote client keeps per endpoint (:class:`CircuitBreaker`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Closed -> (``failure_threshold`` failed calls) -> open for ``cooldown_s`` -> half-open: one
    probe call; success closes, failure re-opens with the cool-down doubled (up to ``max_cooldown_s``).

    Thread-safe. ``clock`` is injectable for tests (default ``time.monotonic``).
    """

    def __init__(self, *, failure_threshold: int = 3, cooldown_s: float = 30.0, max_cooldown_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.failure_threshold, self.base_cooldown, self.max_cooldown = failure_threshold, cooldown_s, max_cooldown_s
        self._clock, self._lock = clock, threading.Lock()
        self.failures, self.open_until, self.cooldown = 0, 0.0, cooldown_s
        self._probing = False

    @property
    def state(self) -> str:
        with self._lock:
            if self.failures < self.failure_threshold:
                return "closed"
            return "open" if self._clock() < self.open_until or self._probing else "half-open"

    def acquire(self) -> float | None:
        """None when a call may go ahead; else the monotonic time the endpoint may be tried again."""
        with self._lock:
            if self.failures < self.failure_threshold:
                return None
            now = self._clock()
            if now < self.open_until:
                return self.open_until
            if self._probing:  # someone else is probing: wait for the verdict
                return now + 1.0
            self._probing = True
            return None

    def success(self) -> None:
        with self._lock:
            self.failures, self._probing, self.cooldown = 0, False, self.base_cooldown

    def failure(self) -> None:
        with self._lock:
            was_probe = self._probing
            self.failures += 1
            self._probing = False
            if self.failures >= self.failure_threshold:
                if was_probe:
                    self.cooldown = min(self.max_cooldown, self.cooldown * 2)
                self.open_until = self._clock() + self.cooldown

    def release(self) -> None:
        """A call ended without a verdict on the endpoint (e.g. a 400 for that request)."""
        with self._lock:
            self._probing = False
