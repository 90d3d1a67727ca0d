"""
Sharing one piece of work between concurrent requests.

Every caller gets its own Deferred, so a caller that goes away (Klein
cancels the handler of a client that disconnected) never cancels the shared
work for the others.
"""

from typing import Any, Callable, Coroutine, Generic, Hashable, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Runs at most one coroutine per key at a time; concurrent callers share its result."""

    def __init__(self) -> None:
        self._waiters: dict[Hashable, list[Deferred[T]]] = {}

    def running(self, key: Hashable) -> bool:
        return key in self._waiters

    def run(self, key: Hashable, start: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        waiter: Deferred[T] = Deferred()
        waiters = self._waiters.get(key)
        if waiters is None:
            waiters = self._waiters[key] = [waiter]
            Deferred.fromCoroutine(start()).addBoth(self._deliver, key)
        else:
            waiters.append(waiter)
        return waiter

    def _deliver(self, result: Any, key: Hashable) -> None:
        for waiter in self._waiters.pop(key, []):
            if waiter.called:
                continue  # cancelled: its caller went away
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
