"""Ray's side of the Ray executor's input: the driver's shards as Ray Data blocks, streamed.

One read task on the driver's node (:class:`ShardSource`) creates a queue actor (:class:`ShardQueue`), takes
the shards the driver puts on it (:class:`ShardQueueClient`) one by one and yields each as a block of one row,
so Ray Data starts the replicas and sends them work while the driver is still reading, and holds only what the
driver's window lets out. The read task makes the queue, not the driver, so that the replicas, asked for when
Ray Data starts, come before it for the worker processes Ray started in advance. Imported once Ray is
connected (it imports Ray Data).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from forge_batch.runner.shard_feed import END


@ray.remote(num_cpus=0)
class ShardQueue:
    """The driver's shards on their way to the read task, in order."""

    def __init__(self) -> None:
        self._items: asyncio.Queue[Any] = asyncio.Queue()

    async def put(self, item: Any) -> None:
        await self._items.put(item)

    async def get(self) -> Any:
        return await self._items.get()


def _near_here() -> dict[str, Any]:
    """Actor options that keep the queue on this node (shards then cross no network to reach the read task)."""
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)}
    except Exception:  # noqa: BLE001 - anywhere will do
        return {}


def relay_shards(name: str) -> Iterator[pa.Table]:
    """Each shard the driver puts on the queue ``name`` as a block of one row (``shard``, ``rows``), until END."""
    queue = ShardQueue.options(name=name, get_if_exists=True, **_near_here()).remote()  # type: ignore[attr-defined]
    while (item := ray.get(queue.get.remote())) is not END:
        key, payload = item
        yield pa.table({"shard": pa.array([key], pa.int64()), "rows": pa.array([payload], pa.large_binary())})


class ShardQueueClient:
    """The driver's end of the queue ``name``: :meth:`put` waits for the read task to have made it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._actor: Any = None
        self._closed = threading.Event()

    def put(self, item: Any) -> None:
        while self._actor is None:
            if self._closed.is_set():
                raise RuntimeError("the run stopped before Ray Data started its input")
            try:
                self._actor = ray.get_actor(self.name)
            except ValueError:  # not made yet
                time.sleep(0.02)
        delivered = self._actor.put.remote(item)
        if item is END:
            # Not waited for: on END the relay task ends and drops the queue, which Ray then destroys, at times
            # before this call's reply is back, and waiting would report a queue that died although END (and
            # every shard) arrived. A queue lost before END shows as shards that did not come back.
            return
        ray.get(delivered)

    def close(self) -> None:
        self._closed.set()
        if self._actor is not None:
            ray.kill(self._actor)


def _unknown_size() -> BlockMetadata:
    try:
        return BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
    except TypeError:  # Ray Data before its metadata lost the schema field
        return BlockMetadata(num_rows=None, size_bytes=None, schema=None, input_files=None, exec_stats=None)  # type: ignore[call-arg]


class ShardSource(Datasource):
    """One read task, on the driver's node, relaying the shards of the queue ``name`` (:func:`relay_shards`)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, *args: Any, **kwargs: Any) -> list[ReadTask]:
        return [ReadTask(functools.partial(relay_shards, self._name), _unknown_size())]

    @property
    def supports_distributed_reads(self) -> bool:
        return False
