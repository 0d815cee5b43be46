"""Start and stop worker processes and a loopback file server: used by the demo, the tests and the bench."""
from __future__ import annotations

import atexit
import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class WorkerProcess:
    """A worker in a session of its own, so that ``kill`` takes its resize pool too. That also means
    nothing stops it when its starter dies: whatever the starter has not stopped at exit is SIGKILLed."""

    def __init__(self, role: str, env: dict[str, str], log_dir: Path, name: str | None = None):
        self.role = role
        self.name = name or role
        self.log_path = log_dir / f"worker-{self.name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "streams", "worker", role],
                                     env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        _started.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker and its resize pool (the whole process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._reaped()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a clean stop: the worker leaves its groups), SIGKILL after ``timeout``. A worker that
        did not stop is asked for its threads' stacks first (SIGUSR1: faulthandler writes them to its log),
        so the log says where it hung."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.proc.pid, signal.SIGUSR1)
                    self.proc.wait(1)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
                return self.kill()
        self._reaped()

    def _reaped(self) -> None:
        """The worker is gone: what it could not clean up itself (its data folder after a SIGKILL) goes."""
        _started.discard(self)
        from streams.app import remove_stale_data_dirs  # Faust's module: imported only once a worker ran
        remove_stale_data_dirs()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


_started: set[WorkerProcess] = set()  # started and not yet reaped


@atexit.register
def _kill_the_rest() -> None:
    """Workers run in their own session, so nothing else would stop them when their starter exits
    without stopping them (an exception in a test's setup, a harness bug)."""
    for worker in list(_started):
        worker.kill()


def wait_for_log(worker: WorkerProcess, needle: str, timeout: float = 90.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not worker.alive():
            return False
        try:
            if needle in worker.log_path.read_text(errors="replace"):
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class FileServer:
    """Serve a folder over HTTP on 127.0.0.1 (a free port), in a thread."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
