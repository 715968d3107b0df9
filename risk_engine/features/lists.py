"""Named lists (blocked devices, e-mails, cards, IPs, VIP buyers) for ``x in list("name")``.

A list has a kind: ``string`` (matched against plain string fields) or a PII kind (``email``, ``phone``,
``card``, ``ip``, ...), whose entries are held only as blind indexes, never in clear.
"""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from risk_engine.schema import ConfigError
from risk_engine.vault import PiiKind, Vault, mask

LIST_KINDS = ("string", "ip_range", *(k.value for k in PiiKind))
MIN_PREFIX = {4: 12, 6: 32}  # broadest range accepted: a /12 expands to 4,096 networks of /24
PREFIX_LEN = {4: 24, 6: 48}  # the network a payment's IP is reduced to (device.ip_prefix)


_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4 addresses as a dual-stack socket reports them


def canonical_ip(text: str) -> str:
    """An IPv4 or IPv6 address in its one canonical text (``2001:0DB8::0001`` is ``2001:db8::1``), so blind
    indexes, velocity keys and list entries of one address agree however it was written; ValueError if it is
    not one. An IPv4-mapped address (``::ffff:203.0.113.7``, what a server listening on IPv6 reports for an
    IPv4 client) is that IPv4 address: a list entry for either form matches both."""
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        packed = socket.inet_pton(family, text)
    except (OSError, ValueError):
        raise ValueError("not an IPv4 or IPv6 address") from None
    if family == socket.AF_INET6 and packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(family, packed)  # canonical form, fast


def ip_prefix(ip: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) network of an address: what rules may see of an IP in clear.

    Through the C socket functions (a tenth of the ``ipaddress`` module's cost on the payment path), with the
    text ``ipaddress`` gives (a test checks it); an IPv4-mapped address has its IPv4 address's /24 (as in
    ``canonical_ip``), and other IPv6 addresses in ``::/48`` and anything ``inet_pton`` refuses go through
    ``ipaddress``.
    """
    try:
        if ":" not in ip:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, ip)[:3] + b"\0") + "/24"
        packed = socket.inet_pton(socket.AF_INET6, ip)
        if packed[:12] == _V4_MAPPED:
            return socket.inet_ntop(socket.AF_INET, packed[12:15] + b"\0") + "/24"
        if packed[:6] != bytes(6):
            return socket.inet_ntop(socket.AF_INET6, packed[:6] + bytes(10)) + "/48"
    except OSError:
        pass  # not an address inet_pton takes: ipaddress decides (and raises ValueError if it is none)
    address = ipaddress.ip_address(ip)
    return str(ipaddress.ip_network(f"{address}/{PREFIX_LEN[address.version]}", strict=False))


def expand_range(cidr: str) -> list[str]:
    """The /24 (or /48) networks a range covers; a narrower range counts as its enclosing network."""
    network = ipaddress.ip_network(cidr.strip(), strict=False)
    target = PREFIX_LEN[network.version]
    if network.prefixlen < MIN_PREFIX[network.version]:
        raise ValueError(f"range {cidr} is broader than /{MIN_PREFIX[network.version]}")
    if network.prefixlen >= target:
        return [str(network.supernet(new_prefix=target))]
    return [str(n) for n in network.subnets(new_prefix=target)]


@dataclass(frozen=True, slots=True)
class ListDecl:
    """A declared list: its name, kind and purpose."""

    name: str
    kind: str
    description: str = ""
    entries: tuple[str, ...] = ()


def load_list_declarations(path: Path) -> dict[str, ListDecl]:
    """Read ``lists.toml``: ``[blocked_emails] kind = "email"``."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # not TOML, or not UTF-8 text
        raise ConfigError(f"{path}: {exc}") from exc
    result: dict[str, ListDecl] = {}
    for name, body in data.items():
        kind = body.get("kind", "string") if isinstance(body, dict) else None
        if kind not in LIST_KINDS:
            raise ConfigError(f"{path}: list {name!r} has kind {kind!r}; expected one of {', '.join(LIST_KINDS)}")
        entries = body.get("entries", [])
        if entries and kind != "string":
            raise ConfigError(f"{path}: list {name!r}: only string lists may be seeded with entries (no PII in files)")
        result[name] = ListDecl(name, kind, str(body.get("description", "")), tuple(str(e) for e in entries))
    return result


def list_value_token(decl: ListDecl, value: str, vault: Vault) -> str:
    """What is stored and matched for a list entry: the value itself, or its blind index for PII kinds."""
    if decl.kind == "string":
        return value.strip()
    if decl.kind == "ip_range":
        expand_range(value)  # validates
        return str(ipaddress.ip_network(value.strip(), strict=False))
    if decl.kind == "ip":  # as a payment's or review's IP is, or an entry written another way never matches
        value = canonical_ip(value.strip())
    return vault.blind_index(PiiKind(decl.kind), value)


def list_value_display(decl: ListDecl, value: str, token: str) -> str:
    """How an entry is shown: its stored value, or the PII value masked (the value itself is not stored)."""
    return token if decl.kind in ("string", "ip_range") else mask(PiiKind(decl.kind), value)


@dataclass(frozen=True, slots=True)
class ListEntry:
    """A stored entry, as the matcher needs it."""

    list_name: str
    token: str
    expires_at: datetime | None


class ListMatcher:
    """In-memory sets of tokens per list, rebuilt when entries change or expire."""

    def __init__(self, declarations: Mapping[str, ListDecl]) -> None:
        self.declarations = dict(declarations)
        self._entries: list[ListEntry] = []
        self.sets: dict[str, frozenset[str]] = {name: frozenset() for name in self.declarations}
        self._next_expiry: datetime | None = None

    def load(self, entries: Iterable[ListEntry], now: datetime) -> None:
        """Replace all entries."""
        self._entries = list(entries)
        self._rebuild(now)

    def _rebuild(self, now: datetime) -> None:
        live: dict[str, set[str]] = {name: set() for name in self.declarations}
        expiries = []
        for e in self._entries:
            if e.expires_at is not None:
                if e.expires_at <= now:
                    continue
                expiries.append(e.expires_at)
            decl = self.declarations.get(e.list_name)
            if decl is not None and decl.kind == "ip_range":
                live.setdefault(e.list_name, set()).update(expand_range(e.token))
            else:
                live.setdefault(e.list_name, set()).add(e.token)
        self._entries = [e for e in self._entries if e.expires_at is None or e.expires_at > now]
        self.sets = {name: frozenset(tokens) for name, tokens in live.items()}
        self._next_expiry = min(expiries) if expiries else None

    def current(self, now: datetime) -> Mapping[str, frozenset[str]]:
        """The sets to evaluate with at time ``now`` (expired entries dropped)."""
        if self._next_expiry is not None and now >= self._next_expiry:
            self._rebuild(now)
        return self.sets

    def add(self, entry: ListEntry, now: datetime) -> None:
        """Add or replace one entry."""
        self._entries = [e for e in self._entries if (e.list_name, e.token) != (entry.list_name, entry.token)]
        self._entries.append(entry)
        self._rebuild(now)

    def remove(self, list_name: str, token: str, now: datetime) -> None:
        """Remove one entry."""
        self._entries = [e for e in self._entries if (e.list_name, e.token) != (list_name, token)]
        self._rebuild(now)
