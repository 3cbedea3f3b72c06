"""Client address resolution behind trusted proxies: the one resolver every layer uses.

Forwarding headers are believed only when the TCP peer is a trusted proxy. The client is then the right-most
hop that is not itself a trusted proxy, walking `X-Forwarded-For` (or RFC 7239 `Forwarded`) from the right,
because each trusted proxy appends the address it saw and everything left of that is what the client wrote.
Junk entries (`unknown`, obfuscated identifiers, garbage) are skipped, never raised on.
"""

import ipaddress
from collections.abc import Iterable
from typing import Literal

from nexus_middleware.errors import ConfigurationError
from nexus_middleware.headers import get_headers
from nexus_middleware.types import Scope

__all__ = ["ClientAddressResolver", "normalize_ip"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HEADER_NAMES = {"x-forwarded-for": b"x-forwarded-for", "forwarded": b"forwarded"}


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


def _forwarded_for(value: str) -> list[str]:
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, token = pair.strip().partition("=")
            if name.strip().lower() == "for":
                hops.append(token)
    return hops


class ClientAddressResolver:
    """Resolves the client address of a request.

    - `trusted_proxies`: addresses or CIDRs of the proxies in front of the app (`"10.0.0.0/8"`, `"::1"`).
      Forwarding headers from any other peer are ignored.
    - `trusted_hops`: instead of CIDRs, the number of proxies in front of the app (the peer is the first).
    - `header`: which forwarding header the proxies write. One only: believing a header the proxies never
      touch would let clients choose their own address.
    """

    __slots__ = ("_header", "_hops", "_networks", "_trust_all")

    def __init__(
        self,
        *,
        trusted_proxies: Iterable[str] = (),
        trusted_hops: int | None = None,
        header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for",
    ) -> None:
        networks: list[IPNetwork] = []
        trust_all = False
        for entry in trusted_proxies:
            if entry == "*":
                trust_all = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError as exc:
                raise ConfigurationError(f"trusted_proxies: {entry!r} is not an address or CIDR") from exc
        if trusted_hops is not None:
            if networks or trust_all:
                raise ConfigurationError("set trusted_proxies or trusted_hops, not both")
            if trusted_hops < 0:
                raise ConfigurationError("trusted_hops must be zero or more")
        if header not in _HEADER_NAMES:
            raise ConfigurationError(f"header must be one of {sorted(_HEADER_NAMES)}")
        self._networks = tuple(networks)
        self._trust_all = trust_all
        self._hops = trusted_hops
        self._header = header

    def __repr__(self) -> str:
        trusted = [str(n) for n in self._networks] + (["*"] if self._trust_all else [])
        return (
            f"ClientAddressResolver(trusted_proxies={trusted!r}, trusted_hops={self._hops!r}, "
            f"header={self._header!r})"
        )

    def is_trusted(self, address: IPAddress) -> bool:
        if self._trust_all:
            return True
        return any(address.version == net.version and address in net for net in self._networks)

    def trusts_peer(self, scope: Scope) -> bool:
        """True when the TCP peer is a trusted proxy, so the forwarding headers it sent are believed."""
        if self._hops is None and not (self._networks or self._trust_all):
            return False  # nothing is trusted: no need to parse the peer (this runs once per request)
        client = scope.get("client")
        peer = _parse_ip(client[0]) if client else None
        if peer is None:
            return False
        if self._hops is not None:
            return self._hops > 0
        return self.is_trusted(peer)

    def resolve(self, scope: Scope) -> str | None:
        """The client address as canonical text, or None when the server reports no peer (unix sockets)."""
        client = scope.get("client")
        peer = _parse_ip(client[0]) if client else None
        if peer is None:
            return None
        if self._hops is not None:
            if self._hops == 0:
                return str(peer)
        elif not (self._networks or self._trust_all) or not self.is_trusted(peer):
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
            if not self.is_trusted(address):
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
