"""Unit tests of the per-model concurrency gate (FIFO queue, 429 when full)."""

from __future__ import annotations

import asyncio

import pytest

from llm_manager.errors import QueueFull
from llm_manager.models.gate import ConcurrencyGate


async def test_unlimited_never_waits() -> None:
    gate = ConcurrencyGate("m", limit=0, queue=0)
    for _ in range(100):
        await gate.acquire()
    assert gate.active == 0 and gate.waiting == 0


async def test_fifo_order_and_queue_full() -> None:
    gate = ConcurrencyGate("m", limit=1, queue=2)
    await gate.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await gate.acquire()
        order.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in (1, 2)]
    await asyncio.sleep(0)
    assert gate.waiting == 2
    with pytest.raises(QueueFull) as info:
        await gate.acquire()
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    gate.release()
    await asyncio.sleep(0)
    gate.release()
    await asyncio.gather(*tasks)
    assert order == [1, 2]
    gate.release()
    assert gate.active == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    gate = ConcurrencyGate("m", limit=1, queue=5)
    await gate.acquire()
    leaving = asyncio.create_task(gate.acquire())
    staying = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    assert gate.waiting == 1
    gate.release()
    await staying
    assert gate.active == 1
    gate.release()
    assert gate.active == 0


async def test_slot_handed_over_to_a_waiter_that_was_just_cancelled_is_returned() -> None:
    gate = ConcurrencyGate("m", limit=1, queue=5)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    gate.release()  # hands the slot to the waiter...
    waiter.cancel()  # ...which leaves before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.active == 0 and gate.waiting == 0
