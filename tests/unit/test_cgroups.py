"""A worker sizes itself by its container's limits (streams/cgroups.py): cgroup trees written here, as v2,
v1 and the hybrid lay them out, with the process's own folder below the mount or at its root."""
import os

import pytest

from streams.cgroups import cpu_cores, cpu_limit, memory_limit
from streams.config import Config


def tree(tmp_path, files: dict[str, str], proc: str) -> tuple[str, str]:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    (tmp_path / "self-cgroup").write_text(proc)
    return str(tmp_path), str(tmp_path / "self-cgroup")


def test_v2_the_limits_of_the_process_own_folder(tmp_path):
    root, proc = tree(tmp_path, {"cpu.max": "max 100000", "memory.max": "max",
                                 "kubepods/pod1/cpu.max": "150000 100000",
                                 "kubepods/pod1/memory.max": str(512 << 20)}, "0::/kubepods/pod1\n")
    assert cpu_limit(root, proc) == 1.5
    assert memory_limit(root, proc) == 512 << 20
    assert cpu_cores(root, proc) == min(2, len(os.sched_getaffinity(0)))


def test_a_parents_limit_binds_the_folders_under_it(tmp_path):
    root, proc = tree(tmp_path, {"kubepods/cpu.max": "25000 100000", "kubepods/pod1/cpu.max": "max 100000",
                                 "kubepods/memory.max": str(1 << 30), "kubepods/pod1/memory.max": str(2 << 30)},
                      "0::/kubepods/pod1\n")
    assert cpu_limit(root, proc) == 0.25
    assert cpu_cores(root, proc) == 1  # a quarter of a core still runs one thread
    assert memory_limit(root, proc) == 1 << 30


def test_v1_quota_over_period_on_the_cpu_mount_as_docker_and_the_hosts_harness_lay_it_out(tmp_path):
    root, proc = tree(tmp_path, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000",
                                 "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
                                 "memory/docker/abc/memory.limit_in_bytes": str(768 << 20)},
                      "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpu_limit(root, proc) == 1.0
    assert cpu_cores(root, proc) == 1
    assert memory_limit(root, proc) == 768 << 20


def test_a_namespaced_container_sees_its_own_limits_at_the_mounts_root(tmp_path):
    # docker with its own cgroup namespace: /proc/self/cgroup says "/", the mount is the container's folder
    root, proc = tree(tmp_path, {"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"},
                      "2:cpu:/\n")
    assert cpu_limit(root, proc) == 0.5


def test_no_limits_anywhere(tmp_path):
    root, proc = tree(tmp_path, {"cpu.max": "max 100000", "cpu/cpu.cfs_quota_us": "-1",
                                 "cpu/cpu.cfs_period_us": "100000", "memory/memory.limit_in_bytes": str(1 << 62)},
                      "2:cpu:/\n1:memory:/\n0::/\n")
    assert cpu_limit(root, proc) is None and memory_limit(root, proc) is None
    assert cpu_cores(root, proc) == len(os.sched_getaffinity(0))
    assert cpu_limit(root, str(tmp_path / "no-such-proc")) is None  # no /proc: the mounts themselves


@pytest.mark.parametrize("garbage", ["", "max", "abc 100000", "-5 100000", "100000 0"])
def test_unreadable_quotas_are_no_limit(tmp_path, garbage):
    root, proc = tree(tmp_path, {"cpu.max": garbage}, "0::/\n")
    assert cpu_limit(root, proc) is None


def test_resize_is_sized_by_the_cores_it_may_use(monkeypatch):
    monkeypatch.setattr("streams.config.cpu_cores", lambda: 1)
    assert Config().resize_slots == 3 and Config().resize_processes == 1
    monkeypatch.setattr("streams.config.cpu_cores", lambda: 4)
    assert Config().resize_slots == 12 and Config().resize_processes == 4
    assert Config(resize_concurrency=2).resize_slots == 2 and Config(resize_concurrency=2).resize_processes == 2
