"""What the pipeline has seen, by source bytes (pure: no I/O): the final events of workflows whose source
is known, grouped by its SHA-256, and found again by it or by a perceptual hash near theirs."""
from __future__ import annotations

from collections import OrderedDict

from streams.core.models import WorkflowCompleted
from streams.core.status import output_href


PER_SOURCE = 1000  # workflows listed per source, the latest


class SourceCatalog:
    """sha256 -> the source's facts and the workflows made from it (their latest final events), at most
    ``capacity`` workflows in all (the sources seen longest ago forgotten first)."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self.sources: OrderedDict[str, dict] = OrderedDict()
        self.phashes: dict[str, int] = {}
        self.count = 0

    def add(self, final: WorkflowCompleted) -> None:
        facts = final.facts
        if facts is None or not facts.sha256:
            return
        entry = self.sources.pop(facts.sha256, None) or {"facts": facts.to_dict(), "workflows": OrderedDict()}
        self.sources[facts.sha256] = entry
        entry["facts"] = facts.to_dict()
        workflows = entry["workflows"]
        self.count -= len(workflows)
        workflows.pop(final.workflowId, None)
        workflows[final.workflowId] = _summary(final)
        while len(workflows) > PER_SOURCE:  # a default avatar's thousands: the latest ones
            workflows.popitem(last=False)
        self.count += len(workflows)
        if facts.phash:
            try:
                self.phashes[facts.sha256] = int(facts.phash, 16)
            except ValueError:
                pass
        while self.count > self.capacity and len(self.sources) > 1:
            sha, old = self.sources.popitem(last=False)
            self.count -= len(old["workflows"])
            self.phashes.pop(sha, None)

    def source(self, sha256: str) -> dict | None:
        entry = self.sources.get(sha256)
        if entry is None:
            return None
        return {"sha256": sha256, "facts": entry["facts"], "workflows": list(reversed(entry["workflows"].values()))}

    def similar(self, phash: int, distance: int, limit: int) -> list[dict]:
        """The sources whose pHash is within ``distance`` bits of ``phash``, nearest first."""
        near = sorted((bin(phash ^ theirs).count("1"), sha) for sha, theirs in self.phashes.items())
        return [{"sha256": sha, "distance": d, "phash": self.sources[sha]["facts"].get("phash"),
                 "facts": self.sources[sha]["facts"], "workflows": len(self.sources[sha]["workflows"])}
                for d, sha in near if d <= distance][:limit]


def _summary(final: WorkflowCompleted) -> dict:
    return {"workflowId": final.workflowId, "runId": final.runId, "status": final.status,
            "completedAt": final.completedAt,
            "outputs": [{"taskRef": o.taskRef, "format": o.format, "width": o.width, "height": o.height,
                         "bytes": o.bytes, "s3Uri": o.s3Uri, "url": o.url, "reused": o.reused,
                         "href": output_href(final.workflowId, o.taskRef)} for o in final.outputs]}
