"""The inference runner's bounded queue: a request beyond it is refused at once with Retry-After, and the
runner serves again as soon as the queue drains."""

from __future__ import annotations

import threading

import anyio
import pytest

from api.errors import InferenceTimeoutError, OverloadedError
from api.services.inference import InferenceRunner


def test_requests_beyond_the_queue_are_refused_with_retry_after_and_it_recovers() -> None:
    release = threading.Event()
    runner = InferenceRunner(concurrency=1, timeout_s=10, max_queued=1)

    async def scenario() -> tuple[list[str], OverloadedError, str]:
        outcomes: list[str] = []

        async def blocked() -> None:
            outcomes.append(await runner.run(lambda: release.wait(5) and "done"))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(blocked)  # runs
            tasks.start_soon(blocked)  # waits in the queue
            await anyio.sleep(0.05)
            with pytest.raises(OverloadedError) as refused:
                await runner.run(lambda: "never run")
            release.set()
        after = await runner.run(lambda: "served again")
        return outcomes, refused.value, after

    outcomes, refused, after = anyio.run(scenario)
    assert outcomes == ["done", "done"]
    assert refused.status == 503 and refused.code == "OVERLOADED"
    assert int(refused.headers["Retry-After"]) >= 1
    assert after == "served again" and runner.in_flight == 0


def test_an_unbounded_runner_never_refuses() -> None:
    runner = InferenceRunner(concurrency=1, timeout_s=10, max_queued=None)

    async def scenario() -> list[int]:
        results: list[int] = []

        async def one(value: int) -> None:
            results.append(await runner.run(lambda: value))

        async with anyio.create_task_group() as tasks:
            for value in range(20):
                tasks.start_soon(one, value)
        return sorted(results)

    assert anyio.run(scenario) == list(range(20))


def test_a_request_past_its_deadline_times_out_and_leaves_the_queue() -> None:
    release = threading.Event()
    runner = InferenceRunner(concurrency=1, timeout_s=0.1, max_queued=4)

    async def scenario() -> None:
        with pytest.raises(InferenceTimeoutError):
            await runner.run(lambda: release.wait(5))

    anyio.run(scenario)
    release.set()
    assert runner.in_flight == 0
