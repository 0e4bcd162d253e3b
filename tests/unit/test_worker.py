"""The one-thread job runner behind the metadata database."""

from __future__ import annotations

import asyncio
import functools
import gc
import threading

import pytest

from pycontainerd.worker import Worker


def test_jobs_run_in_order_on_the_worker_thread() -> None:
    w = Worker("test-worker")
    ran: list[tuple[int, str]] = []

    def job(i: int) -> int:
        ran.append((i, threading.current_thread().name))
        return i * i

    async def main() -> list[int]:
        return list(await asyncio.gather(*(w.run(functools.partial(job, i)) for i in range(50))))

    try:
        assert asyncio.run(main()) == [i * i for i in range(50)]
        assert ran == [(i, "test-worker") for i in range(50)]
    finally:
        w.close()


def test_an_exception_reaches_the_caller_and_the_worker_goes_on() -> None:
    w = Worker("test-worker")

    def boom() -> None:
        raise KeyError("gone")

    async def main() -> str:
        with pytest.raises(KeyError, match="gone"):
            await w.run(boom)
        return await w.run(lambda: "still here")

    try:
        assert asyncio.run(main()) == "still here"
    finally:
        w.close()


def test_a_job_cancelled_before_it_starts_is_skipped() -> None:
    w = Worker("test-worker")
    gate = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        first = asyncio.ensure_future(w.run(gate.wait))
        second = asyncio.ensure_future(w.run(lambda: ran.append("second")))
        await asyncio.sleep(0.05)  # both queued, the first one running
        second.cancel()
        await asyncio.sleep(0)
        gate.set()
        assert await first is True
        await w.run(lambda: ran.append("third"))
        assert second.cancelled()

    try:
        asyncio.run(main())
        assert ran == ["third"]
    finally:
        w.close()


def test_call_waits_from_another_thread() -> None:
    w = Worker("test-worker")
    try:
        assert w.call(lambda: threading.current_thread().name) == "test-worker"
        with pytest.raises(ZeroDivisionError):
            w.call(lambda: 1 // 0)
    finally:
        w.close()


def test_close_runs_the_queued_jobs_first_then_refuses_more() -> None:
    w = Worker("test-worker")
    done: list[int] = []

    async def main() -> None:
        jobs = [asyncio.ensure_future(w.run(functools.partial(done.append, i))) for i in range(5)]
        await asyncio.sleep(0)  # each job is queued
        w.close()
        assert done == [0, 1, 2, 3, 4]
        await asyncio.gather(*jobs)
        with pytest.raises(RuntimeError, match="closed"):
            await w.run(lambda: None)

    asyncio.run(main())
    with pytest.raises(RuntimeError, match="closed"):
        w.call(lambda: None)


def test_a_worker_dropped_without_close_ends_its_thread() -> None:
    w = Worker("test-dropped")
    thread = w._thread
    assert w.call(lambda: 7) == 7
    del w
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
