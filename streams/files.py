"""Files in Kafka: the Batch API's input and output files, chunked into a compacted topic.

A file is ``chunks`` records ``{file_id}:{n}`` of at most ``schemas.batch.CHUNK_BYTES`` each, then its
metadata record ``{file_id}`` (``StoredFile``), on ``{prefix}.files`` (``streams.ktable.CompactedTable``:
every edge keeps the metadata in memory and only the offsets of the chunks). It guarantees:

* a file is visible only whole: the metadata goes last, once every chunk was acknowledged (``acks=all``);
  a writer that dies half-way leaves chunks nobody lists (written again under the same keys if the same
  file id is written again, as a batch's output is);
* any edge serves any file (the topic is shared), and a file survives every edge's restart;
* ``delete`` writes tombstones for the metadata first, then the chunks: a deleted file is never listed
  again, and compaction reclaims its bytes.

What can go wrong: Kafka away (``KafkaError``/``TimeoutError`` from ``put``/``content``, 503 at the edge).
Memory: ``content`` holds the whole file; the edge's body limit and ``batch.max_file_bytes`` bound it.
"""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from schemas.batch import CHUNK_BYTES, StoredFile
from streams.ktable import CompactedTable
from streams.settings import Settings


def chunk_key(file_id: str, n: int) -> str:
    return f"{file_id}:{n}"


def chunks_of(content: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    return [content[i : i + size] for i in range(0, len(content), size)]


class FileStore:
    """The files of one topic prefix (see the module docstring)."""

    def __init__(self, settings: Settings, topic: str, producer: AIOKafkaProducer) -> None:
        self.table = CompactedTable(settings, topic, producer, keep_value=lambda key: ":" not in key)

    async def start(self, timeout_s: float = 30.0) -> None:
        await self.table.start(timeout_s)

    async def stop(self) -> None:
        await self.table.stop()

    def get(self, file_id: str) -> StoredFile | None:
        raw = self.table.get(file_id)
        return None if raw is None else StoredFile.model_validate_json(raw)

    async def find(self, file_id: str) -> StoredFile | None:
        """``get``, asking again once this edge has read the whole topic (a file another edge just wrote)."""
        found = self.get(file_id)
        if found is None:
            try:
                await self.table.sync()
            except TimeoutError:
                return None
            found = self.get(file_id)
        return found

    def all(self) -> list[StoredFile]:
        return [StoredFile.model_validate_json(raw) for raw in list(self.table.values.values())]

    async def put(self, meta: StoredFile, content: bytes) -> StoredFile:
        """Write ``content`` as file ``meta.id`` (its ``bytes`` and ``chunks`` set here); returns the metadata."""
        parts = chunks_of(content)
        meta = meta.model_copy(update={"bytes": len(content), "chunks": len(parts)})
        await self.table.put_many((chunk_key(meta.id, n), part) for n, part in enumerate(parts))
        await self.table.put(meta.id, meta.model_dump_json().encode())
        return meta

    async def content(self, meta: StoredFile) -> bytes:
        """The bytes of a file.

        Raises:
            FileNotFoundError: a chunk is missing (the file was deleted meanwhile); KafkaError, TimeoutError:
                Kafka refused, or is slow or away.
        """
        keys = [chunk_key(meta.id, n) for n in range(meta.chunks)]
        offsets = [self.table.offsets.get(key) for key in keys]
        if any(offset is None for offset in offsets):
            raise FileNotFoundError(f"file {meta.id} has lost chunks (deleted meanwhile?)")
        found = await self.table.read([o for o in offsets if o is not None])
        return b"".join(found[o] for o in offsets if o is not None)

    async def delete(self, meta: StoredFile) -> None:
        await self.table.put(meta.id, None)
        await self.table.put_many((chunk_key(meta.id, n), None) for n in range(meta.chunks))


class FileWriter:
    """Writes one file a chunk at a time as lines are added (a batch's output: never all in memory)."""

    def __init__(self, store: FileStore, meta: StoredFile) -> None:
        self.store = store
        self.meta = meta
        self.buffer = bytearray()
        self.size = 0
        self.chunks = 0
        self.lines = 0

    async def add(self, line: bytes) -> None:
        self.buffer += line + b"\n"
        self.lines += 1
        while len(self.buffer) >= CHUNK_BYTES:
            await self._flush(bytes(self.buffer[:CHUNK_BYTES]))
            del self.buffer[:CHUNK_BYTES]

    async def _flush(self, part: bytes) -> None:
        await self.store.table.put(chunk_key(self.meta.id, self.chunks), part)
        self.chunks += 1
        self.size += len(part)

    async def close(self) -> StoredFile:
        """Write what is left and the metadata; the file is visible from here on."""
        if self.buffer:
            await self._flush(bytes(self.buffer))
            self.buffer.clear()
        meta = self.meta.model_copy(update={"bytes": self.size, "chunks": self.chunks})
        await self.store.table.put(meta.id, meta.model_dump_json().encode())
        return meta
