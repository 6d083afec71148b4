"""The bench's simulated clock: fast_bitrix24's coroutines wait in it side by side, so their waits overlap."""

from __future__ import annotations

import asyncio

from sandbox.bench.peers import virtualise_fast_bitrix24
from sandbox.bench.simclock import SimClock


def test_concurrent_backoffs_overlap_in_simulated_time() -> None:
    import fast_bitrix24.srh as srh

    clock = SimClock(start=1000.0)
    undo = virtualise_fast_bitrix24(clock)
    try:

        async def fifty_backoffs() -> None:
            await asyncio.gather(*(srh.sleep(10.0) for _ in range(50)))
            await srh.sleep(2.5)  # after them, one more wait: it does add

        asyncio.run(fifty_backoffs())
    finally:
        undo()
    assert clock.now() == 1012.5  # 50 concurrent 10 s waits take 10 s, not 500 s
