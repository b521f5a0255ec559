"""Service names to DNS names: pure functions, no Twisted.

A service C{S} in domain C{D} is reachable as C{S.D} (underscores kept) and as
the DNS-compliant form with every C{_} replaced by C{.}.  A form that cannot be a
DNS name (a label over 63 octets, a name over 255, an empty label, a character
outside C{[A-Za-z0-9_.-]}) is left out, with a reason.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

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


class ServiceNames(NamedTuple):
    """The DNS names a service gets, and why any form was left out.

    A named tuple: made for every service of a first load, at a fraction of a
    frozen dataclass's cost.
    """

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


@functools.lru_cache(maxsize=64)
def _fine_domain(domain: str) -> bool:
    """Whether C{domain} is a valid DNS name (asked once per domain, not per service)."""
    return name_problem(domain) is None


_plain_match = _PLAIN.match
_NO_PROBLEMS: tuple[str, ...] = ()
#: C{_new_names(ServiceNames, (names, problems))}: C{ServiceNames(names, problems)}
#: without the named tuple's argument handling (a first load makes one per service).
_new_names = tuple.__new__


def service_names(service: str, domain: str) -> ServiceNames:
    """The DNS names of C{service} under C{domain}, lower-cased, underscore form first."""
    if (
        _plain_match(service)
        and len(service) + len(domain) + 3 <= MAX_NAME_OCTETS
        and _fine_domain(domain)
        and service.lower() != NAMESERVER_LABEL
    ):
        # The usual case (a global checks every name of every zone's inventory).
        return _new_names(ServiceNames, ((f"{service}.{domain}".lower(),), _NO_PROBLEMS))
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
    small (a zone holds a million claimants): per mesh, a name with one
    claimant maps to that service's name, not to a dict or a tuple; claims are
    kept once per claimant; and only assignments where a claimant lacks a name
    it asks for are stored.
    """

    def __init__(
        self,
        names_of: Callable[[str], ServiceNames],
        claim_of: Callable[[str, str], int] | None = None,
    ) -> None:
        """C{claim_of(mesh, service)}: each claimant's claim, as the caller keeps it
        (a zone's table: a map of a million claims less), looked up only when a
        second claimant comes to a name; without it, the index keeps the claims
        it is told.  A claimant it gives for may have been told a change of claim
        not given yet (or no claim, when gone from the caller's table: it is
        removed before the change ends), so long as each change of claim is
        given (L{put}) once made."""
        self._names_of = names_of
        #: mesh -> name -> its one claimant's service, or {service: claim} of several.
        #: A claimant is known by its first name here (L{_has}).
        self._claims: dict[str, dict[str, str | dict[str, int]]] = {}
        #: mesh -> claimants in it.
        self._counts: dict[str, int] = {}
        #: mesh -> claimants without a name in it (no map of names to know them by).
        self._nameless: dict[str, set[str]] = {}
        #: mesh -> service -> claim, unless the caller keeps them (C{claim_of}).
        self._own: dict[str, dict[str, int]] | None = None if claim_of is not None else {}
        self._claim_of = claim_of if claim_of is not None else self._own_claim
        #: Assignments where a claimant does not own every name it asks for.
        self._shared: dict[Claimant, Assignment] = {}

    def _own_claim(self, mesh: str, service: str) -> int:
        assert self._own is not None
        return self._own[mesh][service]

    def _has(self, mesh: str, service: str, names: ServiceNames | None = None) -> bool:
        """Whether C{(mesh, service)} is a claimant: its first name's claims hold it."""
        in_mesh = self._claims.get(mesh)
        if in_mesh is None:
            return False
        asked = (names or self._names_of(service)).names
        if not asked:
            nameless = self._nameless.get(mesh)
            return nameless is not None and service in nameless
        held = in_mesh.get(asked[0])
        if held is None:
            return False
        return held == service if held.__class__ is str else service in held

    def _count(self, mesh: str, service: str, names: ServiceNames, claim: int) -> None:
        """C{(mesh, service)} is a claimant now (its claims on its names are the caller's)."""
        self._counts[mesh] += 1
        if not names.names:
            self._nameless.setdefault(mesh, set()).add(service)
        own = self._own
        if own is not None:
            own.setdefault(mesh, {})[service] = claim

    def __len__(self) -> int:
        return sum(self._counts.values())

    def __contains__(self, claimant: object) -> bool:
        if not isinstance(claimant, tuple) or len(claimant) != 2:
            return False
        mesh, service = claimant
        return isinstance(mesh, str) and isinstance(service, str) and self._has(mesh, service)

    def assigned(self, mesh: str, service: str) -> Assignment:
        """The names C{(mesh, service)} owns and the problems of the others."""
        shared = self._shared.get((mesh, service))
        return shared if shared is not None else self._alone(service)

    def _alone(self, service: str) -> Assignment:
        """What C{service} gets holding every name it asks for."""
        return _alone(self._names_of(service))

    def fill(
        self,
        claimants: Sequence[tuple[str, str, int]],
        names_of: Callable[[str], ServiceNames] | None = None,
    ) -> Iterator[Assignment]:
        """Put many claimants into an empty index at once; then what each gets, in order.

        The state is the one L{put} of each would leave, at a fraction of the
        cost (a zone's start-up puts every service of its table): each
        claimant's names are worked out once, and what it gets holds those very
        strings.  The claimants must be distinct; the assignments come as the
        iterator is walked, after every claim is in.

        @param names_of: the index's own function, or one that gives the same
            names (uncached: the index's may cache a few).
        """
        if self._counts:
            raise ValueError("NameIndex.fill needs an empty index")
        names_of = names_of or self._names_of
        every_names: list[ServiceNames] = []
        claims, counts, own, claim_of = self._claims, self._counts, self._own, self._claim_of
        for mesh, service, claim in claimants:
            in_mesh = claims.get(mesh)
            if in_mesh is None:
                in_mesh = claims[mesh] = {}
                counts[mesh] = 0
                if own is not None:
                    own[mesh] = {}
            counts[mesh] += 1
            if own is not None:
                own[mesh][service] = claim
            names = names_of(service)
            every_names.append(names)
            if not names.names:
                self._nameless.setdefault(mesh, set()).add(service)
            for name in names.names:
                held = in_mesh.get(name)
                if held is None:
                    in_mesh[name] = service
                elif isinstance(held, dict):
                    held[service] = claim
                else:
                    in_mesh[name] = {held: claim_of(mesh, held), service: claim}
        return self._filled(claimants, every_names)

    def _filled(
        self, claimants: Sequence[tuple[str, str, int]], every_names: list[ServiceNames]
    ) -> Iterator[Assignment]:
        claims = self._claims
        for (mesh, service, _claim), names in zip(claimants, every_names, strict=True):
            in_mesh = claims[mesh]
            for name in names.names:
                held = in_mesh[name]
                if held is service or held == service:
                    continue  # its one claimant
                if isinstance(held, dict) and self._holder(name, mesh) == service:
                    continue
                break
            else:
                yield _alone(names)
                continue
            # A name held by another: worked out (and kept) as any change does.
            self._reassign({(mesh, service)})
            yield self._shared[(mesh, service)]

    def claim_new(
        self,
        mesh: str,
        service: str,
        claim: int,
        names_of: Callable[[str], ServiceNames] | None = None,
    ) -> Assignment | None:
        """Add a new claimant if none of its names is anyone's: what it gets (every
        name it asks for), and no one else's assignment changes.  None (and nothing
        done) if it is a claimant already or shares a name: L{put} then.

        L{put}'s usual case, without the set of claimants it returns (a fresh
        zone takes 100,000 services, a few hundred a turn).  C{names_of}: as for
        L{fill} (a new service's names are seldom asked for again at once: a
        cache of a few only costs its upkeep).
        """
        names = (names_of or self._names_of)(service)
        in_mesh = self._claims.get(mesh)
        if in_mesh is None:
            in_mesh = self._claims[mesh] = {}
            self._counts[mesh] = 0
        elif not names.names:
            if self._has(mesh, service, names):
                return None
        else:
            for name in names.names:
                if name in in_mesh:
                    return None  # its own (a claimant already), or another's
        self._count(mesh, service, names, claim)
        for name in names.names:
            in_mesh[name] = service
        return _alone(names)

    def put(self, mesh: str, service: str, claim: int) -> set[Claimant]:
        """Add a claimant or change its claim; the claimants whose assignment changed."""
        own = self._own
        if own is not None and own.get(mesh, {}).get(service) == claim:
            return set()  # (the caller's claims, where it keeps them, are not known here)
        names = self._names_of(service)
        in_mesh = self._claims.get(mesh)
        if (
            in_mesh is not None
            and (mesh, service) not in self._shared
            and self._has(mesh, service, names)
            and all(in_mesh.get(name) == service for name in names.names)
        ):
            # A claimant holding every name it asks for alone (a row that changed
            # in its zones, a provisional VIP the global confirmed): it keeps them,
            # no one's assignment changes.  (Taking the names off and back would
            # cost the map an entry each: dicts do not reuse a deleted key's entry.)
            if own is not None:
                own[mesh][service] = claim
            return set()
        if self.claim_new(mesh, service, claim) is not None:
            return {(mesh, service)}  # the usual new claimant: no one else's changed
        in_mesh = self._claims[mesh]
        new = not self._has(mesh, service, names)
        touched = self._drop(mesh, service)
        touched.add((mesh, service))
        if new:
            self._count(mesh, service, names, claim)
        elif own is not None:
            own[mesh][service] = claim
        for name in names.names:
            held = in_mesh.get(name)
            if held is None:
                in_mesh[name] = service
                continue
            if not isinstance(held, dict):
                held = in_mesh[name] = {held: self._claim_of(mesh, held)}
            held[service] = claim
            touched.update((mesh, other) for other in held)
        changed = self._reassign(touched)
        if new:
            changed.add((mesh, service))
        return changed

    def remove(self, mesh: str, service: str) -> set[Claimant]:
        """Remove a claimant; the claimants whose assignment changed (itself included)."""
        if not self._has(mesh, service):
            return set()
        touched = self._drop(mesh, service)
        self._counts[mesh] -= 1
        nameless = self._nameless.get(mesh)
        if nameless is not None:
            nameless.discard(service)
            if not nameless:
                del self._nameless[mesh]
        own = self._own
        if own is not None:
            del own[mesh][service]
        if not self._counts[mesh]:
            del self._counts[mesh]
            del self._claims[mesh]
            if own is not None:
                del own[mesh]
        self._shared.pop((mesh, service), None)
        changed = self._reassign(touched - {(mesh, service)})
        changed.add((mesh, service))
        return changed

    def _drop(self, mesh: str, service: str) -> set[Claimant]:
        """Take C{(mesh, service)}'s claims off its names; the claimants of those names."""
        touched: set[Claimant] = set()
        if not self._has(mesh, service):
            return touched
        in_mesh = self._claims[mesh]
        for name in self._names_of(service).names:
            held = in_mesh.get(name)
            if held is None:
                continue
            if not isinstance(held, dict):
                if held == service:
                    del in_mesh[name]
                continue
            held.pop(service, None)
            touched.update((mesh, other) for other in held)
            if len(held) == 1:
                (other,) = held
                in_mesh[name] = other
        touched.add((mesh, service))
        return touched

    def _holder(self, name: str, mesh: str) -> str:
        held = self._claims[mesh][name]
        if not isinstance(held, dict):
            return held
        return min(held.items(), key=lambda item: (item[1], item[0]))[0]

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


def _alone(names: ServiceNames) -> Assignment:
    """What a claimant of C{names} gets holding every name it asks for."""
    if not names.problems:
        return names.names, _NO_PROBLEMS
    return names.names, tuple(f"no DNS name {problem}" for problem in names.problems)


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
