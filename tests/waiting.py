"""Bounded condition waits for tests: wait for what a test needs, never for a fixed time.

`wait_until` waits for a condition another process makes true (a status file, a progress record);
`until` is its trio twin for conditions another task makes true. Both fail with an error that names
what was awaited and, when `detail` is given, what was seen last.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio

POLL_S = 0.05  # how often a condition set by another process is looked at again
TASK_POLL_S = 0.01  # the same, for a condition set by another trio task


class WaitTimeout(AssertionError):
    """A condition did not come true in time (an AssertionError, so pytest reports it as a failure)."""


def _message(what: str, timeout_s: float, detail: Callable[[], Any] | None) -> str:
    seen = f"; last seen: {detail()!r}" if detail is not None else ""
    return f"timed out after {timeout_s} s waiting for {what}{seen}"


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, *,
               detail: Callable[[], Any] | None = None, poll_s: float = POLL_S) -> Any:
    """Return `predicate()`'s first truthy value; WaitTimeout naming `what` after `timeout_s`.

    An AssertionError raised by `predicate` (a process that died, say) ends the wait at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(_message(what, timeout_s, detail))
        time.sleep(min(poll_s, left))


async def until(predicate: Callable[[], Any], timeout_s: float, what: str, *,
                detail: Callable[[], Any] | None = None, poll_s: float = TASK_POLL_S) -> Any:
    """`wait_until` inside trio: yields to other tasks between looks."""
    with trio.move_on_after(timeout_s):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(poll_s)
    raise WaitTimeout(_message(what, timeout_s, detail))
