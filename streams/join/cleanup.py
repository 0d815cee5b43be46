"""Deletes the staged sources of finished workflows (and the outputs a cancelled run made after its final event): in batches (one S3 request per 1,000 keys), on a
thread of its own, so that a burst of final events costs the join a queue append each."""
from __future__ import annotations

import logging
import queue
import threading
import time

from streams.adapters.objectstore import ObjectStore, parse_s3_uri
from streams.core.errors import SourceNotFound
from streams.core.planning import staging_key

log = logging.getLogger("imagefork")


class SourceCleaner:
    BATCH = 1000

    def __init__(self, store: ObjectStore):
        self.store = store
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cleanup", daemon=True)
        self._thread.start()

    def delete(self, key: str) -> None:
        self._queue.put(key)

    def committed(self, staged: list[tuple[str, str]], orphans: list[str], prefix: str) -> None:
        """What a committed transaction leaves to delete: the staged sources of the runs it finished and the
        outputs made for cancelled runs after their final events."""
        for workflow_id, run_id in staged:
            self.delete(staging_key(prefix, workflow_id, run_id))
        for uri in orphans:
            self.delete_uri(uri)

    def delete_uri(self, uri: str) -> None:
        """An object named by its s3:// URI, if it is in the bucket this cleaner deletes from."""
        try:
            bucket, key = parse_s3_uri(uri)
        except SourceNotFound:
            bucket, key = "", ""
        if bucket == self.store.bucket and key:
            self.delete(key)
        else:
            log.warning("join: not deleting %s: not an object of bucket %s", uri, self.store.bucket)

    def finished_after_all(self, staged: list[tuple[str, str]], states: dict, partition_of, prefix: str) -> None:
        """After an abort: delete the staged sources of the runs that the restored (committed) ``states`` show
        finished (their finish was committed after all: no replay will finish them again)."""
        for workflow_id, run_id in staged:
            state = states.get(partition_of(workflow_id))
            marker = state.marker(workflow_id) if state is not None else None
            if marker is not None and marker.runId == run_id:
                self.delete(staging_key(prefix, workflow_id, run_id))

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, for at most ``timeout`` seconds."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("join: staged sources still queued for deletion at exit (left in the bucket)")

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            batch = [] if first is None else [first]
            closing = first is None
            while len(batch) < self.BATCH:
                try:
                    key = self._queue.get_nowait()
                except queue.Empty:
                    break
                if key is None:
                    closing = True
                    break
                batch.append(key)
            if batch:
                self._delete(batch)

    def _delete(self, keys: list[str]) -> None:
        for attempt in range(3):
            try:
                failed = self.store.delete_many(keys)
                if failed:
                    log.warning("could not delete %d staged source(s), e.g. %s", len(failed), failed[0])
                return
            except Exception as exc:  # best effort: a leftover staged copy is only storage
                log.warning("deleting %d staged source(s) failed (%s); attempt %d", len(keys), exc, attempt + 1)
                time.sleep(1.0 + attempt)
