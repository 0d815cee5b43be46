"""The limits of this process's container (its cgroup): memory and CPU, as a worker sizes itself by them.

A cgroup's limit binds every cgroup under it, so each is the smallest set on this process's own cgroup
folder and the folders above it (v2 ``memory.max``/``cpu.max``, else v1's files), read from
``/proc/self/cgroup``; in a container with its own cgroup namespace that folder is the mount's root.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

ROOT = "/sys/fs/cgroup"


def _folders(root: str, controller: str, proc: str) -> list[Path]:
    """Where this process's ``controller`` files may be: its own folder first, then each parent up to the
    mount, under the v2 hierarchy and the v1 mount of the controller."""
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        lines = []
    found: list[Path] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2 (or the hybrid's unified tree)
            mounts = [Path(root), Path(root) / "unified"]
        elif controller in controllers.split(","):
            mounts = [Path(root) / controllers, Path(root) / controller]
        else:
            continue
        for mount in mounts:
            own = mount / path.strip("/")
            found += [own, *[p for p in own.parents if p.is_relative_to(mount)]]
    found += [Path(root), Path(root) / controller]  # no /proc (or a namespaced root): the mounts themselves
    return list(dict.fromkeys(found))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def memory_limit(root: str = ROOT, proc: str = "/proc/self/cgroup") -> int | None:
    """This process's cgroup memory limit in bytes (the smallest on its way up), or None when unlimited."""
    limits = []
    for folder in _folders(root, "memory", proc):
        for name in ("memory.max", "memory.limit_in_bytes"):
            text = _read(folder / name)
            if text and text.isdigit() and 0 < int(text) < (1 << 60):  # v1 says "unlimited" with a huge number
                limits.append(int(text))
    return min(limits, default=None)


def cpu_limit(root: str = ROOT, proc: str = "/proc/self/cgroup") -> float | None:
    """The cores this process's cgroup quota allows (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over its period;
    the smallest on its way up), or None when unlimited."""
    limits = []
    for folder in _folders(root, "cpu", proc):
        text = _read(folder / "cpu.max")
        quota, period = (text.split() + ["100000"])[:2] if text else (None, None)
        if quota is None:
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        try:
            q, p = int(quota), int(period)  # "max" (v2) and -1 (v1) mean no quota
        except (TypeError, ValueError):
            continue
        if q > 0 and p > 0:
            limits.append(q / p)
    return min(limits, default=None)


def cpu_cores(root: str = ROOT, proc: str = "/proc/self/cgroup") -> int:
    """The cores this process may use: the CPUs it may run on, at most its quota rounded up (a container
    given 1.5 cores runs two threads at once, one given 0.25 one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cpu_limit(root, proc)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(round(quota, 3))))
    return max(1, cores)
