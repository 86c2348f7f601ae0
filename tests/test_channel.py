"""server/channel.py: events from another thread reach the loop in order, in batches, and a cancelled wait
leaves the channel usable."""

import asyncio
import threading
import time

from edgemoe.server.channel import Channel


def test_events_from_a_thread_arrive_in_order_and_in_batches():
    async def main():
        ch = Channel(asyncio.get_running_loop())
        n = 2000

        def engine():
            for i in range(n):
                ch.put(i)
                if i % 500 == 0:
                    time.sleep(0.01)  # the reader catches up and waits: the next put must wake it

        t = threading.Thread(target=engine)
        t.start()
        got, batches = [], 0
        while len(got) < n:
            got += await ch.get()
            batches += 1
            await asyncio.sleep(0.001)  # as a stream pauses between writes: events pile up meanwhile
        t.join()
        return got, batches

    got, batches = asyncio.run(main())
    assert got == list(range(2000))
    assert batches < 2000  # several events per wake-up


def test_put_from_the_loop_itself_and_a_cancelled_wait():
    async def main():
        ch = Channel(asyncio.get_running_loop())
        waiting = asyncio.ensure_future(ch.get())
        await asyncio.sleep(0)
        waiting.cancel()  # the handler went away while waiting
        try:
            await waiting
        except asyncio.CancelledError:
            pass
        ch.put("a")  # no waiter left to wake: kept for the next get
        ch.put("b")
        first = await ch.get()
        later = asyncio.ensure_future(ch.get())
        await asyncio.sleep(0)
        asyncio.get_running_loop().call_later(0.01, ch.put, "c")
        return first, await asyncio.wait_for(later, 5)

    assert asyncio.run(main()) == (["a", "b"], ["c"])


def test_put_after_the_loop_closed_is_dropped():
    loop = asyncio.new_event_loop()
    ch = Channel(loop)

    async def wait_once():
        task = asyncio.ensure_future(ch.get())
        await asyncio.sleep(0)
        return task

    loop.run_until_complete(wait_once())  # a handler waits...
    loop.close()  # ...when the server stops
    assert ch._waiter is not None
    ch.put("late")  # the engine thread's last event: dropped without an exception
