"""Hosts on one machine (issue 22): each broker and worker on a host of its own, for the cluster tests and
``bench/``.

A host is a network namespace with one address on a bridge this harness creates, and a CPU quota of its
own (a cgroup of the v1 ``cpu`` controller; ``cpuacct`` counts what it used), so that a host's CPU and its
network link are separate as on real machines. The addresses are a /24 of 198.18.0.0/15 (RFC 2544: the
range reserved for network benchmarks), live only on this bridge and in these namespaces, and nothing is
routed beyond the bridge: a namespace has its /24 and no default route. The tester (this process, in the
machine's own namespace) has the bridge's address, .1, to submit requests and read results.

Root only. ``Hosts`` tears down all it made on ``close`` (and at exit); a harness whose owner died (a
SIGKILLed test run) is torn down by the next one that starts (``sweep``). What runs on a host is killed
with it: every process left in its namespace.

    with Hosts() as hosts:
        broker = hosts.add("kafka-1")
        resize = hosts.add("resize-1", cpu=0.25)
        proc = resize.popen(["python", "-m", "streams", "worker", "resize"], env=...)
        resize.cut()       # its link down; .restore() brings it back
        resize.netem("delay 200ms loss 5%")   # where the kernel has sch_netem
        resize.shape("1mbit", loss=0.1)       # anywhere: tbf and iptables' statistic match
"""
from __future__ import annotations

import atexit
import base64
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

RANGE = ipaddress.ip_network("198.18.0.0/15")
CPU = Path("/sys/fs/cgroup/cpu")
CPUACCT = Path("/sys/fs/cgroup/cpuacct")
REGISTRY = Path("/run/imagefork-hosts")  # one record per live harness: its owner pid and what it made
PERIOD_US = 100_000


class HostsUnavailable(RuntimeError):
    """This machine cannot make hosts (not root, no iproute2, no namespaces): the reason."""


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "the hosts need root (network namespaces, a bridge, cgroups)"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"{tool} is not installed (Debian's iproute2)"
    if not (CPU / "cgroup.procs").exists():
        return f"no cgroup v1 cpu controller at {CPU}"
    probe = f"ifkprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise HostsUnavailable(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Host:
    name: str
    netns: str
    address: str
    veth: str  # the bridge's end of the host's link (the host's own end is eth0 inside the namespace)
    cpu: float | None  # cores (the cgroup's quota), None: no limit
    cgroups: list[Path] = field(default_factory=list)

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command on this host: in its cgroups (inherited by every child),
        then in its network namespace. nsenter enters that namespace alone: ``ip netns exec`` would also
        mount a sysfs of its own, and /sys/fs/cgroup, where a worker reads its quota, would be empty."""
        joins = "; ".join(f"echo $$ > {c}/cgroup.procs" for c in self.cgroups)
        return ["/bin/sh", "-c", f'{joins}; exec nsenter --net=/run/netns/{self.netns} "$@"', self.name]

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen([*self.prefix(), *argv], **kw)

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every process on this host (SIGSTOP pauses the host, SIGCONT resumes it)."""
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def cut(self) -> None:
        """The host's link goes down (at the bridge's end): nothing in or out, its processes keep running."""
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        _ip("link", "set", self.veth, "up")
        self.netem(None)

    def netem(self, spec: str | None) -> None:
        """``tc netem`` on the host's own end of the link (what it sends), e.g. "delay 200ms 50ms loss 5%";
        None removes it."""
        if spec is None:
            subprocess.run(["ip", "netns", "exec", self.netns, "tc", "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True)
            return
        proc = subprocess.run(["ip", "netns", "exec", self.netns, "tc", "qdisc", "replace", "dev", "eth0",
                               "root", "netem", *spec.split()], capture_output=True, text=True)
        if proc.returncode != 0:
            raise HostsUnavailable(f"tc netem {spec}: {proc.stderr.strip()}")

    def adopt(self, pid: int) -> None:
        """Move a running process (all its threads, and the children it starts from now on) into this
        host's cgroups: its CPU quota, not its network. ``release`` moves it back."""
        for c in self.cgroups:
            (c / "cgroup.procs").write_text(str(pid))

    def release(self, pid: int) -> None:
        for c in self.cgroups:
            (c.parents[1] / "cgroup.procs").write_text(str(pid))

    def shape(self, rate: str | None, loss: float = 0.0) -> None:
        """A slow, lossy link without netem (a kernel without sch_netem, as this machine's): ``tbf`` caps what
        the host sends at ``rate`` (e.g. "1mbit"; its queue is the delay), and iptables' statistic match
        drops ``loss`` (0-1) of the packets in and out, in the host's own namespace. ``shape(None)``
        removes both."""
        def run(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True)
        run("tc", "qdisc", "del", "dev", "eth0", "root")
        run("iptables", "-F", "INPUT")
        run("iptables", "-F", "OUTPUT")
        if rate is None:
            return
        steps = [("tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "32kbit",
                  "latency", "400ms")]
        if loss:
            steps += [("iptables", "-A", chain, "-m", "statistic", "--mode", "random", "--probability", str(loss),
                       "-j", "DROP") for chain in ("INPUT", "OUTPUT")]
        for step in steps:
            proc = run(*step)
            if proc.returncode != 0:
                raise HostsUnavailable(f"{' '.join(step)}: {proc.stderr.strip()}")

    def cpu_seconds(self) -> float:
        """CPU time used on this host so far (cpuacct)."""
        for c in self.cgroups:
            usage = c / "cpuacct.usage"
            if usage.exists():
                return int(usage.read_text()) / 1e9
        return 0.0


class Hosts:
    def __init__(self):
        reason = unavailable()
        if reason:
            raise HostsUnavailable(reason)
        sweep()
        REGISTRY.mkdir(parents=True, exist_ok=True)
        used = _ip("-o", "-4", "addr").stdout
        links = _ip("-o", "link").stdout
        for k in range(1, 255):
            if f" 198.18.{k}." in used or f": ifk{k}:" in links:
                continue
            try:  # claimed by creating its record: two harnesses starting at once never take the same k
                os.close(os.open(REGISTRY / f"{k}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                continue
            self.k = k
            break
        else:
            raise HostsUnavailable("every 198.18.k.0/24 is in use")
        self.tag = f"ifk{self.k}"
        self.subnet = ipaddress.ip_network(f"198.18.{self.k}.0/24")
        assert self.subnet.subnet_of(RANGE)
        self.bridge = self.tag
        self.address = str(self.subnet.network_address + 1)  # the tester's
        self.hosts: dict[str, Host] = {}
        self.mounts: list[str] = []  # tmpfs disks mounted for hosts (HostStack's disk_mb), unmounted with them
        self.record = REGISTRY / f"{self.k}.json"
        self._save()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            # a machine with br_netfilter (Docker's) filters bridged traffic through FORWARD: let ours pass
            self._iptables("-I")
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)

    def _iptables(self, op: str) -> None:
        if shutil.which("iptables"):
            subprocess.run(["iptables", op, "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"],
                           capture_output=True)

    def _save(self) -> None:
        self.record.write_text(json.dumps({
            "owner": os.getpid(), "k": self.k, "bridge": self.tag, "mounts": self.mounts,
            "hosts": [{"netns": h.netns, "veth": h.veth, "cgroups": [str(c) for c in h.cgroups]}
                      for h in self.hosts.values()]}))

    def add(self, name: str, cpu: float | None = None) -> Host:
        """A new host: its namespace, its link to the bridge, its address, its cgroups (a quota of ``cpu``
        cores when given)."""
        i = len(self.hosts) + 2
        if i > 254:
            raise HostsUnavailable("254 hosts at most")
        netns = f"{self.tag}-{name}"
        veth = f"{self.tag}h{i}"
        host = Host(name, netns, str(self.subnet.network_address + i), veth, cpu)
        self.hosts[name] = host
        for root in (CPU, CPUACCT):
            if root.exists():
                host.cgroups.append(root / "imagefork" / netns)
        self._save()
        _ip("netns", "add", netns)
        _ip("link", "del", veth, check=False)  # one left by a harness whose namespace the kernel still held
        _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        _ip("link", "set", f"{veth}p", "netns", netns)
        _ip("-n", netns, "link", "set", f"{veth}p", "name", "eth0")
        _ip("-n", netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        for c in host.cgroups:
            c.mkdir(parents=True, exist_ok=True)
            if c.is_relative_to(CPU):
                (c / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (c / "cpu.cfs_quota_us").write_text(str(int(cpu * PERIOD_US)) if cpu else "-1")
        return host

    def close(self) -> None:
        if not getattr(self, "record", None):
            return
        _teardown({"bridge": self.tag, "mounts": self.mounts,
                   "hosts": [{"netns": h.netns, "veth": h.veth, "cgroups": [str(c) for c in h.cgroups]}
                             for h in self.hosts.values()]})
        self._iptables("-D")
        self.record.unlink(missing_ok=True)
        self.record = None

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _teardown(record: dict) -> None:
    for host in record.get("hosts", []):
        netns = host["netns"]
        out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
        for pid in out.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        # the link first: a namespace outlives its name while the kernel still holds it, and its end of the
        # link with it (seen here as veths left on the machine after their namespaces were deleted)
        if host.get("veth"):
            subprocess.run(["ip", "link", "del", host["veth"]], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        for c in host.get("cgroups", []):
            path = Path(c)
            for _ in range(50):  # a killed process leaves its cgroup when it is reaped
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
    subprocess.run(["ip", "link", "del", record["bridge"]], capture_output=True)
    for mount in record.get("mounts", []):
        subprocess.run(["umount", "-l", mount], capture_output=True)


def sweep() -> None:
    """Tear down what harnesses whose owner is gone left behind."""
    for path in REGISTRY.glob("*.json") if REGISTRY.exists() else []:
        try:
            record = json.loads(path.read_text())
            owner = int(record["owner"])
        except (OSError, ValueError, KeyError):
            if time.time() - path.stat().st_mtime > 60:  # a claim never filled in: its harness died at once
                path.unlink(missing_ok=True)
            continue
        try:
            os.kill(owner, 0)
            continue  # its owner lives
        except ProcessLookupError:
            pass
        _teardown(record)
        if shutil.which("iptables"):
            subprocess.run(["iptables", "-D", "FORWARD", "-i", record["bridge"], "-o", record["bridge"],
                            "-j", "ACCEPT"], capture_output=True)
        path.unlink(missing_ok=True)


# --- a Kafka cluster and an S3 server on hosts --------------------------------------------------------------
KAFKA_PORT, CONTROLLER_PORT, S3_PORT = 9092, 9093, 8080


class HostStack:
    """A KRaft cluster of ``brokers`` nodes (each broker and controller, as ``imagefork stack up --brokers``)
    and S3Proxy, each on a host of its own, in ``folder``; its ``env`` is what a worker needs to reach them
    (over the bridge only)."""

    def __init__(self, hosts: Hosts, folder: Path, brokers: int = 3, broker_cpu: float | None = None,
                 disk_mb: int | None = None):
        """``disk_mb``: each node's data folder is a tmpfs of that size (a disk that can fill up)."""
        from streams.stack import local
        self.hosts = hosts
        self.folder = folder
        self.brokers = brokers
        folder.mkdir(parents=True, exist_ok=True)
        self.java = local.find_java()
        self.kafka_libs = local.fetch("kafka")
        self.s3_libs = local.fetch("s3proxy")
        self.marker = f"-Dimagefork.hosts={folder}"
        self.kafka_hosts = {n: hosts.add(f"kafka-{n}", cpu=broker_cpu) for n in range(1, brokers + 1)}
        self.s3_host = hosts.add("s3")
        self.procs: dict[str, subprocess.Popen] = {}
        ports = {}
        for n in range(1, brokers + 1):
            suffix = local.node_suffix(n)
            ports.update({f"{p}{suffix}": KAFKA_PORT for p in ("kafka", "sasl", "ssl", "sasl_ssl")})
            ports[f"controller{suffix}"] = CONTROLLER_PORT
        addresses = {n: h.address for n, h in self.kafka_hosts.items()}
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.base = local.kafka_command(self.java, self.marker, self.kafka_libs, folder)
        self.props = {}
        self.mounts: list[Path] = []
        for n in range(1, brokers + 1):
            data = folder / f"kafka-data-{n}"
            if disk_mb:
                data.mkdir(parents=True, exist_ok=True)
                proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={disk_mb}m", "tmpfs", str(data)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    self.close()
                    raise HostsUnavailable(f"mount a {disk_mb} MB tmpfs: {proc.stderr.strip()}")
                self.mounts.append(data)
                hosts.mounts.append(str(data))
                hosts._save()
            props = folder / f"server-{n}.properties"
            props.write_text(local.kafka_properties(n, brokers, ports, data, None, "", addresses=addresses))
            self.props[n] = props
            proc = subprocess.run(self.base + ["kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                                               "-c", str(props)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise HostsUnavailable(f"Kafka format failed: {(proc.stdout + proc.stderr)[-300:]}")
        self.bootstrap = ",".join(f"{h.address}:{KAFKA_PORT}" for h in self.kafka_hosts.values())
        self.env = {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                    "S3_ENDPOINT_URL": f"http://{self.s3_host.address}:{S3_PORT}",
                    "AWS_ACCESS_KEY_ID": local.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": local.SECRET_KEY,
                    "AWS_REGION": "us-east-1", "S3_BUCKET": local.BUCKET}
        try:
            for n in self.kafka_hosts:
                self.start_kafka(n, wait=False)
            self.procs["s3"] = self.s3_host.popen(
                local.s3proxy_argv(self.java, self.marker, self.s3_libs, folder,
                                   f"http://{self.s3_host.address}:{S3_PORT}"),
                stdout=open(folder / "s3proxy.log", "ab"), stderr=subprocess.STDOUT)
            self.wait_kafka()
            self.wait_s3()
        except BaseException:
            self.close()
            raise

    def wait_s3(self, timeout: float = 120.0) -> None:
        """S3Proxy answers HTTP on its host."""
        import socket
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex((self.s3_host.address, S3_PORT)) == 0:
                    return
            if self.procs["s3"].poll() is not None or time.monotonic() > deadline:
                raise HostsUnavailable(f"S3Proxy on its host did not answer: "
                                       f"{(self.folder / 's3proxy.log').read_text()[-800:]}")
            time.sleep(0.3)

    def start_kafka(self, node: int, wait: bool = True) -> None:
        log = open(self.folder / f"kafka-{node}.log", "ab")
        self.procs[f"kafka-{node}"] = self.kafka_hosts[node].popen(
            self.base + ["kafka.Kafka", str(self.props[node])], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_kafka()

    def kill_kafka(self, node: int) -> None:
        proc = self.procs.pop(f"kafka-{node}", None)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended on its own (say, its disk filled up)
                pass
            proc.wait(30)

    def wait_kafka(self, timeout: float = 120.0) -> None:
        """Every node registered, and the metadata answers."""
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "logger": _quiet()})
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(admin.list_topics(timeout=5).brokers) >= self.brokers:
                    return
            except Exception:
                pass
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise HostsUnavailable(f"{name} exited: {(self.folder / f'{name}.log').read_text()[-800:]}")
            if time.monotonic() > deadline:
                raise HostsUnavailable(f"the cluster on hosts did not answer within {timeout:.0f}s")
            time.sleep(0.5)

    def leader_of(self, topic: str, partition: int) -> int:
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "logger": _quiet()})
        return admin.list_topics(topic, timeout=30).topics[topic].partitions[partition].leader

    def coordinator_of(self, group: str) -> int:
        """The node id of consumer group ``group``'s coordinator."""
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "logger": _quiet()})
        return admin.describe_consumer_groups([group])[group].result(30).coordinator.id

    def cpu_seconds(self) -> dict[str, float]:
        return {h.name: h.cpu_seconds() for h in [*self.kafka_hosts.values(), self.s3_host]}

    def close(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        for data in getattr(self, "mounts", []):
            subprocess.run(["umount", "-l", str(data)], capture_output=True)
            if str(data) in self.hosts.mounts:
                self.hosts.mounts.remove(str(data))
        self.mounts = []

    def fill_disk(self, node: int) -> Path:
        """Fill node ``node``'s data folder (a tmpfs: ``disk_mb``) to the last byte; the file, to free it."""
        filler = self.folder / f"kafka-data-{node}" / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        return filler


def _quiet():
    import logging
    logger = logging.getLogger("imagefork.hosts.kafka")
    logger.setLevel(logging.CRITICAL)
    return logger
