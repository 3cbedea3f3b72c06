"""Client address resolution behind trusted proxies: the one resolver every layer uses.

Forwarding headers are believed only when the TCP peer is a trusted proxy. The client is then the right-most
hop that is not itself a trusted proxy, walking `X-Forwarded-For` (or RFC 7239 `Forwarded`) from the right,
because each trusted proxy appends the address it saw and everything left of that is what the client wrote.
Junk entries (`unknown`, obfuscated identifiers, garbage) are skipped, never raised on.
"""

import ipaddress
import re
from collections.abc import Iterable
from typing import Literal

from nexus_middleware.errors import ConfigurationError
from nexus_middleware.headers import get_headers
from nexus_middleware.types import Scope

__all__ = ["AddressSet", "ClientAddressResolver", "normalize_ip"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HEADER_NAMES = {"x-forwarded-for": b"x-forwarded-for", "forwarded": b"forwarded"}
_PROTO_HEADERS = {"x-forwarded-for": b"x-forwarded-proto", "forwarded": b"forwarded"}
_SCHEMES = frozenset({"http", "https", "ws", "wss"})
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Dotted-quad IPv4 already in canonical form (no leading zeros, no port): its own canonical text.
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def _parse_ip(text: str) -> IPAddress | None:
    text = text.strip().strip('"')
    if not text:
        return None
    if text.startswith("["):  # "[v6]" or "[v6]:port"
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # "v4:port"
        text = text.partition(":")[0]
    if "%" in text:  # IPv6 zone id
        text = text.partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_ip(text: str) -> str | None:
    """Canonical text of an address (ports and brackets dropped, IPv4-mapped IPv6 unwrapped), or None."""
    address = _parse_ip(text)
    return None if address is None else str(address)


def _forwarded_pairs(element: str) -> list[tuple[str, str]]:
    """The `name=token` pairs of one RFC 7239 `Forwarded` element, names lower-cased."""
    pairs = []
    for pair in element.split(";"):
        name, _, token = pair.strip().partition("=")
        pairs.append((name.strip().lower(), token))
    return pairs


def _forwarded_for(value: str) -> list[str]:
    return [
        token for element in value.split(",") for name, token in _forwarded_pairs(element) if name == "for"
    ]


class AddressSet:
    """Addresses and CIDRs (`"10.0.0.0/8"`, `"::1"`, and `"*"` for every address when `wildcard`): trusted
    proxies, allowlists, exempt networks. `option` names the setting in the `ConfigurationError` for a bad
    entry."""

    __slots__ = ("_everything", "_networks")

    def __init__(self, entries: Iterable[str], *, option: str, wildcard: bool = True) -> None:
        networks: list[IPNetwork] = []
        everything = False
        for entry in entries:
            if entry == "*" and wildcard:
                everything = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError as exc:
                raise ConfigurationError(f"{option}: {entry!r} is not an address or CIDR") from exc
        self._networks = tuple(networks)
        self._everything = everything

    def __bool__(self) -> bool:
        return self._everything or bool(self._networks)

    def __contains__(self, address: IPAddress) -> bool:
        if self._everything:
            return True
        return any(address.version == net.version and address in net for net in self._networks)

    def entries(self) -> list[str]:
        return [str(net) for net in self._networks] + (["*"] if self._everything else [])


class ClientAddressResolver:
    """Resolves the client address of a request.

    - `trusted_proxies`: addresses or CIDRs of the proxies in front of the app (`"10.0.0.0/8"`, `"::1"`).
      Forwarding headers from any other peer are ignored.
    - `trusted_hops`: instead of CIDRs, the number of proxies in front of the app (the peer is the first).
    - `header`: which forwarding header the proxies write. One only: believing a header the proxies never
      touch would let clients choose their own address.
    """

    __slots__ = ("_header", "_hops", "_peer_only", "_trusted")

    def __init__(
        self,
        *,
        trusted_proxies: Iterable[str] = (),
        trusted_hops: int | None = None,
        header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for",
    ) -> None:
        trusted = AddressSet(trusted_proxies, option="trusted_proxies")
        if trusted_hops is not None:
            if trusted:
                raise ConfigurationError("set trusted_proxies or trusted_hops, not both")
            if trusted_hops < 0:
                raise ConfigurationError("trusted_hops must be zero or more")
        if header not in _HEADER_NAMES:
            raise ConfigurationError(f"header must be one of {sorted(_HEADER_NAMES)}")
        self._trusted = trusted
        self._hops = trusted_hops
        self._header = header
        # No forwarding header is ever believed: the client is the TCP peer.
        self._peer_only = trusted_hops == 0 or (trusted_hops is None and not trusted)

    def __repr__(self) -> str:
        return (
            f"ClientAddressResolver(trusted_proxies={self._trusted.entries()!r}, "
            f"trusted_hops={self._hops!r}, header={self._header!r})"
        )

    @property
    def trusts_proxies(self) -> bool:
        """Whether any peer's forwarding headers can be believed (False: the client is always the peer)."""
        return not self._peer_only

    def is_trusted(self, address: IPAddress) -> bool:
        return address in self._trusted

    def trusts_peer(self, scope: Scope) -> bool:
        """True when the TCP peer is a trusted proxy, so the forwarding headers it sent are believed."""
        if self._hops is None and not self._trusted:
            return False  # nothing is trusted: no need to parse the peer (this runs once per request)
        client = scope.get("client")
        peer = _parse_ip(client[0]) if client else None
        if peer is None:
            return False
        if self._hops is not None:
            return self._hops > 0
        return peer in self._trusted

    def scheme(self, scope: Scope) -> str:
        """The scheme the client used: a trusted proxy's `X-Forwarded-Proto` (or `Forwarded: proto=`, with
        `header="forwarded"`), else the scope's own. TLS usually ends at that proxy."""
        own: str = scope.get("scheme", "http")
        if not self.trusts_peer(scope):
            return own
        values = get_headers(scope.get("headers") or (), _PROTO_HEADERS[self._header])
        if not values:
            return own
        # The first proxy's value is the client's; later hops may have appended their own.
        first = values[0].decode("latin-1").partition(",")[0]
        if self._header == "forwarded":
            proto = next((token for name, token in _forwarded_pairs(first) if name == "proto"), None)
        else:
            proto = first
        proto = None if proto is None else proto.strip().strip('"').lower()
        return proto if proto in _SCHEMES else own

    def resolve(self, scope: Scope) -> str | None:
        """The client address as canonical text, or None when the server reports no peer (unix sockets)."""
        client = scope.get("client")
        if client and self._peer_only:
            host = client[0]
            if isinstance(host, str) and _CANONICAL_IPV4.fullmatch(host):
                return host  # the common case, without building an address object
        peer = _parse_ip(client[0]) if client else None
        if peer is None:
            return None
        if self._hops is not None:
            if self._hops == 0:
                return str(peer)
        elif peer not in self._trusted:
            return str(peer)
        hops = self._hops_from_headers(scope)
        if not hops:
            return str(peer)
        if self._hops is not None:
            # The peer is the first trusted proxy; each of the others appended one hop.
            valid = [hop for hop in (_parse_ip(h) for h in hops) if hop is not None]
            if not valid:
                return str(peer)
            return str(valid[max(len(valid) - self._hops, 0)])
        leftmost: IPAddress | None = None
        for text in reversed(hops):
            address = _parse_ip(text)
            if address is None:
                continue
            if address not in self._trusted:
                return str(address)
            leftmost = address
        # Every hop is a trusted proxy: the request started inside the trusted network.
        return str(leftmost if leftmost is not None else peer)

    def _hops_from_headers(self, scope: Scope) -> list[str]:
        values = get_headers(scope.get("headers") or (), _HEADER_NAMES[self._header])
        hops: list[str] = []
        for raw in values:
            text = raw.decode("latin-1")
            hops.extend(_forwarded_for(text) if self._header == "forwarded" else text.split(","))
        return hops
