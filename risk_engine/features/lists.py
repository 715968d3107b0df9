"""Named lists (blocked devices, e-mails, cards, IPs, VIP buyers) for ``x in list("name")``.

A list has a kind: ``string`` (matched against plain string fields) or a PII kind (``email``, ``phone``,
``card``, ``ip``, ...), whose entries are held only as blind indexes, never in clear.
"""

from __future__ import annotations

import heapq
import ipaddress
import socket
import tomllib
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
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


def list_value_tokens(
    decl: ListDecl, values: Iterable[str], vault: Vault
) -> tuple[list[tuple[str, str]], list[tuple[int, str]]]:
    """``(token, display)`` of each value to put on a list, and ``(index, reason)`` of each value refused."""
    pairs: list[tuple[str, str]] = []
    refused: list[tuple[int, str]] = []
    for i, value in enumerate(values):
        try:
            token = list_value_token(decl, value, vault)
        except ValueError as exc:
            refused.append((i, str(exc)))
            continue
        pairs.append((token, list_value_display(decl, value, token)))
    return pairs, refused


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
    """The live tokens of every list, for membership tests; an entry added, removed or expired costs O(1)
    (an IP range: the networks it covers), whatever the lists' sizes.

    ``sets`` holds one set per list, changed in place: a reader sees each change whole (one set operation under
    the GIL), and keeps no iterator over them. An IP range list holds the /24 (or /48) networks its ranges
    cover, each counted by how many ranges cover it, so removing one of two overlapping ranges keeps the
    network. Expiries wait in a heap; ``current`` drops the entries past theirs. ``snapshot`` gives frozen copies
    for a run that must see one state throughout (a backtest).
    Changes and ``current`` are made by one thread at a time (the engine's state lock).
    """

    def __init__(self, declarations: Mapping[str, ListDecl]) -> None:
        self.declarations = dict(declarations)
        self.sets: dict[str, set[str]] = {name: set() for name in self.declarations}
        self._ranges: dict[str, dict[str, tuple[str, ...]]] = {}  # range list -> range -> its networks
        self._covering: dict[tuple[str, str], int] = {}  # (range list, network) -> ranges covering it
        self._expiry: dict[tuple[str, str], datetime] = {}  # entries that expire, and when
        self._heap: list[tuple[datetime, str, str]] = []  # (expiry, list, token); stale items skipped on pop

    def load(self, entries: Iterable[ListEntry], now: datetime) -> None:
        """Replace all entries."""
        self.sets = {name: set() for name in self.declarations}
        self._ranges, self._covering, self._expiry, self._heap = {}, {}, {}, []
        for entry in entries:
            self._put(entry, now, loading=True)
        heapq.heapify(self._heap)

    def current(self, now: datetime) -> Mapping[str, AbstractSet[str]]:
        """The sets to evaluate with at time ``now`` (expired entries dropped)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires_at, list_name, token = heapq.heappop(heap)
            if self._expiry.get((list_name, token)) == expires_at:  # not removed or restated since
                self._drop(list_name, token)
        return self.sets

    def snapshot(self) -> dict[str, frozenset[str]]:
        """Frozen copies of the sets as they are (``current`` drops the expired entries first). Safe beside a
        writer holding no lock here: each copy is one C-level operation under the GIL."""
        return {name: frozenset(tokens) for name, tokens in list(self.sets.items())}

    def counts(self) -> dict[str, int]:
        """Live entries per list (an IP range counts once, however many networks it covers)."""
        return {
            name: len(self._ranges.get(name, ())) if self._is_range(name) else len(tokens)
            for name, tokens in list(self.sets.items())
        }

    def add(self, entry: ListEntry, now: datetime) -> None:
        """Add or replace one entry (an expiry already past removes it)."""
        self._put(entry, now)

    def remove(self, list_name: str, token: str) -> None:
        """Remove one entry (nothing if it is not there)."""
        self._drop(list_name, token)

    def _is_range(self, list_name: str) -> bool:
        decl = self.declarations.get(list_name)
        return decl is not None and decl.kind == "ip_range"

    def _put(self, entry: ListEntry, now: datetime, loading: bool = False) -> None:
        name, token, expires_at = entry.list_name, entry.token, entry.expires_at
        self._drop(name, token)
        if expires_at is not None:
            if expires_at <= now:
                return
            self._expiry[name, token] = expires_at
            if loading:
                self._heap.append((expires_at, name, token))  # heapified by ``load``
            else:
                heapq.heappush(self._heap, (expires_at, name, token))
        tokens = self.sets.setdefault(name, set())
        if not self._is_range(name):
            tokens.add(token)
            return
        networks = tuple(expand_range(token))
        self._ranges.setdefault(name, {})[token] = networks
        for network in networks:
            covering = self._covering.get((name, network), 0)
            self._covering[name, network] = covering + 1
            if not covering:
                tokens.add(network)

    def _drop(self, list_name: str, token: str) -> None:
        self._expiry.pop((list_name, token), None)
        tokens = self.sets.get(list_name)
        if tokens is None:
            return
        if not self._is_range(list_name):
            tokens.discard(token)
            return
        networks = self._ranges.get(list_name, {}).pop(token, ())
        for network in networks:
            covering = self._covering.pop((list_name, network)) - 1
            if covering:
                self._covering[list_name, network] = covering
            else:
                tokens.discard(network)
