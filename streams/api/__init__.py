"""``imagefork api``: the HTTP API and the dashboard (aiohttp).

- A workflow's status comes from the join's state: the API finds the join process that owns the
  workflow's partition in the join group's description (each join's client id carries the URL of its
  own endpoints) and asks it (``/internal/workflows/{id}``). During a rebalance it asks again until the
  new owner has restored the partition. A finished workflow's document is its final event, read from
  the completed topic into an index this process keeps.
- Requests are validated like the planner does, then produced to the request topic.
- A retry produces the finished run's request again with a ``retry`` field: the planner runs only the
  failed and timed-out tasks, the join opens the workflow again with the kept outputs, and the new
  final event lists every output.

Modules: ``routes`` (the aiohttp application and handlers, the event stream), ``directory`` (a
workflow's status document; no aiohttp, no Kafka), ``index`` (the completed topic) and ``router`` (the
join that owns a workflow, asked over HTTP).
"""
from __future__ import annotations

import logging
import socket

from aiohttp import web

from streams.adapters.lag import register_lag
from streams.api.auth import Gate, check_exposure
from streams.api.routes import Api
from streams.config import Config, parse_host_port
from streams.errors import StartError

log = logging.getLogger("imagefork")


def check_listen(host: str, port: int) -> None:
    """A taken or impossible address is one line (StartError), not aiohttp's traceback."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _name, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise StartError(f"the API cannot listen on {host}:{port} (IMAGEFORK_API_LISTEN): "
                         f"{exc.strerror or exc}") from None


def preflight(config: Config) -> None:
    """What stops the API before it touches Kafka, each in one line: no tokens on a foreign address, a
    token file it cannot use, an address it cannot listen on."""
    host, port = parse_host_port(config.api_listen)
    check_exposure(config, host)
    Gate(config)
    check_listen(host, port)


def run(config: Config) -> int:
    host, port = parse_host_port(config.api_listen)
    register_lag(config, ["planner", "resize", "join"])  # the whole pipeline's lag on the API's /metrics
    check_listen(host, port)  # again: taken since the preflight
    api = Api(config)
    app = api.app()

    async def announce(_app):
        print(f"imagefork api: http://{host if host not in ('0.0.0.0', '') else '127.0.0.1'}:{port}/ "
              f"(dashboard; the API under /v1/workflows)", flush=True)
        log.info("imagefork ready: api on %s:%d", host, port)

    app.on_startup.append(announce)
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)
    return 0
