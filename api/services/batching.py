"""Dynamic batching across requests: the faces of concurrent requests go through a model in one call.

On a small CPU a model call has a fixed cost (dispatch, per-layer overhead, weights streamed through the caches)
that a batch shares. A request has one face or a few, so batches must be formed *across* requests.
:class:`DynamicBatcher` does that: the inference threads of concurrent requests hand it their rows; one of
them, the leader, runs the model on the rows of several callers at once, and each caller gets its own rows of
the result back.

A lone request is never slowed: it finds the model idle, leads, and runs its own rows at once, in its own
thread (no hand-over to another thread, which cost a few milliseconds per call on 2 shared cores). The leader
waits for more rows only while another request has announced (:meth:`DynamicBatcher.expecting`) that it will
submit some, and never longer than ``max_wait_s``. While the model runs, new rows queue up and form the next
batch, so under load batches fill by themselves.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np

from api import metrics

BatchFunction = Callable[[np.ndarray], np.ndarray]


@dataclass
class _Submission:
    rows: np.ndarray
    done: bool = False
    result: np.ndarray | None = None
    error: BaseException | None = None


class DynamicBatcher:
    """Runs ``function`` (rows in, one output row per input row) on the rows of several callers at once.

    ``max_rows``: the most rows one call gets (a single submission larger than that still runs whole, alone);
    ``max_wait_s``: the longest a batch waits for the rows of announced callers. Thread-safe.
    """

    def __init__(self, function: BatchFunction, name: str, max_rows: int = 8, max_wait_s: float = 0.005) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.function = function
        self.name = name
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self._queue: deque[_Submission] = deque()
        self._changed = threading.Condition()
        self._leading = False  # a caller is collecting or running a batch
        self._expected = 0  # requests that announced rows and have not submitted them yet
        self._announced = threading.local()

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Announce, for the calling thread, that it will submit rows soon (e.g. after decoding and detecting):
        a batch that is forming waits for them, within ``max_wait_s``. Only a thread's first submission counts."""
        with self._changed:
            self._expected += 1
        self._announced.pending = True
        try:
            yield
        finally:
            if getattr(self._announced, "pending", False):
                self._announced.pending = False
                with self._changed:
                    self._expected -= 1
                    self._changed.notify_all()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """``function(rows)``, computed in a batch with other callers' rows; blocks until it is done."""
        mine = _Submission(np.asarray(rows))
        with self._changed:
            if getattr(self._announced, "pending", False):
                self._announced.pending = False
                self._expected -= 1
            self._queue.append(mine)
            self._changed.notify_all()
        while True:
            with self._changed:
                while not mine.done and self._leading:
                    self._changed.wait()
                if mine.done:
                    break
                self._leading = True
                batch = self._collect()
            try:
                self._run(batch)
            finally:
                with self._changed:
                    self._leading = False
                    self._changed.notify_all()
        if mine.error is not None:
            raise mine.error
        assert mine.result is not None
        return mine.result

    def _collect(self) -> list[_Submission]:
        """The next batch from the queue (called with the lock held, by the leader): what is queued, then what
        announced callers submit within ``max_wait_s``, up to ``max_rows`` rows."""
        batch = [self._queue.popleft()]
        rows = len(batch[0].rows)
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_rows:
            if self._queue:
                if rows + len(self._queue[0].rows) > self.max_rows:
                    break  # it starts the next batch
                batch.append(self._queue.popleft())
                rows += len(batch[-1].rows)
                continue
            remaining = deadline - time.perf_counter()
            if self._expected <= 0 or remaining <= 0:
                break
            self._changed.wait(remaining)
        return batch

    def _run(self, batch: list[_Submission]) -> None:
        sizes = [len(s.rows) for s in batch]
        try:
            outputs = self.function(batch[0].rows if len(batch) == 1 else np.concatenate([s.rows for s in batch]))
        except BaseException as exc:  # every caller of the batch gets the error
            for submission in batch:
                submission.error, submission.done = exc, True
            return
        metrics.BATCH_ROWS.labels(self.name).observe(sum(sizes))
        start = 0
        for submission, size in zip(batch, sizes, strict=True):
            submission.result, submission.done = outputs[start : start + size], True
            start += size


def expecting(component: object) -> AbstractContextManager[None]:
    """``component.expecting()`` for a batched model component, a no-op context for any other."""
    announce = getattr(component, "expecting", None)
    return announce() if callable(announce) else nullcontext()


class BatchedComponent:
    """A model component (an embedder, an emotion classifier) whose batch method ``method`` goes through a
    :class:`DynamicBatcher`; every other attribute (``model_id``, ``aligner``, ``name``, ...) is the
    component's own, so it stands wherever the component does."""

    def __init__(self, component: object, method: str, batcher: DynamicBatcher) -> None:
        self.component = component
        self.batcher = batcher
        setattr(self, method, batcher)
        self.expecting = batcher.expecting

    def __getattr__(self, name: str) -> object:  # only called for what the instance itself lacks
        return getattr(self.component, name)
