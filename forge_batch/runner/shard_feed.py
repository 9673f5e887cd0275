"""The Ray executor's input, on the driver: admitted rows packed into shards on a thread while results come
back, never more than a window of shards packed and not yet committed (docs/scale-out.md).

The driver reads and admits rows itself (ids, resume, bad rows: the local executor's parts); what it holds of
the input at any time is the shards in the window, however long the input is. Ray's side of the queue is
:mod:`forge_batch.runner.ray_source`.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from forge_batch.runner.requests import AdmittedRow

# The queue item after the last shard.
END = None


@dataclass
class Shard:
    """Admitted rows sent to a replica as one unit: one ``map_batches`` call, one committed part."""

    key: int
    rows: list[AdmittedRow]


def shards(rows: Iterator[AdmittedRow], batch_rows: int) -> Iterator[Shard]:
    """The admitted rows in shards of ``batch_rows``, keyed 0, 1, ... in input order."""
    batch: list[AdmittedRow] = []
    key = 0
    for row in rows:
        batch.append(row)
        if len(batch) >= batch_rows:
            yield Shard(key, batch)
            key, batch = key + 1, []
    if batch:
        yield Shard(key, batch)


class ShardFeed:
    """Takes the shards of ``stream`` on a thread and hands each to ``put`` as ``(key, pickled rows)``, then
    :data:`END`. A shard is taken only when fewer than ``window`` are out (taken and not committed):
    :meth:`committed` frees a place. A reader that fails ends the stream; its error is :attr:`error`."""

    def __init__(self, stream: Iterator[Shard], window: int, put: Callable[[Any], None]) -> None:
        self.window = window
        self.error: BaseException | None = None
        self.done = False  # every shard and END were put
        self.packed = 0
        self._shards = stream
        self._put = put
        self._places = threading.Semaphore(window)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._out: set[int] = set()
        self._committed: set[int] = set()
        self._thread = threading.Thread(target=self._produce, name="forge-batch-shard-feed", daemon=True)

    @classmethod
    def all_packed(cls, keys: list[int]) -> ShardFeed:
        """A feed whose shards (``keys``) went to Ray another way, all at once: it only counts their commits."""
        feed = cls(iter(()), max(len(keys), 1), lambda item: None)
        feed._out, feed.packed, feed.done = set(keys), len(keys), True
        return feed

    def start(self) -> None:
        self._thread.start()

    def _produce(self) -> None:
        try:
            while self._take_place():
                shard = next(self._shards, None)
                if shard is None:
                    break
                payload = pickle.dumps(shard.rows, protocol=pickle.HIGHEST_PROTOCOL)
                with self._lock:
                    self._out.add(shard.key)
                    self.packed += 1
                self._put((shard.key, payload))
        except BaseException as e:  # noqa: BLE001 - reported by the driver after the shards already sent
            self.error = e
        if self._stop.is_set():
            return
        try:
            self._put(END)
            self.done = True
        except BaseException as e:  # noqa: BLE001 - the queue is gone: Ray Data's own error says why
            self.error = self.error or e

    def _take_place(self) -> bool:
        while not self._stop.is_set():
            if self._places.acquire(timeout=0.1):
                return True
        return False

    def committed(self, key: int) -> bool:
        """Record shard ``key`` as committed, freeing its place; False when it already was (a result Ray
        delivered twice, e.g. from a retried task)."""
        with self._lock:
            if key in self._committed:
                return False
            self._committed.add(key)
            self._out.discard(key)
        self._places.release()
        return True

    @property
    def out(self) -> int:
        """Shards packed and not committed."""
        with self._lock:
            return len(self._out)

    @property
    def finished(self) -> bool:
        """Every shard was packed, sent and committed."""
        return self.done and self.out == 0

    def stop(self) -> None:
        """Pack no more (a run stopped early)."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)
