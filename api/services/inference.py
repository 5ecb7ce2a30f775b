"""Runs blocking model work off the event loop, in a bounded pool, with a per-request time limit."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ParamSpec, TypeVar

import anyio
import anyio.to_thread

from api import metrics
from api.errors import InferenceTimeoutError

P = ParamSpec("P")
R = TypeVar("R")


class InferenceRunner:
    """At most ``threads`` inferences run at once; the rest wait their turn without blocking the loop.

    A request that exceeds ``timeout_s`` (waiting included) answers 503 INFERENCE_TIMEOUT at once. Its
    thread cannot be interrupted and finishes in the background, but it no longer holds the request.
    """

    def __init__(self, threads: int, timeout_s: float) -> None:
        self.limiter = anyio.CapacityLimiter(threads)
        self.timeout_s = timeout_s

    async def run(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        metrics.INFERENCE_QUEUE.inc()  # waiting for a thread, then running
        try:
            with anyio.fail_after(self.timeout_s):
                return await anyio.to_thread.run_sync(
                    partial(function, *args, **kwargs), limiter=self.limiter, abandon_on_cancel=True
                )
        except TimeoutError:
            raise InferenceTimeoutError(
                f"The request took longer than {self.timeout_s:g} s and was abandoned; try again later.",
                timeout_s=self.timeout_s,
            ) from None
        finally:
            metrics.INFERENCE_QUEUE.dec()
