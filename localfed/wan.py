"""A wide-area link in user space, for kernels without tc's netem: python -m localfed.wan A B [profile].

A and B are TAP devices given as NAMESPACE/DEVICE (made beforehand, e.g. `ip -n NS tuntap add dev tap0 mode tap`).
Every Ethernet frame from one goes to the other as netem would pass it: dropped with probability `loss`, queued
behind the frames before it at `rate` (tail-dropped beyond `limit` frames, netem's default), then held `delay`
seconds. Each direction is shaped on its own, so the round trip is twice the delay. TCP therefore meets the real
thing: its round-trip time, slow start, and retransmissions after a loss.

A device set down (a cut cable) takes no frames: those written to it are counted as cut and dropped. The process
prints `ready` once both devices are attached, and its counts on SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import fcntl
import os
import random
import signal
import struct
import sys
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
LIMIT = 1000  # frames queued per direction, as netem's default limit


@dataclass
class Profile:
    """What a link adds, per direction: one-way delay (s), rate (bit/s, 0: unlimited), loss (a fraction)."""

    delay: float = 0.0
    rate: float = 0.0
    loss: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Profile:
        """'40ms,50mbit,0.5%' (any part may be left out or 0) -> Profile."""
        profile = cls()
        for part in filter(None, (p.strip().lower() for p in text.split(","))):
            if part.endswith("ms"):
                profile.delay = float(part[:-2]) / 1000
            elif part.endswith("mbit"):
                profile.rate = float(part[:-4]) * 1e6
            elif part.endswith("%"):
                profile.loss = float(part[:-1]) / 100
            else:
                raise ValueError(f"{part!r} in the link profile {text!r}: give e.g. 40ms, 50mbit and 0.5%")
        if profile.delay < 0 or profile.rate < 0 or not 0 <= profile.loss < 1:
            raise ValueError(f"link profile {text!r}: delay and rate must be >= 0, loss below 100%")
        return profile

    def __str__(self) -> str:
        rate = f"{self.rate / 1e6:g} Mbit/s" if self.rate else "unlimited rate"
        return f"{self.delay * 1000:g} ms each way, {rate}, {self.loss * 100:g}% loss"


def open_tap(namespace: str, device: str) -> int:
    """A non-blocking file descriptor on the TAP device `device` of network namespace `namespace`."""
    # TUNSETIFF finds the device in the caller's namespace, so enter it first; the descriptor works from anywhere.
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{namespace}") as ns:
        if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"cannot enter network namespace {namespace}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TAP | IFF_NO_PI))
    return fd


@dataclass
class Direction:
    """Frames read from `source`, shaped by `profile`, written to `sink`."""

    name: str
    source: int
    sink: int
    profile: Profile
    rng: random.Random
    queue: collections.deque = field(default_factory=collections.deque)  # (due time, frame), in order
    free_at: float = 0.0  # when the modelled line has sent the last queued frame
    counts: collections.Counter = field(default_factory=collections.Counter)

    def readable(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                frame = os.read(self.source, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the device went away
                return
            self.counts["frames"] += 1
            if self.profile.loss and self.rng.random() < self.profile.loss:
                self.counts["lost"] += 1
                continue
            if len(self.queue) >= LIMIT:
                self.counts["overflow"] += 1
                continue
            now = loop.time()
            start = max(now, self.free_at)
            self.free_at = start + (len(frame) * 8 / self.profile.rate if self.profile.rate else 0.0)
            self.queue.append((self.free_at + self.profile.delay, frame))
            if len(self.queue) == 1:
                loop.call_at(self.queue[0][0], self.deliver, loop)

    def deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, frame = self.queue.popleft()
            try:
                os.write(self.sink, frame)
                self.counts["delivered"] += 1
            except OSError:  # EIO: the device is down (the cable is cut); EAGAIN: its queue is full
                self.counts["cut"] += 1
        if self.queue:
            loop.call_at(self.queue[0][0], self.deliver, loop)

    def report(self) -> str:
        c = self.counts
        return (f"{self.name}: {c['frames']} frames, {c['lost']} lost ({c['lost'] / max(1, c['frames']):.2%}), "
                f"{c['overflow']} over the queue limit, {c['cut']} dropped at a cut link, {c['delivered']} delivered")


async def run(a: tuple[str, str], b: tuple[str, str], profile: Profile, seed: int) -> None:
    """Carry frames both ways until SIGTERM or SIGINT, then print the counts."""
    fd_a, fd_b = open_tap(*a), open_tap(*b)
    rng = random.Random(seed)
    directions = [Direction(f"{a[0]}->{b[0]}", fd_a, fd_b, profile, rng),
                  Direction(f"{b[0]}->{a[0]}", fd_b, fd_a, profile, rng)]
    loop = asyncio.get_running_loop()
    for d in directions:
        loop.add_reader(d.source, d.readable, loop)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print(f"ready: {a[0]}/{a[1]} <-> {b[0]}/{b[1]}, {profile}", flush=True)
    await stop
    for d in directions:
        print(d.report(), flush=True)


def _device(text: str) -> tuple[str, str]:
    namespace, _, device = text.rpartition("/")
    if not namespace or not device:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAMESPACE/DEVICE")
    return namespace, device


def main(argv=None) -> int:
    """Attach both devices and carry frames between them; a device that cannot be opened is one line."""
    parser = argparse.ArgumentParser(prog="python -m localfed.wan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=_device)
    parser.add_argument("b", type=_device)
    parser.add_argument("profile", nargs="?", default="", type=Profile.parse, help="e.g. 40ms,50mbit,0.5%%")
    parser.add_argument("--seed", type=int, default=0, help="of the loss draws")
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args.a, args.b, args.profile, args.seed))
    except OSError as exc:
        print(f"error: cannot attach the link's devices: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
