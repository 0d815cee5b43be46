"""What the local stack's parts share: its one error, its folders, free ports, and the processes it started
(each found again by a marker in its command line, so nothing but ours is ever stopped)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from streams.errors import ImageforkError


class StackError(ImageforkError, RuntimeError):
    """One clear line saying what is missing or what failed."""


def cache_dir() -> Path:
    base = os.environ.get("IMAGEFORK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "imagefork")
    return Path(base)


def default_state_dir() -> Path:
    return Path(os.environ.get("IMAGEFORK_STACK_DIR") or cache_dir() / "stack")


def say(message: str) -> None:
    """A line for the user on stderr (stdout of ``stack up`` is the KEY=VALUE lines)."""
    print(f"imagefork: {message}", file=sys.stderr, flush=True)


def require(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise StackError(f"{tool} is not on PATH: {why}")
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (a key, a password), created so from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there before keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(text)


# --- helpers -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(names) -> dict[str, int]:
    """A free port for each name, all different: each socket is held until all are picked (one after
    the other, the system may hand out a port just released again)."""
    sockets = []
    try:
        for _ in names:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return {name: s.getsockname()[1] for name, s in zip(names, sockets)}
    finally:
        for s in sockets:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` is still one of ours: its command line has the marker as a whole argument (a
    stack in ``/x/stack-2`` is not the one in ``/x/stack``, a reused pid is nobody's)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return marker.encode() in args


def is_kafka(service: str) -> bool:
    return service == "kafka" or service.startswith("kafka-")


def still_starting(pid: int, marker: str, looks: int = 5, pause_s: float = 0.2) -> bool:
    """Whether a service just spawned is still there. Its command line is read several times before it is
    given up: the java launcher may exec itself again at start, and for that moment /proc shows no marker
    (seen on a loaded machine: a Kafka taken for dead that went on to start)."""
    for look in range(looks):
        if alive(pid, marker):
            return True
        try:
            os.kill(pid, 0)
        except OSError:
            return False  # gone for good
        if zombie(pid):
            return False
        time.sleep(pause_s)
    return False


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_pid(pid: int, marker: str, grace: float = 15.0, *, kill: bool = False) -> bool:
    """SIGTERM a process of ours, SIGKILL after ``grace`` seconds (with ``kill``, SIGKILL at once: a broker
    that dies); whether it was running."""
    if not alive(pid, marker):
        return False
    try:
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    except ProcessLookupError:
        return False
    end = time.monotonic() + (10 if kill else grace)
    while time.monotonic() < end and alive(pid, marker):
        reap(pid)
        time.sleep(0.1)
    if alive(pid, marker):
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    reap(pid)
    return True


def check_started(name: str, svc: dict, marker: str, log: Path) -> None:
    """Raise StackError, with the likely cause from its log, if the service just started has exited."""
    if svc and not still_starting(svc["pid"], marker):
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        # a JVM ends its log with stack frames: the bind error, if any, is well above them
        bind = next((line.strip() for line in lines if "Address already in use" in line), "")
        hint = " (port in use?)" if bind else ""
        raise StackError(f"{name} exited at start{hint}: {(bind or ' | '.join(lines[-3:]))[-400:]}")
