"""Web pages must not drive the models: the Host and Origin checks (docs/security.md).

A server on 127.0.0.1 without keys is open to every program on the machine, browsers
included. Two checks keep web pages out while leaving curl, SDKs and the CLI alone:

- **Host**: a request names the server it thinks it talks to. Only loopback names and
  addresses, ``server.host`` and ``server.allowed_hosts`` are accepted. This defeats DNS
  rebinding, where ``evil.example`` is made to resolve to 127.0.0.1 and the attacker's
  page reads our answers as its own origin. A request without ``Host`` (HTTP/1.0) is
  accepted: browsers always send one.
- **Origin**: a request that changes state or runs a model (every forwarded request and
  every management write) is refused when a browser says it comes from another origin:
  its ``Origin`` is neither the manager's own (``http(s)://`` + its ``Host``) nor one of
  ``server.cors_origins``; or, without ``Origin``, ``Sec-Fetch-Site`` is anything but
  ``same-origin`` or ``none`` (a no-cors ``<img>`` or ``<script>`` from another port of
  127.0.0.1 is ``same-site``, and is refused too).

Both run on the raw ASGI headers before anything else. The Host verdict is cached per
Host value (few distinct ones ever come), so a request costs one pass over its headers
and one dict look-up; the Origin comparison runs only when a browser sent one.

Standard library only: ``config`` validates ``server.allowed_hosts`` with it. The 403
itself is written by ``asgi.refuse``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_manager.config import ServerConfig

# Methods of management requests that only read; every other management request is a
# write and gets the Origin check. Forwarded requests always get it.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WILDCARD_BIND = frozenset({"", "0.0.0.0", "::", "[::]", "*"})  # every address
_LOOPBACK_NAMES = frozenset({"localhost"})
_SAFE_SITES = frozenset({b"same-origin", b"none"})
_WANTED = frozenset({b"host", b"origin", b"sec-fetch-site"})
_CACHE_LIMIT = 256
_SHOWN = 100  # longest Host or Origin quoted back in a refusal
SEE = "see docs/security.md"
_CROSS_DETAIL = (
    "requests that run a model or change state are accepted only from this server's own "
    f"pages and server.cors_origins; {SEE}"
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused (403)."""

    message: str
    detail: str


def host_name(host: str) -> str:
    """The name part of a Host value, lower-cased: ``[::1]:8080`` -> ``::1``,
    ``Example.COM:80`` -> ``example.com``. A value that is not a valid Host (an IPv6
    address without brackets, say) is returned whole, and then matches nothing."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or (end + 1 < len(host) and host[end + 1] != ":"):
            return host
        return host[1:end]
    name, colon, port = host.partition(":")
    if colon and (":" in port or not port.isdigit()):
        return host
    return name


def is_loopback(name: str) -> bool:
    """``localhost``, 127.0.0.0/8, ``::1`` (and 127.x mapped into IPv6), brackets or not."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def normalize_host_entry(entry: str) -> str:
    """A name for ``server.allowed_hosts`` as it is compared: lower case, no brackets
    around an IPv6 address. ValueError (with the reason) for what is not a host name."""
    name = entry.strip().lower()
    if not name:
        raise ValueError("an empty name")
    if "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"{entry!r} is not a host name (give a name such as 'llm.lan')")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if ":" in name:
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise ValueError(
                f"{entry!r}: give the name without a port (any port is accepted)"
            ) from None
    if name.startswith("*") and name != "*" and (not name.startswith("*.") or len(name) < 3):
        raise ValueError(f"{entry!r}: a wildcard is '*' or '*.domain'")
    return name


def _shown(value: bytes) -> str:
    text = value.decode("latin-1")
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


class WebGuard:
    """Immutable settings plus a small cache of Host verdicts; one per application."""

    __slots__ = ("_any_host", "_any_origin", "_hosts", "_names", "_origins", "_suffixes")

    def __init__(
        self,
        bind_host: str = "127.0.0.1",
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
    ) -> None:
        names: set[str] = set()
        suffixes: list[str] = []
        for entry in allowed_hosts:
            name = normalize_host_entry(entry)
            if name.startswith("*.") and len(name) > 2:
                suffixes.append(name[1:])  # "*.lan" -> ".lan"
            else:
                names.add(name)
        # The address bound to is a name of this server; a wildcard one (0.0.0.0, ::)
        # names only itself (the URL the start-up log shows), not the machine's others.
        bound = bind_host.strip().lower()
        if bound.startswith("[") and bound.endswith("]"):
            bound = bound[1:-1]
        if bound and bound != "*":
            names.add(bound)
        self._any_host = "*" in names
        self._names = frozenset(names)
        self._suffixes = tuple(suffixes)
        origins = {o.strip().rstrip("/").lower() for o in cors_origins}
        self._any_origin = "*" in origins
        self._origins = frozenset(o.encode("latin-1") for o in origins)
        self._hosts: dict[bytes, bool] = {}

    @classmethod
    def from_server(cls, server: ServerConfig) -> WebGuard:
        return cls(server.host, server.allowed_hosts, server.cors_origins)

    def host_allowed(self, host: bytes) -> bool:
        verdict = self._hosts.get(host)
        if verdict is None:
            verdict = self._judge_host(host)
            if len(self._hosts) < _CACHE_LIMIT:
                self._hosts[host] = verdict
        return verdict

    def _judge_host(self, host: bytes) -> bool:
        if self._any_host:
            return True
        name = host_name(host.decode("latin-1"))
        if not name:
            return False
        return name in self._names or is_loopback(name) or name.endswith(self._suffixes)

    def origin_allowed(self, origin: bytes, host: bytes | None) -> bool:
        """``Origin`` is the manager's own (either scheme: a TLS proxy in front keeps
        Host) or a configured CORS origin. ``null`` is foreign unless ``"*"`` is set."""
        if self._any_origin or origin in self._origins:
            return True
        lowered = origin.lower()
        if lowered in self._origins:
            return True
        if host is None:
            return False
        if lowered.startswith(b"http://"):
            return lowered[7:] == host.lower()
        if lowered.startswith(b"https://"):
            return lowered[8:] == host.lower()
        return False

    def check(self, headers: Sequence[tuple[bytes, bytes]], writes: bool) -> Refusal | None:
        """None when the request may go on. ``writes``: it changes state or runs a model,
        so the Origin check applies too."""
        host = origin = site = None
        for name, value in headers:
            if name in _WANTED:  # one hashed look-up per header, then the few that match
                if name == b"host":
                    if host is None:
                        host = value
                elif name == b"origin":
                    origin = value
                else:
                    site = value
        # The cached True answers at once; a miss or a refusal goes the long way.
        if host is not None and not self._hosts.get(host, False) and not self.host_allowed(host):
            return Refusal(
                f"host {_shown(host)!r} is not allowed",
                "this server answers to loopback names, server.host and "
                f"server.allowed_hosts only; {SEE}",
            )
        if not writes:
            return None
        if origin is not None:
            if self.origin_allowed(origin, host):
                return None
            return Refusal(
                f"cross-origin request from {_shown(origin)!r} refused",
                _CROSS_DETAIL,
            )
        if site is not None and site not in _SAFE_SITES:
            return Refusal(
                f"cross-site request refused (Sec-Fetch-Site: {_shown(site)})",
                _CROSS_DETAIL,
            )
        return None


def startup_warnings(server: ServerConfig) -> list[str]:
    """What ``serve`` warns about before it starts: who else can reach the models."""
    host = server.host
    allowed = server.allowed_hosts  # normalized by the config
    origins = [o.strip() for o in server.cors_origins]
    found: list[str] = []
    if server.api_keys:
        return found
    if not is_loopback(host):
        line = f"binding to {host} with no api_keys: anyone who can reach it can use it"
        if host.strip().lower() in WILDCARD_BIND and not allowed:
            line += (
                "; browsers and clients that name this machine by its address or name are "
                "refused (403) until that name is in server.allowed_hosts"
            )
        found.append(f"{line} ({SEE})")
    if "*" in allowed:
        found.append(
            "server.allowed_hosts has '*' with no api_keys: any web page can read and drive "
            f"this server through DNS rebinding ({SEE})"
        )
    if "*" in origins:
        found.append(
            "server.cors_origins has '*' with no api_keys: any web page can run the models "
            f"and change their state ({SEE})"
        )
    return found
