"""What a resize worker knows of cancels: the cancellations topic, read whole at start and followed on a
thread of its own, indexed by workflow id and run. A task of a cancelled run is skipped before it starts;
one that has started stops at its next step: the pool's processes look for a flag file per cancelled run
(a stat between steps costs microseconds and needs no channel to the pool)."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from streams.adapters.kafka import committed_records
from streams.config import Config
from streams.core.cancels import CancelIndex, decode_cancellation
from streams.core.errors import RequestInvalid
from streams.core.models import now_ms
from streams.serde import SerdeError

log = logging.getLogger("imagefork")


def _flag_root() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


class CancelWatch:
    def __init__(self, config: Config):
        self.config = config
        self.index = CancelIndex()
        self._lock = threading.Lock()
        self._dir = tempfile.TemporaryDirectory(prefix="imagefork-cancels-", dir=_flag_root())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # the topic was read to its end once
        self._last_prune = time.monotonic()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="cancels", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._dir.cleanup()

    def cancelled(self, workflow_id: str, run_id: str) -> bool:
        with self._lock:
            return self.index.cancelled(workflow_id, run_id)

    def flag(self, workflow_id: str, run_id: str) -> str:
        """The file that exists once the run is cancelled (what the pool's processes look for)."""
        name = hashlib.sha1(f"{workflow_id}\0{run_id}".encode()).hexdigest()
        return os.path.join(self._dir.name, name)

    def _follow(self) -> None:
        topic = self.config.topics.cancellations
        while not self._stop.is_set():
            try:
                for msg in committed_records(self.config, topic, follow=True, timeout=300,
                                             on_end=self.ready.set, stop=self._between_polls):
                    self._take(msg)
            except Exception as exc:  # the broker away, the topic not there yet: read it again later
                log.warning("resize: reading %s: %s: %s", topic, type(exc).__name__, exc)
                self._stop.wait(2.0)

    def _between_polls(self) -> bool:
        """Asked between polls: whether to stop; once a minute, cancels older than the retention go."""
        now = time.monotonic()
        if now - self._last_prune > 60:
            self._last_prune = now
            self._prune(now_ms() - int(self.config.finished_retention_s * 1000))
        return self._stop.is_set()

    def _take(self, msg) -> None:
        """One record; whatever it holds, the reading goes on (a record that is not a cancel is the join's
        to dead-letter)."""
        if msg.value() is None:
            return
        try:
            cancel = decode_cancellation(msg.key(), msg.value())
            with self._lock:  # kept by when this worker learned it (a client's clock says nothing here)
                new = self.index.add(replace(cancel, at=now_ms()))
            if new:
                Path(self.flag(cancel.workflowId, cancel.runId)).touch()
                log.info("resize: run %s of workflow %s is cancelled: its tasks are skipped", cancel.runId,
                         cancel.workflowId)
        except (RequestInvalid, SerdeError):
            return
        except Exception as exc:
            log.warning("resize: a cancel at %s[%d:%d] not taken: %s: %s", msg.topic(), msg.partition(),
                        msg.offset(), type(exc).__name__, exc)

    def _prune(self, older_than: int) -> None:
        with self._lock:
            gone = self.index.prune(older_than)
        for wf, run in gone:
            try:
                os.unlink(self.flag(wf, run))
            except (OSError, UnicodeEncodeError):
                pass
