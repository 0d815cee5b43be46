"""The presets topic (compacted, key: a preset's name, value: Avro ``Preset``; a tombstone deletes one):
read whole and followed by the planner and the API (``PresetTable``), written by ``imagefork presets`` and
the API (``put_preset``, ``delete_preset``). Every host reads the same topic, so every host sees the same
version of a preset; a file is only a seed (``imagefork presets load``)."""
from __future__ import annotations

import logging
import math
import threading
import time

from confluent_kafka import Producer

from streams import serde
from streams.adapters.kafka import committed_records, producer_config, read_to_end
from streams.adapters.schemas import publish_schemas
from streams.config import Config
from streams.core.models import Preset, now_ms
from streams.core.planning import parse_preset
from streams.core.presets import preset_from_record, preset_record, same_outputs
from streams.errors import ImageforkError

log = logging.getLogger("imagefork")


class PresetsUnavailable(ImageforkError, RuntimeError):
    """The presets topic cannot be read or written now (the broker away)."""


def _take(table: dict[str, Preset], msg, versions: dict[str, int] | None = None) -> None:
    """One record of the topic into ``table`` (and the last version each name had, deleted or not, into
    ``versions``)."""
    name = (msg.key() or b"").decode("utf-8", "replace")
    if msg.value() is None:
        table.pop(name, None)
        return
    try:
        record = serde.decode("Preset", msg.value())
        preset = preset_from_record(record)
    except Exception as exc:  # not a preset we can use: skipped, said once
        log.warning("presets: %s/%d/%d is not a preset (%s): skipped", msg.topic(), msg.partition(), msg.offset(),
                    str(exc)[:200])
        return
    if preset.name != name:
        return
    if versions is not None:
        versions[name] = max(versions.get(name, 0), preset.version)
    if record.get("deleted"):
        table.pop(name, None)
    else:
        table[name] = preset


def read_presets(config: Config, timeout: float = 30.0, versions: dict[str, int] | None = None) -> dict[str, Preset]:
    """Every preset on the topic now (and, into ``versions``, the last version of every name it held)."""
    table: dict[str, Preset] = {}
    try:
        for msg in read_to_end(config, config.topics.presets, timeout):
            _take(table, msg, versions)
    except Exception as exc:
        raise PresetsUnavailable(f"{config.topics.presets} cannot be read: {exc}") from None
    return table


class PresetTable:
    """The presets, read whole in a thread and then followed; ``caught_up`` once the whole topic was read."""

    def __init__(self, config: Config):
        self.config = config
        self.presets: dict[str, Preset] = {}
        self.lock = threading.Lock()
        self.caught_up = threading.Event()
        self.stopping = False
        self.refreshing = threading.Lock()
        self.refreshed_at = 0.0

    def start(self) -> "PresetTable":
        threading.Thread(target=self._run, name="presets", daemon=True).start()
        return self

    def _run(self) -> None:
        while not self.stopping:
            table: dict[str, Preset] = {}
            try:
                def reached():
                    with self.lock:
                        self.presets = dict(table)
                    self.caught_up.set()
                for msg in committed_records(self.config, self.config.topics.presets, follow=True, timeout=math.inf,
                                             on_end=reached, stop=lambda: self.stopping):
                    _take(table, msg)
                    if self.caught_up.is_set():
                        with self.lock:
                            self.presets = dict(table)
            except Exception as exc:  # the broker away: read again from the start
                log.warning("presets: reading %s failed (%s); again in 2s", self.config.topics.presets, exc)
                time.sleep(2)

    def all(self) -> dict[str, Preset]:
        with self.lock:
            return dict(self.presets)

    def for_name(self, name: str, timeout: float = 30.0) -> dict[str, Preset] | None:
        """The presets to resolve ``name`` with: the table once read whole, and read again to the topic's end
        if it does not hold ``name`` (one written a moment ago); None when the topic cannot be read."""
        if not self.caught_up.wait(timeout):
            return None
        table = self.all()
        if name.strip() in table:
            return table
        with self.refreshing:  # one read of the topic at a time, and at most one a second: a flood of
            if time.monotonic() - self.refreshed_at < 1.0:  # unknown names costs one read, not one each
                return self.all()
            try:
                fresh = read_presets(self.config, timeout)
            except PresetsUnavailable:
                return None
            self.refreshed_at = time.monotonic()
        with self.lock:
            self.presets.update(fresh)
        return fresh


def _produce(config: Config, name: str, value: bytes | None, timeout: float) -> None:
    errors: list[str] = []
    producer = Producer(producer_config(config))
    producer.produce(config.topics.presets, key=name.encode(), value=value,
                     on_delivery=lambda err, _msg: err is not None and errors.append(str(err)))
    if producer.flush(timeout) or errors:
        raise PresetsUnavailable(f"{config.topics.presets} did not take preset {name!r}: "
                                 f"{errors[0] if errors else 'timed out'}")


def put_preset(config: Config, name: str, doc: dict, timeout: float = 30.0) -> tuple[Preset, bool]:
    """Define or change preset ``name`` from a document of formats, sizes and options (RequestInvalid when
    it is not one): its next version, or the current one unchanged when it asks for the same outputs."""
    versions: dict[str, int] = {}
    current = read_presets(config, timeout, versions).get(name)
    lim = config.limits
    description = doc.get("description", "") if isinstance(doc, dict) else ""
    preset = parse_preset(doc, name, versions.get(name, 0) + 1, max_dimension=lim.max_dimension,
                          max_tasks=lim.max_tasks, max_pixels=lim.max_pixels,
                          description=description, updated_at=now_ms())
    if current is not None and same_outputs(current, preset):
        return current, False
    publish_schemas(config)
    _produce(config, name, serde.encode("Preset", preset_record(preset)), timeout)
    now = read_presets(config, timeout).get(name)  # two writers at once: one of them is told
    if now is None or (now.version, now.updatedAt) != (preset.version, preset.updatedAt):
        raise PresetsUnavailable(f"preset {name!r} was changed by another writer at the same time (now "
                                 f"{f'version {now.version}' if now else 'deleted'}): look at it and put yours again")
    return preset, True


def delete_preset(config: Config, name: str, timeout: float = 30.0) -> Preset | None:
    """A tombstone for ``name``: the preset it deleted, or None when there was none."""
    current = read_presets(config, timeout).get(name)
    if current is not None:  # a record that keeps its last version (a tombstone would start it over)
        _produce(config, name, serde.encode("Preset", preset_record(current, deleted=True)), timeout)
    return current
