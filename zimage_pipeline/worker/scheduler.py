"""Which buffered delivery runs next: priority first, then round-robin over principals.

Pure data structure, no I/O. A principal that already has `max_buffered` deliveries
waiting gets no more buffer slots: `offer` returns False and the worker sends that
delivery to the back of the queue (through a short delay queue). A burst of thousands of
requests from one user therefore cannot fill the prefetch window and starve others, who
are served as soon as their delivery reaches any worker.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

from zimage_pipeline.messages import Priority

T = TypeVar("T")

PRIORITY_ORDER = (Priority.INTERACTIVE, Priority.STANDARD, Priority.BULK)


class FairScheduler(Generic[T]):
    def __init__(self, *, max_buffered_per_principal: int) -> None:
        self._max = max_buffered_per_principal
        # priority -> principal -> waiting items; OrderedDict order is the round-robin turn.
        self._queues: dict[Priority, OrderedDict[str, deque[T]]] = {
            p: OrderedDict() for p in PRIORITY_ORDER
        }
        self._waiting: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(self._waiting.values())

    def waiting_for(self, principal: str) -> int:
        return self._waiting.get(principal, 0)

    def offer(self, item: T, *, priority: Priority, principal: str) -> bool:
        """Buffer `item`; False when `principal` already has its share waiting."""
        if self._waiting.get(principal, 0) >= self._max:
            return False
        self._queues[priority].setdefault(principal, deque()).append(item)
        self._waiting[principal] = self._waiting.get(principal, 0) + 1
        return True

    def take(self) -> T | None:
        for priority in PRIORITY_ORDER:
            by_principal = self._queues[priority]
            if not by_principal:
                continue
            principal, items = next(iter(by_principal.items()))
            item = items.popleft()
            # Move this principal to the end of the turn order (or drop it if empty).
            del by_principal[principal]
            if items:
                by_principal[principal] = items
            self._waiting[principal] -= 1
            if not self._waiting[principal]:
                del self._waiting[principal]
            return item
        return None

    def drain(self) -> list[T]:
        items: list[T] = []
        while (item := self.take()) is not None:
            items.append(item)
        return items
