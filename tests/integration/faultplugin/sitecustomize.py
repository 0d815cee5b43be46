"""Test-only: an unexpected error inside the planner, for one magic workflow id.

A process started with this folder on PYTHONPATH and ``IMAGEFORK_FAULT_WORKFLOW_ID`` set patches
``streams.agents.planner.plan_tasks`` (the planner's fan-out, after validation and staging) as soon as
that module is imported, so that planning the magic workflow raises ``RuntimeError`` (a bug nobody
classified). Only ``imagefork worker planner`` processes are patched. Each time the fault fires a line
is appended to ``IMAGEFORK_FAULT_LOG`` (if set), so a test can count the attempts.

Any other ``sitecustomize.py`` later on PYTHONPATH (e.g. ``tests/integration/crashplugin``) is run too,
so the plugins combine.
"""
import importlib.abc
import os
import sys

TARGET = "streams.agents.planner"
MAGIC = os.environ.get("IMAGEFORK_FAULT_WORKFLOW_ID", "")
FAULT_LOG = os.environ.get("IMAGEFORK_FAULT_LOG", "")
HERE = os.path.dirname(os.path.abspath(__file__))


def _is_planner() -> bool:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    return argv[-2:] == ["worker", "planner"]


def _patch(module) -> None:
    real = module.plan_tasks

    def plan_tasks(request, workflow_id, *args, **kwargs):
        if workflow_id == MAGIC:
            if FAULT_LOG:
                with open(FAULT_LOG, "a") as f:
                    f.write(f"{workflow_id}\n")
            raise RuntimeError(f"injected planner fault for {workflow_id}")
        return real(request, workflow_id, *args, **kwargs)

    module.plan_tasks = plan_tasks


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the planner module with the other finders, and patches it right after it is executed."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
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
            _patch(module)

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


if MAGIC and _is_planner():
    sys.meta_path.insert(0, _PatchOnImport())
_chain()
