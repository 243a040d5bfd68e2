"""The one place that speaks Toxiproxy's HTTP API (2.x), with plain `http.client` + JSON.

Why not toxiproxy-python: see DESIGN.md ("Chaos on real processes"); it is stale, keeps
its host in class-level globals and cannot update a toxic. This module covers what the
chaos runner needs, puts a timeout on every request, and turns every failure into a
`ToxiproxyError` that names the proxy (or toxic) and carries the server's own message.

API used: GET/POST /proxies, POST /proxies/{name} {enabled}, DELETE /proxies/{name},
POST /proxies/{name}/toxics, POST/DELETE /proxies/{name}/toxics/{toxic}, POST /reset,
GET /version. Toxics: `stream` is "upstream" (client -> server) or "downstream"
(server -> client); latency {latency, jitter} in ms; timeout {timeout} in ms (0 = hold
data forever: a black hole); bandwidth {rate} in KB/s.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from dataclasses import dataclass
from typing import Any, Literal

Stream = Literal["upstream", "downstream"]
DEFAULT_URL = "http://127.0.0.1:8474"
REQUEST_TIMEOUT_S = 5.0


class ToxiproxyError(Exception):
    """A Toxiproxy request failed; the message names what it was about and why."""


@dataclass(frozen=True)
class Proxy:
    name: str
    listen: str
    upstream: str
    enabled: bool
    toxics: tuple[dict[str, Any], ...] = ()


class Toxiproxy:
    """A client for one Toxiproxy server (`url` like http://127.0.0.1:8474)."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(
                f"Toxiproxy URL {url!r}: expected http://HOST:PORT (e.g. {DEFAULT_URL})"
            )
        self.url = url.rstrip("/")
        self._host = parsed.hostname
        self._port = parsed.port or 80
        self._timeout_s = timeout_s

    # ----------------------------------------------------------------- server

    def version(self) -> str:
        body = self._request("GET", "/version", what="server")
        return str(body.get("version", body)) if isinstance(body, dict) else str(body)

    def reachable(self) -> bool:
        try:
            self.version()
        except ToxiproxyError:
            return False
        return True

    def reset(self) -> None:
        """Enable every proxy and remove every toxic (on the whole server)."""
        self._request("POST", "/reset", what="server")

    # ---------------------------------------------------------------- proxies

    def proxies(self) -> dict[str, Proxy]:
        body = self._request("GET", "/proxies", what="server")
        if not isinstance(body, dict):
            raise ToxiproxyError(f"GET /proxies: unexpected answer {body!r}")
        return {name: _proxy(raw) for name, raw in body.items()}

    def create_proxy(self, name: str, listen: str, upstream: str, enabled: bool = True) -> Proxy:
        body = self._request(
            "POST",
            "/proxies",
            {"name": name, "listen": listen, "upstream": upstream, "enabled": enabled},
            what=f"proxy {name!r}",
        )
        return _proxy(body)

    def set_enabled(self, name: str, enabled: bool) -> None:
        self._request("POST", f"/proxies/{_q(name)}", {"enabled": enabled}, what=f"proxy {name!r}")

    def delete_proxy(self, name: str) -> None:
        self._request("DELETE", f"/proxies/{_q(name)}", what=f"proxy {name!r}")

    # ----------------------------------------------------------------- toxics

    def add_toxic(
        self,
        proxy: str,
        name: str,
        kind: str,
        stream: Stream,
        attributes: dict[str, float | int],
        toxicity: float = 1.0,
    ) -> None:
        self._request(
            "POST",
            f"/proxies/{_q(proxy)}/toxics",
            {
                "name": name,
                "type": kind,
                "stream": stream,
                "toxicity": toxicity,
                "attributes": attributes,
            },
            what=f"toxic {name!r} on proxy {proxy!r}",
        )

    def update_toxic(self, proxy: str, name: str, attributes: dict[str, float | int]) -> None:
        self._request(
            "POST",
            f"/proxies/{_q(proxy)}/toxics/{_q(name)}",
            {"attributes": attributes},
            what=f"toxic {name!r} on proxy {proxy!r}",
        )

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._request(
            "DELETE",
            f"/proxies/{_q(proxy)}/toxics/{_q(name)}",
            what=f"toxic {name!r} on proxy {proxy!r}",
        )

    def toxics(self, proxy: str) -> list[dict[str, Any]]:
        body = self._request("GET", f"/proxies/{_q(proxy)}/toxics", what=f"proxy {proxy!r}")
        return list(body) if isinstance(body, list) else []

    # ---------------------------------------------------------------- plumbing

    def _request(self, method: str, path: str, body: object = None, *, what: str) -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout_s)
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise ToxiproxyError(
                f"{what}: {method} {path} to Toxiproxy at {self.url} failed: {error}"
            ) from error
        finally:
            connection.close()
        text = raw.decode("utf-8", "replace")
        if response.status >= 300:
            message = text.strip()
            try:
                parsed = json.loads(text)
                if isinstance(parsed, dict) and "error" in parsed:
                    message = str(parsed["error"])
            except ValueError:
                pass
            raise ToxiproxyError(
                f"{what}: {method} {path} -> HTTP {response.status}: {message or response.reason}"
            )
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text.strip()


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _proxy(raw: Any) -> Proxy:
    if not isinstance(raw, dict):
        raise ToxiproxyError(f"unexpected proxy description {raw!r}")
    return Proxy(
        name=str(raw.get("name", "")),
        listen=str(raw.get("listen", "")),
        upstream=str(raw.get("upstream", "")),
        enabled=bool(raw.get("enabled", False)),
        toxics=tuple(raw.get("toxics") or ()),
    )
