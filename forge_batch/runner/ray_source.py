"""Ray's side of the Ray executor's input: the driver's shards as Ray Data blocks, streamed.

The driver puts each packed shard on a Ray queue (:func:`shard_queue`, an actor on the driver's node); a single
read task on the driver's node (:class:`ShardSource`) takes them off one by one and yields each as a block of
one row, so Ray Data starts the replicas and sends them work while the driver is still reading, and holds only
what the driver's window lets out. Imported once Ray is connected (it imports Ray Data).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.util.queue import Queue

from forge_batch.runner.shard_feed import END


def shard_queue(window: int) -> Queue:
    """The queue the driver puts its shards on: room for the window and END, on the driver's node when Ray
    says which that is (results then cross no network before the replicas)."""
    options: dict[str, Any] = {"num_cpus": 0}
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    except Exception:  # noqa: BLE001 - e.g. a Ray Client driver, which is no node: anywhere will do
        pass
    return Queue(maxsize=window + 1, actor_options=options)


def relay_shards(queue: Queue) -> Iterator[pa.Table]:
    """Each shard the driver puts on ``queue`` as a block of one row (``shard``, ``rows``), until END."""
    while (item := queue.get(block=True)) is not END:
        key, payload = item
        yield pa.table({"shard": pa.array([key], pa.int64()), "rows": pa.array([payload], pa.large_binary())})


def _unknown_size() -> BlockMetadata:
    try:
        return BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
    except TypeError:  # Ray Data before its metadata lost the schema field
        return BlockMetadata(num_rows=None, size_bytes=None, schema=None, input_files=None, exec_stats=None)  # type: ignore[call-arg]


class ShardSource(Datasource):
    """One read task, on the driver's node, relaying the shards of ``queue`` (:func:`relay_shards`)."""

    def __init__(self, queue: Queue) -> None:
        super().__init__()
        self._queue = queue

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, *args: Any, **kwargs: Any) -> list[ReadTask]:
        return [ReadTask(functools.partial(relay_shards, self._queue), _unknown_size())]

    @property
    def supports_distributed_reads(self) -> bool:
        return False
