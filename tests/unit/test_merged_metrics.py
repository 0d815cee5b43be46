"""worker all's API serves every role's metrics (issue 26 item 5): its own exposition and each role's, merged
into one family per name, a role's samples labelled with it, and which roles answered."""
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streams.adapters.http import merged_metrics


def exposition(value: float, name: str = "imagefork_tasks") -> str:
    registry = CollectorRegistry()
    Counter(name, "tasks", ["status"], registry=registry).labels("SUCCEEDED").inc(value)
    return generate_latest(registry).decode()


def test_one_family_per_name_each_peer_sample_with_its_role_and_who_answered():
    text = merged_metrics(exposition(0, "imagefork_api_only"), {"resize": exposition(3), "planner": exposition(1),
                                                                  "join": None}).decode()
    assert text.count("# TYPE imagefork_tasks_total counter") == 1  # one family, a valid exposition
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("imagefork_tasks_total", (("role", "resize"), ("status", "SUCCEEDED")))] == 3
    assert samples[("imagefork_tasks_total", (("role", "planner"), ("status", "SUCCEEDED")))] == 1
    assert samples[("imagefork_api_only_total", (("status", "SUCCEEDED"),))] == 0  # the API's own: no role
    assert samples[("imagefork_metrics_peer_up", (("role", "join"),))] == 0
    assert samples[("imagefork_metrics_peer_up", (("role", "resize"),))] == 1
