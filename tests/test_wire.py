"""localfed.wan, the user-space stand-in for netem, on pipes: what it does to each frame (delay, rate, loss, the
queue limit, a cut link), in time. The multi-host test runs it between real TAP devices."""
import asyncio
import os
import random

import pytest

from localfed.wan import LIMIT, Direction, Profile


def test_a_profile_reads_as_netem_is_written():
    profile = Profile.parse("20ms,50mbit,0.5%")
    assert (profile.delay, profile.rate, profile.loss) == (0.02, 50e6, 0.005)
    assert str(profile) == "20 ms each way, 50 Mbit/s, 0.5% loss"
    assert str(Profile.parse("0ms")) == "0 ms each way, unlimited rate, 0% loss"
    for bad in ("20 milliseconds", "100%", "-5ms"):
        with pytest.raises(ValueError, match="link profile"):
            Profile.parse(bad)


def _carry(frames: list[bytes], profile: Profile, close_sink: bool = False, seed: int = 0):
    """Send `frames` through one Direction between two pipes at once; return (arrival offsets, counts)."""
    source_r, source_w = os.pipe()
    sink_r, sink_w = os.pipe()
    for fd in (source_r, sink_r, sink_w):  # as the wire opens its devices
        os.set_blocking(fd, False)
    if close_sink:
        os.close(sink_r)

    async def run():
        loop = asyncio.get_running_loop()
        direction = Direction("test", source_r, sink_w, profile, random.Random(seed))
        arrivals, started = [], loop.time()
        if not close_sink:
            loop.add_reader(sink_r, lambda: arrivals.append((loop.time() - started, os.read(sink_r, 65536))))
        for frame in frames:  # a pipe has no frames: hand them over one read at a time
            os.write(source_w, frame)
            direction.readable(loop)
        await asyncio.sleep(profile.delay + len(b"".join(frames)) * 8 / (profile.rate or 1e12) + 0.2)
        if not close_sink:
            loop.remove_reader(sink_r)
        return arrivals, direction.counts

    try:
        return asyncio.run(run())
    finally:
        for fd in (source_r, source_w, sink_w) + (() if close_sink else (sink_r,)):
            os.close(fd)


def test_frames_queue_at_the_rate_then_wait_the_delay_in_order():
    frames = [bytes([i]) * 1250 for i in range(3)]  # 10 ms each at 1 Mbit/s
    arrivals, counts = _carry(frames, Profile(delay=0.05, rate=1e6))
    assert [data for _, data in arrivals] == frames
    for i, (offset, _) in enumerate(arrivals, 1):
        assert 0.05 + 0.01 * i <= offset < 0.05 + 0.01 * i + 0.05
    assert counts["delivered"] == 3 and counts["lost"] == 0


def test_loss_drops_its_share_and_the_queue_has_netems_limit():
    _, counts = _carry([b"x"] * 900, Profile(loss=0.3), seed=1)  # fewer than the limit: all queued at once
    assert counts["frames"] == 900 and 0.25 < counts["lost"] / 900 < 0.35
    assert counts["delivered"] == 900 - counts["lost"] and counts["overflow"] == 0
    # Handed over faster than anything leaves (the loop runs only once all are queued): the queue fills up.
    _, counts = _carry([b"y" * 10] * (LIMIT + 50), Profile())
    assert counts["overflow"] == 50 and counts["delivered"] == LIMIT


def test_a_cut_link_drops_what_reaches_it():
    _, counts = _carry([b"z" * 100] * 5, Profile(delay=0.01), close_sink=True)
    assert counts["cut"] == 5 and counts["delivered"] == 0
