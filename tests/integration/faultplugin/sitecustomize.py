"""Test-only faults: an unexpected error inside the planner, for one magic workflow id; a join whose
first ``send_offsets_to_transaction`` never returns.

A process started with this folder on PYTHONPATH and ``IMAGEFORK_FAULT_WORKFLOW_ID`` set patches
``streams.agents.planner.plan_tasks`` (the planner's fan-out, after validation and staging) as soon as
that module is imported, so that planning the magic workflow raises ``RuntimeError`` (a bug nobody
classified). Only ``imagefork worker planner`` processes are patched. Each time the fault fires a line
is appended to ``IMAGEFORK_FAULT_LOG`` (if set), so a test can count the attempts.

A join started with ``IMAGEFORK_FAULT_JOIN_HANG=1`` gets a producer class whose first
``send_offsets_to_transaction`` call (in the whole process) blocks forever, as librdkafka's did across a
broker restart (librdkafka #5456); the join gives up on such a call after
``IMAGEFORK_FAULT_JOIN_PATIENCE_S`` (default 3) instead of its production patience. Each hang appends
``join-hang`` to ``IMAGEFORK_FAULT_LOG``.

Any other ``sitecustomize.py`` later on PYTHONPATH (e.g. ``tests/integration/crashplugin``) is run too,
so the plugins combine.
"""
import importlib.abc
import os
import sys
import threading

MAGIC = os.environ.get("IMAGEFORK_FAULT_WORKFLOW_ID", "")
JOIN_HANG = os.environ.get("IMAGEFORK_FAULT_JOIN_HANG", "") == "1"
FAULT_LOG = os.environ.get("IMAGEFORK_FAULT_LOG", "")
HERE = os.path.dirname(os.path.abspath(__file__))


def _role() -> str:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    return argv[-1] if argv[-2:-1] == ["worker"] else ""


def _record(line: str) -> None:
    if FAULT_LOG:
        with open(FAULT_LOG, "a") as f:
            f.write(f"{line}\n")


def _patch_planner(module) -> None:
    real = module.plan_tasks

    def plan_tasks(request, workflow_id, *args, **kwargs):
        if workflow_id == MAGIC:
            _record(workflow_id)
            raise RuntimeError(f"injected planner fault for {workflow_id}")
        return real(request, workflow_id, *args, **kwargs)

    module.plan_tasks = plan_tasks


def _patch_join(module) -> None:
    hung = threading.Event()  # set once the one hang has begun

    class HangingProducer(module.Producer):
        def send_offsets_to_transaction(self, *args, **kwargs):
            if not hung.is_set():
                hung.set()
                _record("join-hang")
                threading.Event().wait()  # forever
            return super().send_offsets_to_transaction(*args, **kwargs)

    module.Producer = HangingProducer
    module.Session.CALL_PATIENCE_S = float(os.environ.get("IMAGEFORK_FAULT_JOIN_PATIENCE_S", "3"))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds a module with the other finders, and patches it right after it is executed."""

    def __init__(self, target: str, patch):
        self.target, self.patch = target, patch

    def find_spec(self, name, path, target=None):
        if name != self.target:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _chain() -> None:
    """Run the next sitecustomize.py on sys.path (only the first one found is imported by Python)."""
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == HERE:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            namespace = {"__name__": "_chained_sitecustomize", "__file__": candidate}
            with open(candidate) as f:
                exec(compile(f.read(), candidate, "exec"), namespace)
            return


if MAGIC and _role() == "planner":
    sys.meta_path.insert(0, _PatchOnImport("streams.agents.planner", _patch_planner))
if JOIN_HANG and _role() == "join":
    sys.meta_path.insert(0, _PatchOnImport("streams.join.session", _patch_join))
_chain()
