"""Deletes the staged sources of finished workflows, in batches (one S3 request per 1,000 keys), and the
objects of a cancelled run that its final event does not list, on a thread of its own, so that a burst of
final events costs the join a queue append each."""
from __future__ import annotations

import logging
import queue
import threading
import time

from streams.adapters.objectstore import ObjectStore, parse_s3_uri
from streams.core.errors import PipelineError
from streams.core.planning import staging_key

log = logging.getLogger("imagefork")


class SourceCleaner:
    BATCH = 1000

    def __init__(self, store: ObjectStore, output_prefix: str = ""):
        self.store = store
        self.output_prefix = output_prefix
        # a key to delete, or (workflow id, run id, keys or None: all under the workflow's prefix, keys kept)
        self._queue: queue.SimpleQueue[str | tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cleanup", daemon=True)
        self._thread.start()

    def delete(self, key: str) -> None:
        self._queue.put(key)

    def committed(self, staged: list[tuple[str, str]], orphans: list[tuple[str, str, str]],
                  sweeps: list[tuple[str, str, frozenset[str]]], prefix: str) -> None:
        """What a committed transaction leaves to delete: the staged sources of the runs it finished; the
        outputs made for cancelled runs after their final events; and what a cancelled run uploaded that its
        final event does not list (a task under way whose result will come, or never will)."""
        for workflow_id, run_id in staged:
            self.delete(staging_key(prefix, workflow_id, run_id))
        self.orphaned(orphans)
        for workflow_id, run_id, listed in sweeps:
            self._queue.put((workflow_id, run_id, None, listed))

    def orphaned(self, orphans: list[tuple[str, str, str]]) -> None:
        for uri, workflow_id, run_id in orphans:
            try:
                bucket, key = parse_s3_uri(uri)
            except PipelineError:
                continue
            if bucket == self.store.bucket:
                self._queue.put((workflow_id, run_id, [key], frozenset()))

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
            item = self._queue.get()
            batch: list[str] = []
            while item is not None:
                if isinstance(item, tuple):
                    batch.extend(self._of_run(*item))
                else:
                    batch.append(item)
                if len(batch) >= self.BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            closing = item is None
            if batch:
                self._delete(batch)

    def _of_run(self, workflow_id: str, run_id: str, keys: list[str] | None, listed: frozenset[str]) -> list[str]:
        """The keys among ``keys`` (None: every key under the workflow's output prefix) whose URIs are not listed and
        hold an object that run wrote (the key is the task's in every run: a retry's own object stays)."""
        prefix = f"{self.output_prefix}{workflow_id}/"
        try:
            keys = self.store.list_keys(prefix) if keys is None else keys
            mine = []
            for key in keys:
                if key.startswith(prefix) and self.store.uri(key) not in listed:
                    head = self.store.head(key)
                    if head is not None and (head.get("Metadata") or {}).get("imagefork-run") == run_id:
                        mine.append(key)
            return mine
        except Exception as exc:  # best effort: a leftover output is only storage
            log.warning("join: looking for outputs of cancelled run %s of %s failed: %s", run_id, workflow_id, exc)
            return []

    def _delete(self, keys: list[str]) -> None:
        for attempt in range(3):
            try:
                failed = self.store.delete_many(keys)
                if failed:
                    log.warning("could not delete %d object(s), e.g. %s", len(failed), failed[0])
                return
            except Exception as exc:  # best effort: a leftover copy is only storage
                log.warning("deleting %d object(s) failed (%s); attempt %d", len(keys), exc, attempt + 1)
                time.sleep(1.0 + attempt)
