"""The dynamic batcher: rows of concurrent callers share one call, each caller gets its own rows back, a lone
caller is never held up, and the wait for announced callers is bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from api.services.batching import BatchedComponent, DynamicBatcher, expecting


class RecordingModel:
    """Doubles its rows, slowly, and records the size of every call."""

    def __init__(self, seconds_per_call: float = 0.02) -> None:
        self.calls: list[int] = []
        self.seconds_per_call = seconds_per_call

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(len(rows))
        time.sleep(self.seconds_per_call)
        return rows * 2.0


@pytest.fixture
def model() -> RecordingModel:
    return RecordingModel()


@pytest.fixture
def make_batcher(model: RecordingModel) -> Callable[..., DynamicBatcher]:
    def make(max_rows: int = 8, max_wait_s: float = 0.005) -> DynamicBatcher:
        return DynamicBatcher(model, "test", max_rows, max_wait_s)

    return make


def run_callers(batcher: DynamicBatcher, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """One thread per input, all started together; each announces itself (like a request that decodes first)."""
    results: list[np.ndarray | None] = [None] * len(inputs)
    barrier = threading.Barrier(len(inputs))

    def caller(index: int) -> None:
        with batcher.expecting():
            barrier.wait()
            time.sleep(0.001 * index)  # they arrive one after another, as requests do
            results[index] = batcher(inputs[index])

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def test_concurrent_callers_share_calls_and_each_gets_its_own_rows(make_batcher, model: RecordingModel) -> None:
    batcher = make_batcher(max_rows=8, max_wait_s=0.05)
    inputs = [np.full((1 + i % 2, 3), float(i)) for i in range(12)]  # 1 or 2 rows each, 18 rows in all
    results = run_callers(batcher, inputs)
    for rows, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result, rows * 2.0)
    assert sum(model.calls) == 18
    assert len(model.calls) < 12 and max(model.calls) > 1, model.calls
    assert max(model.calls) <= 8, model.calls


def test_a_lone_caller_is_served_at_once(make_batcher, model: RecordingModel) -> None:
    batcher = make_batcher(max_rows=8, max_wait_s=1.0)
    batcher(np.zeros((1, 3)))  # the worker thread is up
    started = time.perf_counter()
    with batcher.expecting():  # announced by itself only: nobody else to wait for
        batcher(np.zeros((1, 3)))
    assert time.perf_counter() - started < 0.5  # 20 ms of model time; never the 1 s wait
    assert model.calls == [1, 1]


def test_a_forming_batch_waits_for_an_announced_caller(make_batcher, model: RecordingModel) -> None:
    batcher = make_batcher(max_rows=8, max_wait_s=0.5)
    late_result: list[np.ndarray] = []

    def late_caller() -> None:
        with batcher.expecting():
            announced.set()
            time.sleep(0.05)  # decoding and detecting
            late_result.append(batcher(np.ones((1, 3))))

    announced = threading.Event()
    thread = threading.Thread(target=late_caller)
    thread.start()
    announced.wait()
    early = batcher(np.zeros((1, 3)))
    thread.join()
    assert model.calls == [2]
    np.testing.assert_array_equal(early, np.zeros((1, 3)))
    np.testing.assert_array_equal(late_result[0], np.full((1, 3), 2.0))


def test_the_wait_for_announced_callers_is_bounded(make_batcher, model: RecordingModel) -> None:
    batcher = make_batcher(max_rows=8, max_wait_s=0.03)
    release = threading.Event()

    def announced_but_slow() -> None:
        with batcher.expecting():
            release.wait(5)

    thread = threading.Thread(target=announced_but_slow)
    thread.start()
    time.sleep(0.01)
    started = time.perf_counter()
    batcher(np.zeros((1, 3)))
    waited = time.perf_counter() - started
    release.set()
    thread.join()
    assert 0.025 <= waited < 0.5, waited  # the 30 ms bound plus 20 ms of model time, not the 5 s
    assert model.calls == [1]


def test_a_submission_larger_than_a_batch_runs_whole(make_batcher, model: RecordingModel) -> None:
    batcher = make_batcher(max_rows=4)
    result = batcher(np.arange(30.0).reshape(10, 3))
    np.testing.assert_array_equal(result, np.arange(30.0).reshape(10, 3) * 2.0)
    assert model.calls == [10]


def test_an_error_reaches_every_caller_of_its_batch_and_later_batches_still_run() -> None:
    calls: list[int] = []

    def failing(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        time.sleep(0.02)
        if len(calls) == 1:
            raise ValueError("model failed")
        return rows

    batcher = DynamicBatcher(failing, "failing", max_rows=8, max_wait_s=0.05)
    errors: list[BaseException] = []

    def caller() -> None:
        with batcher.expecting():
            try:
                batcher(np.zeros((1, 3)))
            except ValueError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == calls[0] and len(errors) >= 1
    np.testing.assert_array_equal(batcher(np.ones((2, 3))), np.ones((2, 3)))  # still serving


def test_a_batched_component_keeps_its_other_attributes(make_batcher, model: RecordingModel) -> None:
    class Embedder:
        model_id = "m"
        dimension = 3

        def embed(self, rows: np.ndarray) -> np.ndarray:
            raise AssertionError("called past the batcher")

    batcher = make_batcher()
    batched = BatchedComponent(Embedder(), "embed", batcher)
    assert batched.model_id == "m" and batched.dimension == 3
    with expecting(batched):
        np.testing.assert_array_equal(batched.embed(np.ones((1, 3))), np.full((1, 3), 2.0))
    assert model.calls == [1]
