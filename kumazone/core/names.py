"""Service names to DNS names: pure functions, no Twisted.

A service C{S} in domain C{D} is reachable as C{S.D} (underscores kept) and as
the DNS-compliant form with every C{_} replaced by C{.}.  A form that cannot be a
DNS name (a label over 63 octets, a name over 255, an empty label, a character
outside C{[A-Za-z0-9_.-]}) is left out, with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_LABEL_OCTETS",
    "MAX_NAME_OCTETS",
    "NAMESERVER_LABEL",
    "ZONE_NAME",
    "NameIndex",
    "ServiceNames",
    "assign_names",
    "name_forms",
    "name_problem",
    "names_from_forms",
    "nameserver_name",
    "service_names",
]

MAX_LABEL_OCTETS = 63
MAX_NAME_OCTETS = 255
#: The subtree C{dns.<domain>} holds the server's own NS name; services cannot use it.
NAMESERVER_LABEL = "dns"

_ALLOWED = re.compile(r"\A[A-Za-z0-9_.-]+\Z")
#: A zone's name: a DNS label in lower case (it names certificates and files too).
ZONE_NAME = re.compile(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


@dataclass(frozen=True)
class ServiceNames:
    """The DNS names a service gets, and why any form was left out."""

    names: tuple[str, ...]
    problems: tuple[str, ...]


def nameserver_name(domain: str) -> str:
    """The name of the zone's own nameserver, used in SOA and NS records."""
    return f"ns.{NAMESERVER_LABEL}.{domain}"


#: A name that is certainly fine: allowed characters, no empty label, labels of 63 or less.
_FINE = re.compile(r"\A(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\Z")


def name_problem(name: str) -> str | None:
    """Why C{name} (presentation form, no trailing dot) cannot be a DNS name, or None."""
    if len(name) <= MAX_NAME_OCTETS - 2 and _FINE.match(name):
        return None  # the usual case, in one match (a zone checks a million names)
    if not _ALLOWED.match(name):
        bad = sorted({c for c in name if not re.match(r"[A-Za-z0-9_.-]", c)})
        return f"character(s) {''.join(bad)!r} not allowed in a DNS name"
    labels = name.split(".")
    if any(label == "" for label in labels):
        return "empty label"
    for label in labels:
        if len(label.encode("ascii")) > MAX_LABEL_OCTETS:
            return f"label {label[:20]!r}... is {len(label)} octets (limit {MAX_LABEL_OCTETS})"
    wire_length = sum(len(label) + 1 for label in labels) + 1
    if wire_length > MAX_NAME_OCTETS:
        return f"name is {wire_length} octets on the wire (limit {MAX_NAME_OCTETS})"
    return None


#: A service name that is one plain label: its one DNS name needs no other check.
_PLAIN = re.compile(r"\A[A-Za-z0-9-]{1,63}\Z")


def service_names(service: str, domain: str) -> ServiceNames:
    """The DNS names of C{service} under C{domain}, lower-cased, underscore form first."""
    if (
        _PLAIN.match(service)
        and len(service) + len(domain) + 3 <= MAX_NAME_OCTETS
        and service.lower() != NAMESERVER_LABEL
        and name_problem(domain) is None
    ):
        # The usual case (a global checks every name of every zone's inventory).
        return ServiceNames((f"{service}.{domain}".lower(),), ())
    return _service_names(service, domain)


def _service_names(service: str, domain: str) -> ServiceNames:
    """L{service_names}, every rule checked."""
    forms = [f"{service}.{domain}"]
    if "_" in service:
        forms.append(f"{service.replace('_', '.')}.{domain}")
    reserved_suffix = f".{NAMESERVER_LABEL}.{domain}".lower()
    names: list[str] = []
    problems: list[str] = []
    for form in forms:
        problem = name_problem(form)
        if problem is None and (
            form.lower().endswith(reserved_suffix) or form.lower() == reserved_suffix[1:]
        ):
            problem = f"{NAMESERVER_LABEL}.{domain} is reserved for the zone's nameserver"
        if problem is None:
            names.append(form.lower())
        else:
            problems.append(f"{form!r}: {problem}")
    return ServiceNames(tuple(dict.fromkeys(names)), tuple(problems))


def assign_names(
    claimants: Iterable[tuple[str, str, int]], names_of: Callable[[str], ServiceNames]
) -> dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]]:
    """The names each claimant gets in its mesh, and the problems of those it does not.

    C{claimants} are C{(mesh, service, claim)}: C{claim} is the table version at
    which the service's VIP was first allocated.  A name belongs to the claimant
    with the lowest claim, then the lowest service name, in its mesh: a name
    stays with its service while it exists, a later claimant (C{Redis} beside
    C{redis}, C{a.b} beside C{a_b}) gets only a problem, and the order is a pure
    function of the table, so the global and every zone compute the same owner.

    @param names_of: a service's candidate names (L{service_names}, perhaps cached).
    @return: C{(owned names, problems)} by C{(mesh, service)}.
    """
    claimants = list(claimants)
    holders: dict[tuple[str, str], tuple[int, str]] = {}
    for mesh, service, claim in claimants:
        for name in names_of(service).names:
            best = holders.get((name, mesh))
            if best is None or (claim, service) < best:
                holders[(name, mesh)] = (claim, service)
    assigned: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for mesh, service, _claim in claimants:
        names = names_of(service)
        owned: list[str] = []
        problems = [f"no DNS name {problem}" for problem in names.problems]
        for name in names.names:
            holder = holders[(name, mesh)][1]
            if holder == service:
                owned.append(name)
            else:
                problems.append(f"{name} is service {holder}'s name in this mesh")
        assigned[(mesh, service)] = (tuple(owned), tuple(problems))
    return assigned


#: A claimant: C{(mesh, service)}.
Claimant = tuple[str, str]
#: What a claimant gets: C{(owned names, problems)}, as L{assign_names} gives it.
Assignment = tuple[tuple[str, ...], tuple[str, ...]]


class NameIndex:
    """L{assign_names} kept up to date as claimants come and go: O(names touched).

    The same owners and problems as L{assign_names} over the current claimants,
    without walking them: a claimant's names are looked at when it is set or
    removed, and so are the claimants of those names (usually none).  Kept
    small (a zone holds a million claimants): a name with one claimant is a
    pair, not a dict, and only assignments where a claimant lacks a name it
    asks for are stored.
    """

    def __init__(self, names_of: Callable[[str], ServiceNames]) -> None:
        self._names_of = names_of
        #: (name, mesh) -> the claimants of that name: (service, claim), or {service: claim}.
        self._claims: dict[tuple[str, str], tuple[str, int] | dict[str, int]] = {}
        self._claim_of: dict[Claimant, int] = {}
        #: Assignments where a claimant does not own every name it asks for.
        self._shared: dict[Claimant, Assignment] = {}

    def __len__(self) -> int:
        return len(self._claim_of)

    def __contains__(self, claimant: object) -> bool:
        return claimant in self._claim_of

    def assigned(self, mesh: str, service: str) -> Assignment:
        """The names C{(mesh, service)} owns and the problems of the others."""
        shared = self._shared.get((mesh, service))
        return shared if shared is not None else self._alone(service)

    def _alone(self, service: str) -> Assignment:
        """What C{service} gets holding every name it asks for."""
        names = self._names_of(service)
        return names.names, tuple(f"no DNS name {problem}" for problem in names.problems)

    def put(self, mesh: str, service: str, claim: int) -> set[Claimant]:
        """Add a claimant or change its claim; the claimants whose assignment changed."""
        if self._claim_of.get((mesh, service)) == claim:
            return set()
        new = (mesh, service) not in self._claim_of
        touched = self._drop(mesh, service)
        touched.add((mesh, service))
        self._claim_of[(mesh, service)] = claim
        for name in self._names_of(service).names:
            claims = self._claims.get((name, mesh))
            if claims is None:
                self._claims[(name, mesh)] = (service, claim)
                continue
            if isinstance(claims, tuple):
                claims = self._claims[(name, mesh)] = {claims[0]: claims[1]}
            claims[service] = claim
            touched.update((mesh, other) for other in claims)
        changed = self._reassign(touched)
        if new:
            changed.add((mesh, service))
        return changed

    def remove(self, mesh: str, service: str) -> set[Claimant]:
        """Remove a claimant; the claimants whose assignment changed (itself included)."""
        if (mesh, service) not in self._claim_of:
            return set()
        touched = self._drop(mesh, service)
        del self._claim_of[(mesh, service)]
        self._shared.pop((mesh, service), None)
        changed = self._reassign(touched - {(mesh, service)})
        changed.add((mesh, service))
        return changed

    def _drop(self, mesh: str, service: str) -> set[Claimant]:
        """Take C{(mesh, service)}'s claims off its names; the claimants of those names."""
        touched: set[Claimant] = set()
        if (mesh, service) not in self._claim_of:
            return touched
        for name in self._names_of(service).names:
            claims = self._claims.get((name, mesh))
            if claims is None:
                continue
            if isinstance(claims, tuple):
                if claims[0] == service:
                    del self._claims[(name, mesh)]
                continue
            claims.pop(service, None)
            touched.update((mesh, other) for other in claims)
            if len(claims) == 1:
                ((other, other_claim),) = claims.items()
                self._claims[(name, mesh)] = (other, other_claim)
        touched.add((mesh, service))
        return touched

    def _holder(self, name: str, mesh: str) -> str:
        claims = self._claims[(name, mesh)]
        if isinstance(claims, tuple):
            return claims[0]
        return min(claims.items(), key=lambda item: (item[1], item[0]))[0]

    def _reassign(self, claimants: set[Claimant]) -> set[Claimant]:
        """Work out the assignment of C{claimants} again; those whose assignment changed."""
        changed = set()
        for mesh, service in claimants:
            names = self._names_of(service)
            owned: list[str] = []
            problems = [f"no DNS name {problem}" for problem in names.problems]
            for name in names.names:
                holder = self._holder(name, mesh)
                if holder == service:
                    owned.append(name)
                else:
                    problems.append(f"{name} is service {holder}'s name in this mesh")
            before = self._shared.get((mesh, service))
            if len(owned) == len(names.names):
                if before is not None:
                    del self._shared[(mesh, service)]
                    changed.add((mesh, service))
                continue
            assignment = (tuple(owned), tuple(problems))
            if before != assignment:
                self._shared[(mesh, service)] = assignment
                changed.add((mesh, service))
        return changed


#: The bits of L{name_forms} (as L{kumazone.core.messages.FORM_UNDERSCORE} and
#: C{FORM_DOTTED}).
_UNDERSCORE_FORM, _DOTTED_FORM = 1, 2


def _forms(service: str, domain: str) -> tuple[str, str]:
    return f"{service}.{domain}".lower(), f"{service.replace('_', '.')}.{domain}".lower()


def name_forms(service: str, domain: str, names: Iterable[str]) -> int:
    """Which of C{service}'s two name forms C{names} (as a zone serves them) holds, as bits.

    Bit 1: C{<service>.<domain>}; bit 2: the form with every C{_} a dot (only
    when that differs).  L{names_from_forms} spells them out again.
    """
    underscore, dotted = _forms(service, domain)
    held = set(names)
    return (_UNDERSCORE_FORM if underscore in held else 0) | (
        _DOTTED_FORM if dotted != underscore and dotted in held else 0
    )


def names_from_forms(service: str, domain: str, forms: int) -> tuple[str, ...]:
    """The names C{forms} (from L{name_forms}) stands for, underscore form first."""
    underscore, dotted = _forms(service, domain)
    names = []
    if forms & _UNDERSCORE_FORM:
        names.append(underscore)
    if forms & _DOTTED_FORM and dotted != underscore:
        names.append(dotted)
    return tuple(names)
