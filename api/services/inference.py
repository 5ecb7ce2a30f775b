"""Runs blocking model work off the event loop, in a bounded pool with a bounded queue and a time limit."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import ParamSpec, TypeVar

import anyio
import anyio.to_thread

from api import metrics
from api.errors import InferenceTimeoutError, OverloadedError

P = ParamSpec("P")
R = TypeVar("R")

# Weight of the newest run in the moving average of run times that Retry-After is estimated from.
_RUN_TIME_SMOOTHING = 0.1


class InferenceRunner:
    """At most ``concurrency`` inferences run at once; at most ``max_queued`` more wait their turn without
    blocking the loop, and any request beyond those answers 503 OVERLOADED at once, with a ``Retry-After``
    estimated from how long the queue takes to drain. Under a burst the service so keeps answering quickly
    (some requests refused) instead of letting every request wait past its deadline.

    A request that exceeds ``timeout_s`` (waiting included) answers 503 INFERENCE_TIMEOUT at once. Its
    thread cannot be interrupted and finishes in the background, but it no longer holds the request.
    """

    def __init__(self, concurrency: int, timeout_s: float, max_queued: int | None = None) -> None:
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_queued = max_queued  # None: unbounded
        self.in_flight = 0  # running or waiting; only touched on the event loop, so no lock
        self._mean_run_s = 0.05

    def _refuse_when_full(self) -> None:
        if self.max_queued is None or self.in_flight < self.concurrency + self.max_queued:
            return
        waiting = self.in_flight - self.concurrency + 1
        retry_after = max(1, math.ceil(waiting * self._mean_run_s / self.concurrency))
        metrics.OVERLOADED.inc()
        raise OverloadedError(
            f"The service is at capacity ({self.in_flight} requests in progress); retry after {retry_after} s.",
            retry_after_s=retry_after,
        )

    async def run(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        self._refuse_when_full()
        self.in_flight += 1
        metrics.INFERENCE_QUEUE.inc()  # waiting for a thread, then running
        try:
            with anyio.fail_after(self.timeout_s):
                return await anyio.to_thread.run_sync(
                    partial(self._timed, function, *args, **kwargs), limiter=self.limiter, abandon_on_cancel=True
                )
        except TimeoutError:
            raise InferenceTimeoutError(
                f"The request took longer than {self.timeout_s:g} s and was abandoned; try again later.",
                timeout_s=self.timeout_s,
            ) from None
        finally:
            self.in_flight -= 1
            metrics.INFERENCE_QUEUE.dec()

    def _timed(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            self._mean_run_s += _RUN_TIME_SMOOTHING * (elapsed - self._mean_run_s)
