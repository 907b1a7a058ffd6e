"""Failed logins of the review page, limited per user name and per client address.

The login form checks a password by connecting to PostgreSQL as that user: without a limit, the
page would let anyone who reaches it try passwords as fast as the database answers (from the page's
host, which pg_hba.conf may trust more than theirs). After too many failures in a window, further
attempts for that user, or from that address, are refused without asking the database (the right
password too) until the oldest failure leaves the window.

Per user: a few guesses at one account from many addresses. Per address: many accounts from one
address, with more room (colleagues behind one proxy or NAT share it). A successful login clears
its user's failures. The counts live in the page's process memory: a restart forgets them.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Callable

MAX_FAILURES_PER_USER = 5
MAX_FAILURES_PER_ADDRESS = 20
WINDOW_S = 300.0
MAX_KEYS = 10_000  # users and addresses remembered at once (oldest forgotten first)


class LoginThrottle:
    def __init__(self, per_user: int = MAX_FAILURES_PER_USER, per_address: int = MAX_FAILURES_PER_ADDRESS,
                 window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = {"user": per_user, "address": per_address}
        self.window_s = window_s
        self.clock = clock
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    @staticmethod
    def _keys(address: str | None, user: str) -> list[tuple[str, str]]:
        return [("user", user.strip().lower()), ("address", address or "?")]

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times

    def retry_after(self, address: str | None, user: str) -> tuple[float, str | None]:
        """(seconds to wait, 'user' or 'address' that is blocked); (0, None) when allowed."""
        now = self.clock()
        for key in self._keys(address, user):
            times = self._recent(key, now)
            if len(times) >= self.limits[key[0]]:
                return times[-self.limits[key[0]]] + self.window_s - now, key[0]
        return 0.0, None

    def failed(self, address: str | None, user: str) -> None:
        now = self.clock()
        for key in self._keys(address, user):
            times = self._recent(key, now)
            times.append(now)
            self._failures[key] = times
            self._failures.move_to_end(key)
        while len(self._failures) > MAX_KEYS:
            self._failures.popitem(last=False)

    def succeeded(self, address: str | None, user: str) -> None:
        self._failures.pop(self._keys(address, user)[0], None)
