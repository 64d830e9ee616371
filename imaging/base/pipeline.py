"""The engine's one way to use every core: a bounded, in-order thread-pool map.

hashlib, zstd and file I/O release the GIL, so threads run them in parallel.
At most `2 × workers` items are in flight, which keeps memory flat however
large the disk; results come back in input order; cancel is checked between
items.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from .errors import Cancelled

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], *,
                workers: Optional[int] = None, cancelled: Callable[[], bool] = lambda: False,
                name: str = "worker") -> Iterator[tuple[Item, Result]]:
    """Yield (item, function(item)) in the order of `items`, computed by a thread pool."""
    workers = workers or os.cpu_count() or 1
    inflight: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        try:
            for item in items:
                if cancelled():
                    raise Cancelled()
                inflight.append((item, pool.submit(function, item)))
                if len(inflight) > workers * 2:
                    done, future = inflight.popleft()
                    yield done, future.result()
            while inflight:
                done, future = inflight.popleft()
                yield done, future.result()
            if cancelled():
                raise Cancelled()
        finally:
            for _, future in inflight:
                future.cancel()
