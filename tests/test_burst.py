"""The burst gate of ``rocmux serve`` (rocmux.burst): forwards held until arrivals pause."""

from __future__ import annotations

import asyncio
import time

import pytest
from rocmux.burst import BurstGate

pytestmark = pytest.mark.anyio


async def test_a_burst_goes_out_together_once_arrivals_pause() -> None:
    """Requests arriving closer together than the window are released in one pass,
    and not before the window has passed since the last of them."""
    releases: list[int] = []
    gate = BurstGate(0.2, releases.append, cap=30.0)
    passed: list[float] = []
    arrivals: list[float] = []

    async def request(delay: float) -> None:
        await asyncio.sleep(delay)
        gate.arrived()
        arrivals.append(time.monotonic())
        await gate.passage()
        passed.append(time.monotonic())

    await asyncio.gather(*(request(0.01 * i) for i in range(5)))
    assert releases == [5]
    assert min(passed) >= max(arrivals) + 0.2


async def test_a_lone_request_waits_one_window() -> None:
    releases: list[int] = []
    gate = BurstGate(0.05, releases.append)
    gate.arrived()
    arrived = time.monotonic()
    await gate.passage()
    assert time.monotonic() - arrived >= 0.05
    assert releases == [1]


async def test_a_window_of_zero_never_holds() -> None:
    """No suspension at all: a callback scheduled before the passage has not run."""
    releases: list[int] = []
    gate = BurstGate(0.0, releases.append)
    ran: list[int] = []
    asyncio.get_running_loop().call_soon(ran.append, 1)
    gate.arrived()
    await gate.passage()
    assert ran == [] and releases == []


async def test_arrivals_that_never_pause_hold_a_forward_at_most_the_cap() -> None:
    releases: list[int] = []
    gate = BurstGate(1.0, releases.append, cap=0.1)
    stop = asyncio.Event()

    async def arrivals() -> None:
        while not stop.is_set():
            gate.arrived()
            await asyncio.sleep(0.001)

    feeder = asyncio.create_task(arrivals())
    try:
        await asyncio.sleep(0.01)
        started = time.monotonic()
        await asyncio.wait_for(gate.passage(), 10)
        assert time.monotonic() - started >= 0.1
        assert releases == [1]
        assert not stop.is_set()  # released while requests were still arriving
    finally:
        stop.set()
        await feeder


async def test_a_cancelled_request_does_not_hold_back_the_others() -> None:
    releases: list[int] = []
    gate = BurstGate(0.05, releases.append, cap=30.0)
    gate.arrived()
    first = asyncio.create_task(gate.passage())
    second = asyncio.create_task(gate.passage())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(second, 10)
    assert first.cancelled()
    assert releases == [1]


def test_the_cap_is_twenty_windows_unless_given() -> None:
    assert BurstGate(0.00025).cap == pytest.approx(0.005)
    assert BurstGate(0.1, cap=0.5).cap == 0.5


async def test_held_forwards_are_all_written_before_any_request_goes_on() -> None:
    """The release calls every held request's write back to back, in one callback:
    none of them waits for another's task to run."""
    gate = BurstGate(0.02, cap=30.0)
    written: list[int] = []
    seen: list[int] = []

    async def request(i: int) -> None:
        gate.arrived()
        await gate.passage(lambda: written.append(i))
        seen.append(len(written))

    await asyncio.gather(*(request(i) for i in range(6)))
    assert written == list(range(6))
    assert seen == [6] * 6


async def test_a_forward_that_fails_fails_its_own_request_only() -> None:
    releases: list[int] = []
    gate = BurstGate(0.02, releases.append, cap=30.0)

    def broken() -> None:
        raise OSError("connection reset")

    gate.arrived()
    outcomes = await asyncio.gather(
        gate.passage(broken), gate.passage(lambda: None), return_exceptions=True
    )
    assert isinstance(outcomes[0], OSError) and outcomes[1] is None
    assert releases == [1]


async def test_without_a_window_the_forward_is_written_at_once() -> None:
    gate = BurstGate(0.0)
    written: list[int] = []
    await gate.passage(lambda: written.append(1))
    assert written == [1]


@pytest.mark.parametrize("lag", [1, 2])
async def test_a_request_whose_handler_starts_passes_later_joins_the_burst(lag) -> None:
    """uvicorn parses a request in one pass of the loop and starts its handler in the
    next: a pass spent parsing part of a burst must not look like the end of it, even
    with a window the clock has long passed."""
    releases: list[int] = []
    gate = BurstGate(1e-9, releases.append, cap=30.0)

    async def first() -> None:
        gate.arrived()
        await gate.passage()

    async def late() -> None:
        for _ in range(lag):
            await asyncio.sleep(0)
        gate.arrived()
        await gate.passage()

    await asyncio.gather(first(), late())
    assert releases == [2]
