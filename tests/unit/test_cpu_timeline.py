"""bench/cpu_timeline.py's reading of the scheduler's switches: which thread ran on which CPU and when, summed
per 10 ms by process."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "cpu_timeline", Path(__file__).resolve().parents[2] / "bench" / "cpu_timeline.py")
cpu_timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_timeline)
busy, parse_switches = cpu_timeline.busy, cpu_timeline.parse_switches


def switch(cpu: int, ts: float, prev: tuple[str, int], nxt: tuple[str, int]) -> str:
    """A line as ``perf script -F cpu,time,event,trace`` prints a sched_switch."""
    return (f"[{cpu:03d}] {ts:14.6f}: sched:sched_switch: prev_comm={prev[0]} prev_pid={prev[1]} prev_prio=120 "
            f"prev_state=S ==> next_comm={nxt[0]} next_pid={nxt[1]} next_prio=120")


IDLE0, IDLE1, A, B, C2 = ("swapper/0", 0), ("swapper/1", 0), ("python", 11), ("python", 12), ("C2 CompilerThre", 21)
PERF = "\n".join([
    switch(0, 100.000, IDLE0, A), switch(1, 100.005, IDLE1, C2), switch(0, 100.015, A, IDLE0),
    switch(1, 100.025, C2, B), switch(0, 100.020, IDLE0, A), switch(0, 100.030, A, IDLE0),
    switch(1, 100.040, B, IDLE1), "not a switch line"])
WHO = {11: ("resize", "python"), 12: ("join", "python"), 21: ("kafka", "C2 CompilerThre")}


def test_switch_lines_are_read_with_spaces_in_thread_names():
    switches = parse_switches(PERF)
    assert len(switches) == 7
    assert switches[1] == (1, 100.005, 0, 21)
    assert switches[3] == (1, 100.025, 21, 12)


def test_cpu_time_is_summed_per_bucket_and_per_thread():
    buckets, threads = busy(parse_switches(PERF), 100.0, 100.035, WHO.__getitem__)
    # resize ran 0-15 and 20-30 ms on CPU 0; kafka 5-25 ms on CPU 1; join from 25 ms to the window's end (35)
    assert threads == pytest.approx({("resize", "python"): 25.0, ("kafka", "C2 CompilerThre"): 20.0,
                                     ("join", "python"): 10.0})
    assert buckets[0] == pytest.approx({"resize": 10.0, "kafka": 5.0})
    assert buckets[1] == pytest.approx({"resize": 5.0, "kafka": 10.0})
    assert buckets[2] == pytest.approx({"resize": 10.0, "kafka": 5.0, "join": 5.0})
    assert buckets[3] == pytest.approx({"join": 5.0})
    assert sum(sum(b.values()) for b in buckets.values()) == pytest.approx(55.0)


def test_a_span_ending_on_a_bucket_edge_ends():
    """A float landing exactly on a bucket's edge once looped forever (its bucket was the one before)."""
    t0 = 28645.091906
    switches = [(0, t0 - 0.001, 0, 0), (0, t0 + 0.01 * 3, 0, 7), (0, t0 + 0.01 * 7, 7, 0)]
    buckets, _ = busy(switches, t0, t0 + 1.0, lambda tid: ("x", "t"))
    assert sum(b["x"] for b in buckets.values()) == pytest.approx(40.0)
    assert all(b["x"] <= 10.0 + 1e-6 for b in buckets.values())


def test_what_runs_across_the_windows_edges_counts_inside_it():
    """A CPU's first switch away from a thread: it ran since the window began (the recording began before it);
    a thread switched to and still running at the window's end: it ran until then."""
    switches = [(1, 99.990, 0, 0), (0, 100.020, 11, 0), (1, 100.030, 0, 12)]
    buckets, threads = busy(switches, 100.0, 100.050, WHO.__getitem__)
    assert threads == pytest.approx({("resize", "python"): 20.0, ("join", "python"): 20.0})
    assert buckets[0] == pytest.approx({"resize": 10.0}) and buckets[3] == pytest.approx({"join": 10.0})


def test_a_recording_that_began_late_is_refused():
    with pytest.raises(ValueError, match="began after"):
        busy([(0, 100.010, 0, 11)], 100.0, 100.050, WHO.__getitem__)


def test_switches_in_another_form_are_an_error_not_an_empty_timeline():
    plugin = "[000] 100.000000: sched:sched_switch: python:11 [120] S ==> swapper/0:0 [120]"
    with pytest.raises(ValueError, match="not in the expected form"):
        parse_switches(plugin)
    assert parse_switches("nothing recorded") == []
