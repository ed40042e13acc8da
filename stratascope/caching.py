"""One small thread-safe least-recently-used cache, for every cache the package keeps.

The viewer's app serves requests from several threads (ThreadingHTTPServer) that share
these caches, so every read and update of the table happens under a lock. The value is
made outside the lock: a slow read in one thread never blocks the others, and two threads
asking for the same new key at once may both make it (the values are equal; one is kept).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRU:
    """At most `size` values by key; the least recently used is dropped first."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"an LRU holds at least one value, not {size}")
        self.size = size
        self._values: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value cached for `key`, or make() cached under it."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = make()
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.size:
                self._values.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._values

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)
