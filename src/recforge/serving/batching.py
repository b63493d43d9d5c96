"""Micro-batching of work queued by request threads for one worker thread."""

from __future__ import annotations

import queue
from typing import Callable


def drain(q: queue.Queue, first, limit: int, size: Callable[[object], int] = lambda item: 1) -> tuple[list, bool]:
    """``first`` and the items already waiting in ``q``, until their total ``size`` reaches
    ``limit`` or the queue is empty, without waiting. Returns ``(batch, stop)``; ``stop`` is True
    when the stop sentinel ``None`` was taken (the worker ends after this batch)."""
    batch, n = [first], size(first)
    while n < limit:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return batch, True
        batch.append(nxt)
        n += size(nxt)
    return batch, False
