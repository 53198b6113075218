"""How fast the link delivers, and when and how much background fetching it may carry.

The background fetch fills the rest of an image while the workload runs.  It must never make an
on-demand fill (an open waiting on its bytes) queue behind it, nor take the CPU and the link
while the workload is waiting on misses (measured: fetching beside a burst of misses made pg's
run 5 s slower than not fetching at all):

- it runs only once the workload has not missed for `QUIET`: its quiet spells (computing,
  between phases), when the link would idle;
- its requests are sized to a few tens of milliseconds of the link, so a miss's own request,
  sent at once on a connection of its own, is never stuck behind a big one;
- it keeps `PARALLEL` requests in flight (measured with integration.ranges_bench at 20 ms:
  1 MiB ranges, one in flight 0.77 of the goodput, two 0.93, three 0.97, more no gain), paced
  to `SHARE` of the measured rate, so the bottleneck's queue stays short and the next miss's
  round trip is not lengthened by it.

The rate is measured on every range request over busy time only (idle gaps between bursts, or
left by the pacing itself, do not dilute it).  Pure: the clock is passed in; no I/O.
"""

from __future__ import annotations

import threading

#: A background request carries about this much of the link's time at the measured rate.
REQUEST_SECONDS = 0.04
#: Bounds of a background request: below, round trips dominate; above, a miss waits too long behind it.
MIN_REQUEST = 256 << 10
MAX_REQUEST = 2 << 20
#: Background requests in flight.
PARALLEL = 2
#: How long it waits before looking again while slots are taken (a freed slot wakes it sooner).
HOLD = 0.1
#: The background waits until no miss happened for this long ...
QUIET = 0.25
#: ... and then takes at most this share of the measured rate.
SHARE = 0.8
#: The meter forgets old traffic: once it has seen this much busy time it halves its history.
WINDOW = 2.0
#: Below this much busy time measured, there is no rate yet.
MIN_BUSY = 0.05


class RateMeter:
    """Bytes per second the registry delivered while at least one request was in flight.

    `record(start, end, nbytes)` is called when a request ends; overlapping requests count
    their busy time once (the union of their intervals, taken in the order they end).
    Thread-safe: every fill thread records into one meter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = 0.0
        self._busy = 0.0
        self._busy_until = 0.0

    def record(self, start: float, end: float, nbytes: int) -> None:
        with self._lock:
            self._busy += max(0.0, end - max(start, self._busy_until))
            self._busy_until = max(self._busy_until, end)
            self._bytes += nbytes
            if self._busy > WINDOW:
                self._busy /= 2
                self._bytes /= 2

    def rate(self) -> float | None:
        """Bytes per second, or None before enough traffic was seen."""
        with self._lock:
            return self._bytes / self._busy if self._busy >= MIN_BUSY else None


def request_size(rate: float | None) -> int:
    """Bytes one background request asks for at `rate` (None: not measured yet)."""
    if rate is None:
        return 2 * MIN_REQUEST
    return int(min(MAX_REQUEST, max(MIN_REQUEST, rate * REQUEST_SECONDS)))


def is_quiet(ondemand: int, last_ondemand_end: float, now: float) -> bool:
    """The background may fetch now: no on-demand fill is running and none ended within QUIET
    (monotonic seconds; 0 if none ever did)."""
    return not ondemand and (not last_ondemand_end or now - last_ondemand_end >= QUIET)


class Pacer:
    """A token bucket for the background: after a request of n bytes at rate r, the next may be sent
    n / (SHARE * r) seconds later.  Not thread-safe: one scheduling thread asks it."""

    def __init__(self, share: float = SHARE) -> None:
        self.share = share
        self._next = 0.0

    def delay(self, now: float) -> float:
        """Seconds to wait before the next paced request may be sent."""
        return max(0.0, self._next - now)

    def sent(self, now: float, nbytes: int, rate: float | None) -> None:
        """A paced request of nbytes was sent at `now`."""
        if rate:
            self._next = max(now, self._next) + nbytes / (self.share * rate)
