"""Every process's own HTTP endpoints (aiohttp, in a thread of its own so it answers whatever the role's
loop is doing): ``/metrics`` (Prometheus text), ``/healthz`` (alive), ``/readyz`` (ready for work), and
the routes a role adds (the join's state queries, :mod:`streams.join.queries`).

Readiness is the role's own check (partitions assigned, state restored) and the reachability of the
broker and of S3, each probed at most every few seconds, off the event loop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from typing import Callable

from aiohttp import web
from confluent_kafka.admin import AdminClient
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from streams.adapters.kafka import client_config
from streams.adapters.objectstore import ObjectStore
from streams.config import Config, metrics_address, parse_host_port
from streams.errors import StartError


def json_error(status: int, code: str, message: str, **extra) -> web.Response:
    """Every error of imagefork's HTTP endpoints: ``{"error": CODE, "message": ..., ...}``."""
    return web.json_response({"error": code, "message": message, **extra}, status=status)


async def json_body(request, timeout_s: float) -> tuple[object, web.Response | None]:
    """A request's JSON body, or the error to answer instead: 408 for a body that has not arrived within
    ``timeout_s`` (one that trickles would hold a connection for ever), 400 for one that is not JSON (nested
    past the parser, an unknown charset) or cannot be read (a damaged Content-Encoding)."""
    try:
        return await asyncio.wait_for(request.json(loads=json.loads), timeout_s), None
    except asyncio.TimeoutError:
        return None, json_error(408, "REQUEST_TIMEOUT", f"the body did not arrive within {timeout_s:.0f}s")
    except (ValueError, UnicodeDecodeError, RecursionError, LookupError) as exc:
        return None, json_error(400, "INVALID_JSON", f"the body is not JSON: {type(exc).__name__}: {exc}"[:300])
    except web.RequestPayloadError as exc:
        return None, json_error(400, "INVALID_BODY", f"the body cannot be read: {exc}"[:300])


def path_part(request, name: str, valid: Callable[[str], bool], code: str, message: str) -> str:
    """A part of the path (``{name}``), or a 400 ``code`` raised when ``valid`` refuses it."""
    value = request.match_info[name]
    if not valid(value):
        raise web.HTTPBadRequest(text=json.dumps({"error": code, "message": message}),
                                 content_type="application/json")
    return value


def metrics_response(_request=None, body: bytes | None = None) -> web.Response:
    resp = web.Response(body=generate_latest(REGISTRY) if body is None else body)
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


def merged_metrics(own: str, peers: dict[str, str | None]) -> bytes:
    """One exposition of this process's metrics and its peers' (``worker all``: each role's, read from its
    own endpoint): a peer's samples get a ``role`` label, families of one name are one family, and
    ``imagefork_metrics_peer_up{role}`` says which peers answered (None: it did not)."""
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, object] = {}
    for family in text_string_to_metric_families(own):
        families[family.name] = family
    up = GaugeMetricFamily("imagefork_metrics_peer_up", "Whether a role's own /metrics answered this scrape "
                           "(worker all: the API's /metrics carries every role's)", labels=["role"])
    for role, text in peers.items():
        up.add_metric([role], 0 if text is None else 1)
        for family in text_string_to_metric_families(text or ""):
            labelled = [Sample(s.name, {**s.labels, "role": role}, s.value, s.timestamp, s.exemplar)
                        for s in family.samples]
            if family.name in families:
                families[family.name].samples.extend(labelled)
            else:
                family.samples = labelled
                families[family.name] = family
    families[up.name] = up

    class _Merged:
        def collect(self):
            return list(families.values())

    return generate_latest(_Merged())


async def peer_metrics(peers: dict[str, str], timeout_s: float = 2.0) -> dict[str, str | None]:
    """Each peer's /metrics text, read at once (None for a peer that did not answer in ``timeout_s``)."""
    import urllib.request

    def read(url: str) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as answer:
                return answer.read().decode("utf-8", "replace")
        except Exception:  # a role restarting, or gone: said by imagefork_metrics_peer_up
            return None

    texts = await asyncio.gather(*(asyncio.to_thread(read, url) for url in peers.values()))
    return dict(zip(peers, texts))


class Probe:
    """A reachability check run in a thread, its answer kept ``every_s``: a scrape storm costs one probe."""

    def __init__(self, check: Callable[[], None], every_s: float = 5.0):
        self.check, self.every_s = check, every_s
        self.at, self.error = 0.0, "not probed yet"
        self.lock = asyncio.Lock()

    async def __call__(self) -> str | None:
        async with self.lock:
            if time.monotonic() - self.at >= self.every_s:
                try:
                    await asyncio.wait_for(asyncio.to_thread(self.check), timeout=10)
                    self.error = None
                except asyncio.TimeoutError:
                    self.error = "no answer within 10s"
                except Exception as exc:  # the reason goes in the answer
                    self.error = f"{type(exc).__name__}: {exc}"[:300]
                self.at = time.monotonic()
            return self.error


def dependency_probes(config: Config) -> dict[str, Probe]:
    """The broker (metadata within 5 s) and S3 (the bucket answers)."""
    admin = AdminClient(client_config(config))
    store = ObjectStore(config, connect_timeout=3, read_timeout=5)

    def broker():
        admin.list_topics(topic=config.topics.events, timeout=5)

    def s3():
        store.client.head_bucket(Bucket=config.bucket)

    return {"broker": Probe(broker), "s3": Probe(s3)}


def health_routes(config: Config, role: str, ready: Callable[[], tuple[bool, str]]) -> list[web.RouteDef]:
    """``/healthz``: the process answers. ``/readyz``: 200 when the role says it is ready (``ready()``
    gives ``(ok, detail)``) and the broker and S3 answer; else 503, with each check's state."""
    probes: dict[str, Probe] = {}
    started = time.time()

    async def healthz(_request):
        return web.json_response({"status": "alive", "role": role, "uptimeSeconds": round(time.time() - started, 1)})

    async def readyz(_request):
        if not probes:
            probes.update(dependency_probes(config))
        ok, detail = ready()
        checks = {"role": {"ok": ok, "detail": detail}}
        for name, probe in probes.items():
            error = await probe()
            checks[name] = {"ok": error is None, **({"detail": error} if error else {})}
        all_ok = all(c["ok"] for c in checks.values())
        return web.json_response({"status": "ready" if all_ok else "not ready", "role": role, "checks": checks},
                                 status=200 if all_ok else 503)

    async def metrics(_request):
        if not config.metrics_peers:
            return metrics_response()
        texts = await peer_metrics(dict(config.metrics_peers))
        return metrics_response(body=merged_metrics(generate_latest(REGISTRY).decode(), texts))

    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]


def advertised_url(host: str, port: int, configured: str = "") -> str:
    """How other processes reach this one: ``IMAGEFORK_ADVERTISED_URL``, else the listen address (a
    wildcard listen address is advertised as this host's name, as in a container network)."""
    if configured:
        return configured.rstrip("/")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class ProcessServer:
    """An aiohttp server on its own event loop in a daemon thread."""

    def __init__(self, host: str, port: int, routes: list[web.RouteDef]):
        self.host, self.port = host, port
        self.app = web.Application()
        self.app.add_routes(routes)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> int:
        """Listen; the port bound (the one asked for, or the one the kernel chose for port 0)."""
        threading.Thread(target=self._run, name="http", daemon=True).start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self.port

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # the caller raises it
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()


def serve(config: Config, role: str, ready: Callable[[], tuple[bool, str]], routes: list[web.RouteDef] = (),
          default_listen: str = "") -> ProcessServer | None:
    """This process's endpoints on IMAGEFORK_METRICS_LISTEN (else ``default_listen``; neither: none)."""

    address = metrics_address(config) or (parse_host_port(default_listen) if default_listen else None)
    if address is None:
        return None
    server = ProcessServer(address[0], address[1], health_routes(config, role, ready) + list(routes))
    try:
        server.start()
    except OSError as exc:
        raise StartError(f"{role} cannot listen on {address[0]}:{address[1]} (IMAGEFORK_METRICS_LISTEN): "
                         f"{exc.strerror or exc}") from None
    logging.getLogger("imagefork").info("%s: http://%s:%d/metrics, /healthz, /readyz", role, server.host,
                                        server.port)
    return server
