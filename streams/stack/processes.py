"""Start and stop worker processes and a loopback file server: used by the demo, the tests and the bench."""
from __future__ import annotations

import atexit
import functools
import http.server
import json
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

    def __init__(self, role: str, env: dict[str, str], log_dir: Path, name: str | None = None,
                 prefix: list[str] = ()):
        """``prefix``: what the command runs under (say, another network namespace: tests/hosts.py)."""
        self.role = role
        self.name = name or role
        self.log_path = log_dir / f"worker-{self.name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "streams", "worker", role],
                                     env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._terminated = False
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

    def terminate(self) -> None:
        """SIGTERM, once (a clean stop: the worker leaves its groups); ``stop`` waits for it. Several
        workers asked first and waited for after stop side by side."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (unless ``terminate`` sent it), SIGKILL after ``timeout``. A worker that did not stop
        is asked for its threads' stacks first (SIGUSR1: faulthandler writes them to its log), so the log
        says where it hung."""
        if self.proc.poll() is None:
            self.terminate()
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
        _started.discard(self)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def keep(self) -> dict:
        """Let the worker outlive its starter (it is no longer killed at exit); return what
        ``stop_kept_workers`` needs to find it again, and only it (the pid and its start time)."""
        _started.discard(self)
        return {"pid": self.pid, "name": self.name, "role": self.role, "started": _start_ticks(self.pid),
                "log": str(self.log_path)}


_started: set[WorkerProcess] = set()  # started and not yet reaped

KEPT_WORKERS = "workers.json"  # in a stack's folder: the workers left running with it


def keep_workers(folder: Path | str, workers: list[WorkerProcess]) -> Path:
    """Leave ``workers`` running after this process ends and record them in ``folder``, so that
    ``stop_kept_workers(folder)`` (``imagefork stack down --dir folder``, ``imagefork demo --stop``)
    stops them. Records of workers kept there earlier and still alive are kept too."""
    path = Path(folder) / KEPT_WORKERS
    records = [r for r in _read_kept(path) if _same_process(r)]
    records += [w.keep() for w in workers if w.alive()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=2))
    os.replace(tmp, path)
    return path


def stop_kept_workers(folder: Path | str, timeout: float = 20.0) -> list[str]:
    """Stop the workers ``keep_workers`` recorded in ``folder`` as ``WorkerProcess.stop`` does (SIGTERM to
    the process group, SIGKILL after ``timeout``) and wait until nothing of their process groups runs;
    return the names of those that were still running. A pid that now belongs to another process (the
    worker ended, the pid was reused) is left alone."""
    path = Path(folder) / KEPT_WORKERS
    running = [r for r in _read_kept(path) if _same_process(r)]
    for record in running:
        try:
            os.killpg(record["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    groups = [r["pid"] for r in running]  # a worker leads its own group (its own session)
    end = time.monotonic() + timeout
    while any(process_group_members(g) for g in groups) and time.monotonic() < end:
        time.sleep(0.1)
    for record in running:
        if not process_group_members(record["pid"]):
            continue
        if _same_process(record):  # it did not stop: its stacks to its log first, as WorkerProcess.stop does
            try:
                os.kill(record["pid"], signal.SIGUSR1)
                time.sleep(1)
            except ProcessLookupError:
                pass
        try:
            os.killpg(record["pid"], signal.SIGKILL)  # the leader, if still there, and what is left of its pool
        except ProcessLookupError:
            pass
    end = time.monotonic() + 10
    while any(process_group_members(g) for g in groups) and time.monotonic() < end:
        time.sleep(0.1)
    path.unlink(missing_ok=True)
    return [r["name"] for r in running]


def process_group_members(pgid: int) -> list[int]:
    """The live processes (zombies aside) of process group ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _read_kept(path: Path) -> list[dict]:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("pid"), int) and r.get("started")]


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ", comm may hold spaces


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), None if it is gone or a
    zombie: with the pid, it names one process for good (a reused pid starts later)."""
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _same_process(record: dict) -> bool:
    return _start_ticks(record["pid"]) == record["started"]


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
    """Serve a folder over HTTP on 127.0.0.1 (or ``address``), a free port, in a thread."""

    def __init__(self, folder: Path | str, address: str = "127.0.0.1"):
        self.folder = Path(folder)
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer((address, 0), handler)
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
