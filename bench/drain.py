"""A backlog that drains (issue 22, item 6): 10,000 tasks waiting on the cluster, a resize host added halfway.

Root only (tests/hosts.py): three Kafka nodes, S3Proxy, the planner, the join and the resize workers each on
a host of its own. The requests (``--requests`` of ``--width`` tiny jpg outputs each: 100 x 100 = 10,000
tasks) are all planned before any resize worker runs, so the tasks topic holds the whole backlog; then one
resize host of ``--cpu`` cores starts, and a second one once half the tasks are done. Sampled each second:
the resize group's lag (tasks not yet committed). Printed: tasks/s before and after the second host, the
seconds from its start until the drain runs faster (its rebalance), and the requests' latency p50/p99
(from the first resize start to each final event). Every request must end COMPLETED exactly once.
Writes docs/drain.json and docs/drain.md; the last line printed is
``drain: X tasks/s with 1 host, Y with 2 (Z.ZZx), faster Ns after the second started; p99 P s``.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale import Run, hosts_parser, log, no_hosts, write_report  # noqa: E402
from streams.adapters.objectstore import ObjectStore  # noqa: E402
from streams.client import Client, Follower  # noqa: E402
from streams.demo import SAMPLE  # noqa: E402
from tests.hosts import Hosts, HostStack  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def lag(run: Run, admin, probe) -> int:
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    topic, group = run.config.topics.tasks, run.config.group_id("resize")
    parts = sorted(admin.list_topics(topic, timeout=30).topics[topic].partitions)
    answer = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(
        group, [TopicPartition(topic, p) for p in parts])])[group].result(30)
    committed = {tp.partition: max(tp.offset, 0) for tp in answer.topic_partitions}
    return sum(probe.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] - committed.get(p, 0)
               for p in parts)


def rate(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Tasks per second between two times, from the lag samples."""
    inside = [(t, lag_) for t, lag_ in samples if start <= t <= end]
    if len(inside) < 2:
        return float("nan")
    return (inside[0][1] - inside[-1][1]) / (inside[-1][0] - inside[0][0])


def main() -> int:
    ap = hosts_parser(__doc__, 0.5)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--width", type=int, default=100, help="outputs per request")
    args = ap.parse_args()
    if no_hosts("drain.py"):
        return 2
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient
    from streams.adapters.kafka import client_config
    folder = Path(tempfile.mkdtemp(prefix="imagefork-drain-"))
    tasks = args.requests * args.width
    with Hosts() as hosts:
        stack = HostStack(hosts, folder / "stack", brokers=3)
        try:
            run = Run(hosts, stack, folder / "logs", partitions=8, IMAGEFORK_MAX_TASKS=str(max(1000, args.width)),
                      IMAGEFORK_WORKFLOW_TIMEOUT_S="3600")
            try:
                run.start("join", "join", None)
                run.start("planner", "planner", None)
                run.ready()
                store = ObjectStore(run.config)
                key = f"inputs/{run.config.namespace}sample.png"
                store.put(key, SAMPLE.read_bytes(), "image/png")
                request = {"fileLocation": f"s3://{run.config.bucket}/{key}", "outputFormats": ["jpg"],
                           "outputSizes": [{"width": 16 + i, "height": 16 + i} for i in range(args.width)]}
                client, follower = Client(run.config), Follower(run.config)
                admin = AdminClient(client_config(run.config))
                probe = Consumer(client_config(run.config, **{"group.id": f"{run.config.namespace}probe"}))
                ids = [client.submit(request) for _ in range(args.requests)]
                end = time.monotonic() + 600
                while True:  # the whole backlog planned: every task on the tasks topic
                    topic = run.config.topics.tasks
                    parts = admin.list_topics(topic, timeout=30).topics[topic].partitions
                    from confluent_kafka import TopicPartition
                    planned = sum(probe.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in parts)
                    if planned >= tasks or time.monotonic() > end:
                        break
                    time.sleep(1)
                log(f"backlog: {planned} tasks planned")
                first = run.start("resize", "resize1", args.cpu)
                started = time.perf_counter()
                samples: list[tuple[float, int]] = []
                second_at = None
                done: dict[str, float] = {}
                deadline = time.monotonic() + 3600
                while len(done) < len(ids) and time.monotonic() < deadline:
                    now = time.perf_counter() - started
                    samples.append((now, lag(run, admin, probe)))
                    if second_at is None and samples[-1][1] <= tasks / 2:
                        run.start("resize", "resize2", args.cpu)
                        second_at = now
                        log(f"half the backlog done at {now:.1f}s: a second resize host starts")
                    follower.pump(0.5, set(ids))
                    for wf in set(follower.finals) & set(ids) - done.keys():
                        done[wf] = time.perf_counter() - started
                assert first.alive()
                statuses = {f.status for wf, f in follower.finals.items() if wf in ids}
                if len(done) < len(ids) or statuses != {"COMPLETED"}:
                    raise RuntimeError(f"{len(done)} of {len(ids)} requests ended ({statuses})")
                follower.close()
                client.close()
                probe.close()
            finally:
                run.stop()
        finally:
            stack.close()
    total = max(done.values())
    before = rate(samples, 5.0, second_at)
    after_start = second_at + 1
    # when the drain got faster: the first 5 s window after the second start at 1.3x the rate before it
    faster_after = next((t - second_at for t, _ in samples if t > after_start
                         and rate(samples, t - 5, t) >= 1.3 * before), float("nan"))
    after = rate(samples, second_at + (faster_after if faster_after == faster_after else 10), total)
    latencies = list(done.values())
    report = {"tasks": tasks, "requests": args.requests, "cpu_per_host": args.cpu, "seconds": round(total, 1),
              "tasks_per_s_one_host": round(before, 1), "tasks_per_s_two_hosts": round(after, 1),
              "speedup": round(after / before, 2), "faster_after_s": round(faster_after, 1),
              "second_host_at_s": round(second_at, 1), "latency_p50_s": round(pct(latencies, 0.5), 1),
              "latency_p99_s": round(pct(latencies, 0.99), 1), "lag": [(round(t, 1), n) for t, n in samples]}
    write_report(args.out, "drain", report,
        "# A backlog that drains (bench/drain.py)\n\n"
        f"{tasks} tasks ({args.requests} requests of {args.width} jpg outputs, 16-{15 + args.width} px) on the "
        f"hosts' 3-node cluster; resize hosts of {args.cpu} core; the second starts when half is done.\n\n"
        "| | value |\n|---|---|\n"
        f"| tasks/s, one host | {report['tasks_per_s_one_host']} |\n"
        f"| tasks/s, two hosts | {report['tasks_per_s_two_hosts']} ({report['speedup']}x) |\n"
        f"| drain faster after the second host started | {report['faster_after_s']} s |\n"
        f"| whole drain | {report['seconds']} s |\n"
        f"| request latency p50 / p99 (from the first resize start) | {report['latency_p50_s']} / "
        f"{report['latency_p99_s']} s |\n")
    print(f"drain: {before:.0f} tasks/s with 1 host, {after:.0f} with 2 ({after / before:.2f}x), faster "
          f"{faster_after:.0f}s after the second started; p99 {report['latency_p99_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
