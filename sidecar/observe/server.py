"""The HTTP endpoint of the exporters: the standard library's `ThreadingHTTPServer`, a table of routes.

Bound to loopback unless the caller explicitly allows another address: the page and the metrics
show op names, pids and error messages, which are not for the whole network by default.
Only GET and HEAD are served; everything is read-only.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, urlsplit

from sidecar.errors import InvalidArgument

log = logging.getLogger(__name__)

__all__ = ["Response", "ObservabilityServer", "parse_address", "json_response", "static_file"]

Response = tuple[int, str, bytes]              # status, content type, body
Route = Callable[[Mapping[str, str]], Response]  # query parameters -> response

_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def json_response(doc: Any, status: int = 200) -> Response:
    return status, "application/json", json.dumps(doc, separators=(",", ":"), default=str).encode()


def static_file(name: str) -> Response:
    """A file of sidecar/observe/static (package data), or 404."""
    suffix = name[name.rfind("."):] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in _STATIC_TYPES:
        return json_response({"error": f"no such file: {name}"}, 404)
    try:
        body = resources.files("sidecar.observe").joinpath("static").joinpath(name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return json_response({"error": f"no such file: {name}"}, 404)
    return 200, _STATIC_TYPES[suffix], body


def parse_address(address: str, allow_remote: bool = False) -> tuple[str, int]:
    """HOST:PORT (or [V6]:PORT) -> (host, port); a non-loopback host needs `allow_remote`."""
    text = address.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"metrics address must be HOST:PORT (e.g. 127.0.0.1:9464, port 0 = any), "
                              f"got {address!r}", field="address")
    if not allow_remote and not _is_loopback(host):
        raise InvalidArgument(f"refusing to serve metrics and the dashboard on {host!r}: not a loopback "
                              f"address (pass allow_remote=True, or SIDECAR_METRICS_ALLOW_REMOTE=1 for "
                              f"`sidecar serve --metrics`, to expose them)", field="address")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a name: every address it resolves to must be loopback ("localhost")
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung browser connection must not keep the host process alive
    allow_reuse_address = True

    def __init__(self, host: str, port: int, routes: Mapping[str, Route]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.routes = routes
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection (a closed browser tab) frees its thread

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        url = urlsplit(self.path)
        route = self.server.routes.get(url.path)
        if route is None and url.path.startswith("/static/"):
            status, ctype, body = static_file(url.path[len("/static/"):])
        elif route is None:
            status, ctype, body = json_response({"error": f"no such path: {url.path}",
                                                 "paths": sorted(self.server.routes)}, 404)
        else:
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                status, ctype, body = route(query)
            except (ValueError, InvalidArgument) as exc:
                status, ctype, body = json_response({"error": str(exc)}, 400)
            except Exception as exc:  # noqa: BLE001 - a broken page must not take the endpoint down
                log.exception("observability route %s failed", url.path)
                status, ctype, body = json_response({"error": f"{type(exc).__name__}: {exc}"}, 500)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s %s", self.address_string(), format % args)


class ObservabilityServer:
    """Serves `routes` on `address` from a background thread until `close()`."""

    def __init__(self, address: str, routes: Mapping[str, Route], *, allow_remote: bool = False) -> None:
        host, port = parse_address(address, allow_remote)
        if any(not route.startswith("/") for route in routes):
            raise ValueError("routes are absolute paths")
        try:
            self._server = _Server(host, port, dict(routes))
        except OSError as exc:
            raise InvalidArgument(f"cannot listen on {address}: {exc.strerror or exc}", field="address") from None
        bound_host, bound_port = self._server.server_address[:2]
        if isinstance(bound_host, bytes):  # (typeshed allows bytes for AF_UNIX; an HTTP server is INET)
            bound_host = bound_host.decode()
        self.address = f"[{bound_host}]:{bound_port}" if ":" in str(bound_host) else f"{bound_host}:{bound_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"sidecar-observe-http-{bound_port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.address}/"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> ObservabilityServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
