"""A FHIR instance checked against the snapshot of a StructureDefinition, read from the
vendored PDSm profiles (tests/data/pdsm/profiles), independently of the code that builds or
validates bundles: cardinalities (min/max of each element, slices included where the slice's
membership can be decided offline), fixed[x] and pattern[x] values, required bindings whose
codes are known offline, and every constraint's FHIRPath expression evaluated with fhirpathpy on
the nodes of the element it is attached to (severity ``error`` = a problem; ``warning``, such
as dom-6 "should have narrative", is not).

What cannot be decided offline is collected in ``Checker.unchecked`` (the list is asserted by
tests/test_kos_conformance.py), never passed silently as checked:

* a slice whose discriminator is fixed only in a profile that is not vendored (the MHD
  identifier slices ``identifier:entryUUID`` / ``identifier:uniqueId``: ``use`` is fixed in
  IHE.MHD.EntryUUID.Identifier and IHE.MHD.SubmissionSetUniqueIdIdentifier);
* a required binding whose ValueSet is not a FHIR core one (its codes are then unknown here:
  MHD DocumentReferenceStats, MHDlistTypesVS, MHDprovideFolderActions...);
* the profiles of contained resources and of data types (fr-core-patient, as-organization,
  IHE.MHD.UniqueIdIdentifier...): not vendored, so only the base rules of the element apply.

Required bindings on FHIR core ValueSets use the codes that ``fhir.resources`` (R4B models,
generated from the FHIR specification) lists for the element; ``mimetypes`` (all of BCP 13) is
checked for the ``type/subtype`` grammar of RFC 6838.
"""

import functools
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fhirpathpy
from fhirpathpy.models import models

from tests.pdsm_profiles import PROFILES

_FHIR_CORE_VALUE_SET = "http://hl7.org/fhir/ValueSet/"
_MIME_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*"
                        r"(\s*;\s*[^;=\s]+=[^;]+)*")


def _has_value(collection: list) -> list[bool]:
    """FHIR's FHIRPath ``hasValue()`` (FHIR R4 2.1.9.1.5.5): one primitive with a value.
    fhirpathpy does not implement this FHIR-specific function (it is given the data)."""
    return [len(collection) == 1 and collection[0] is not None
            and not isinstance(collection[0], dict | list)]


_OPTIONS = {"userInvocationTable": {"hasValue": {"fn": _has_value}},
            "traceFn": lambda *_args: None}


@dataclass(frozen=True)
class Problem:
    """One rule an instance breaks: where (a FHIRPath-like location), which rule, why."""

    where: str
    rule: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.rule}: {self.why}"


def _items(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _values(node: Any, name: str) -> list:
    """The instance values of child ``name`` of ``node`` (``value[x]``: any ``valueFoo``)."""
    if not isinstance(node, dict):
        return []
    if name.endswith("[x]"):
        prefix = name[:-3]
        return [v for key, value in node.items()
                if key.startswith(prefix) and key[len(prefix):][:1].isupper()
                for v in _items(value)]
    return _items(node.get(name))


def _matches(value: Any, pattern: Any) -> bool:
    """FHIR pattern[x] semantics: every element of the pattern is present with that value
    (lists: each pattern item matched by some instance item)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(_matches(value.get(k), v)
                                               for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and all(any(_matches(v, p) for v in value)
                                               for p in pattern)
    return value == pattern


def _fixed_and_pattern(element: dict) -> list[tuple[str, Any]]:
    return [(key, value) for key, value in element.items()
            if key.startswith(("fixed", "pattern"))]


def _path(element_id: str) -> str:
    """The element's path (slice names removed): the FHIRPath base of its constraints."""
    return ".".join(part.split(":")[0] for part in element_id.split("."))


def _capitalised(name: str) -> str:
    return name[:1].upper() + name[1:]


@dataclass(eq=False)  # hashed by identity (functools.cache)
class Profile:
    """A StructureDefinition's snapshot, ready to check instances of its type."""

    url: str
    type: str
    elements: dict[str, dict]
    children: dict[str, list[str]] = field(default_factory=dict)
    slices: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Profile":
        """Read a StructureDefinition JSON file."""
        definition = json.loads(path.read_text())
        elements = {e["id"]: e for e in definition["snapshot"]["element"]}
        profile = cls(definition["url"], definition["type"], elements)
        for element_id in elements:
            if "." not in element_id:
                continue
            parent, _, last = element_id.rpartition(".")
            if ":" in last:  # a slice: sibling of the element it slices
                profile.slices.setdefault(f"{parent}.{last.split(':')[0]}", []).append(
                    element_id)
            else:
                profile.children.setdefault(parent, []).append(element_id)
        return profile


@dataclass
class Checker:
    """Checks instances against the vendored profiles; ``unchecked`` lists what could not be
    decided offline (rule and reason), over every instance checked."""

    profiles: dict[str, Profile]
    unchecked: set[str] = field(default_factory=set)

    def check(self, resource: dict, profile_url: str, where: str = "") -> list[Problem]:
        """Every problem of ``resource`` against the profile ``profile_url``."""
        profile = self.profiles[profile_url]
        problems: list[Problem] = []
        if resource.get("resourceType") != profile.type:
            return [Problem(where or profile.type, "type",
                            f"{resource.get('resourceType')} is not a {profile.type}")]
        self._element(profile, profile.type, [resource], where or profile.type, resource,
                      problems)
        return problems

    # --- one element -----------------------------------------------------------------------

    def _element(self, profile: Profile, element_id: str, values: list, where: str,
                 resource: dict, problems: list[Problem]) -> None:
        element = profile.elements[element_id]
        if "." in element_id:
            low, high = element.get("min", 0), element.get("max", "*")
            if len(values) < low:
                problems.append(Problem(where, "cardinality",
                                        f"{len(values)} found, at least {low} required"))
            if high != "*" and len(values) > int(high):
                problems.append(Problem(where, "cardinality",
                                        f"{len(values)} found, at most {high} allowed"))
        for n, value in enumerate(values):
            here = f"{where}[{n}]" if len(values) > 1 else where
            for key, expected in _fixed_and_pattern(element):
                ok = value == expected if key.startswith("fixed") else _matches(value, expected)
                if not ok:
                    problems.append(Problem(here, key, f"{value!r} does not match "
                                                       f"{expected!r}"))
            self._binding(profile, element_id, element, value, here, problems)
            self._constraints(element_id, element, value, here, resource, problems)
            nested = self._nested_profile(element, value)
            if nested is not None:
                problems += self.check(value, nested, here)
                continue
            if not isinstance(value, dict):
                continue
            for child_id in profile.children.get(element_id, []):
                name = child_id.rpartition(".")[2]
                child_values = _values(value, name)
                self._element(profile, child_id, child_values, f"{here}.{name}", resource,
                              problems)
                self._slices(profile, child_id, child_values, f"{here}.{name}",
                             resource, problems)

    def _nested_profile(self, element: dict, value: Any) -> str | None:
        """A resource inside this element (Bundle.entry.resource) with a vendored profile."""
        if not isinstance(value, dict) or "resourceType" not in value:
            return None
        for kind in element.get("type", []):
            for url in kind.get("profile", []):
                if url in self.profiles and value["resourceType"] == kind.get("code"):
                    return url
        return None

    # --- slices ------------------------------------------------------------------------------

    def _slices(self, profile: Profile, base_id: str, values: list, where: str,
                resource: dict, problems: list[Problem]) -> None:
        slice_ids = profile.slices.get(base_id, [])
        if not slice_ids:
            return
        slicing = profile.elements[base_id].get("slicing", {})
        claimed: set[int] = set()
        for slice_id in slice_ids:
            membership = [self._in_slice(profile, slice_id, slicing, value) for value in values]
            if None in membership:
                continue
            members = [value for value, member in zip(values, membership, strict=True)
                       if member]
            claimed |= {n for n, member in enumerate(membership) if member}
            name = slice_id.rpartition(":")[2]
            self._element(profile, slice_id, members, f"{where}:{name}", resource, problems)
        if slicing.get("rules") == "closed":
            for n in sorted(set(range(len(values))) - claimed):
                problems.append(Problem(f"{where}[{n}]", "closed slicing",
                                        "this item matches none of the slices "
                                        f"{', '.join(s.rpartition(':')[2] for s in slice_ids)}"))

    def _in_slice(self, profile: Profile, slice_id: str, slicing: dict,
                  value: Any) -> bool | None:
        """Whether ``value`` belongs to the slice; None when that cannot be decided here."""
        for discriminator in slicing.get("discriminator", []):
            kind, path = discriminator["type"], discriminator["path"]
            target = f"{slice_id}.{path}"
            if kind == "profile":
                if not self._conforms_by_type(profile, target, _resolve(value, path)):
                    return False
            elif kind in ("value", "pattern"):
                decided = self._value_discriminator(profile, slice_id, target, path, value)
                if decided is None:
                    self.unchecked.add(
                        f"slice {slice_id}: discriminator {kind} {path} is fixed in a "
                        "profile that is not vendored")
                    return None
                if not decided:
                    return False
            else:
                self.unchecked.add(f"slice {slice_id}: discriminator type {kind}")
                return None
        return True

    def _value_discriminator(self, profile: Profile, slice_id: str, target: str, path: str,
                             value: Any) -> bool | None:
        element = profile.elements.get(target)
        expected = _fixed_and_pattern(element) if element else []
        if expected:
            return all(_matches(_resolve(value, path), v) for _, v in expected)
        slice_element = profile.elements[slice_id]
        if path == "url":  # extension slices: the URL of the extension's profile
            urls = [u for t in slice_element.get("type", []) for u in t.get("profile", [])]
            if urls:
                return _resolve(value, "url") in urls
        # A discriminator naming an element without a value (PDSm's context.related slice,
        # "based on the type.coding.system pattern"): the values the slice itself fixes.
        inside = [(e_id, v) for e_id, e in profile.elements.items()
                  if e_id.startswith(f"{slice_id}.") for _, v in _fixed_and_pattern(e)]
        if inside:
            return all(any(_matches(node, v)
                           for node in _nodes(value, e_id[len(slice_id) + 1:]))
                       for e_id, v in inside)
        # The element is in the snapshot and the slice leaves it free (Documents: any
        # request.method); absent, it is constrained in a profile not vendored here.
        return True if element is not None else None

    @staticmethod
    def _conforms_by_type(profile: Profile, target: str, value: Any) -> bool:
        """A ``profile`` discriminator: the resource is of the type the slice names, and
        claims its profile in meta.profile unless that is the core definition of the type
        (any Binary is a Binary); a vendored profile is then checked in depth."""
        element = profile.elements.get(target)
        if element is None or not isinstance(value, dict):
            return False
        claimed = (value.get("meta") or {}).get("profile") or []
        for kind in element.get("type", []):
            if value.get("resourceType") != kind.get("code"):
                continue
            core = f"http://hl7.org/fhir/StructureDefinition/{kind['code']}"
            if any(url == core or url in claimed for url in kind.get("profile", [core])):
                return True
        return False

    # --- bindings and constraints ------------------------------------------------------------

    def _binding(self, profile: Profile, element_id: str, element: dict, value: Any,
                 where: str, problems: list[Problem]) -> None:
        binding = element.get("binding") or {}
        if binding.get("strength") != "required":
            return
        value_set = binding.get("valueSet", "").split("|")[0]
        if value_set == f"{_FHIR_CORE_VALUE_SET}mimetypes":
            if not isinstance(value, str) or not _MIME_TYPE.fullmatch(value):
                problems.append(Problem(where, "binding mimetypes",
                                        f"{value!r} is not a media type (BCP 13)"))
            return
        codes = _core_codes(profile, element_id) if value_set.startswith(
            _FHIR_CORE_VALUE_SET) else None
        if codes is None or not isinstance(value, str):
            self.unchecked.add(f"required binding of {_path(element_id)} to {value_set}: "
                               "its codes are not available offline")
            return
        if value not in codes:
            problems.append(Problem(where, f"binding {value_set}",
                                    f"{value!r} is not one of {', '.join(codes)}"))

    def _constraints(self, element_id: str, element: dict, value: Any, where: str,
                     resource: dict, problems: list[Problem]) -> None:
        for constraint in element.get("constraint", []):
            expression = constraint.get("expression")
            if not expression:
                continue  # PDSm's constr-* rules are prose only (no expression)
            if constraint.get("severity") != "error":
                continue
            if not _holds(value, _base(element_id, element, value), expression, resource):
                problems.append(Problem(where, constraint["key"], constraint.get("human", "")))


def _base(element_id: str, element: dict, value: Any) -> str:
    """The FHIRPath type context of a node: its data type (fhirpathpy resolves choice
    elements such as Extension.value[x] by type), its resource type, or its path."""
    types = [t.get("code", "") for t in element.get("type", [])]
    if isinstance(value, dict) and "resourceType" in value:
        return value["resourceType"]
    if len(types) == 1 and types[0][:1].isupper() and types[0] not in (
            "BackboneElement", "Element", "Resource"):
        return types[0]
    return _path(element_id)


def _resolve(value: Any, path: str) -> Any:
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _nodes(value: Any, relative_id: str) -> list:
    """Every node of ``value`` at a relative element path (lists flattened)."""
    nodes = [value]
    for part in relative_id.split("."):
        nodes = [v for node in nodes for v in _values(node, part.split(":")[0])]
    return nodes


def _holds(value: Any, path: str, expression: str, resource: dict) -> bool:
    """A FHIRPath invariant on one node: broken only when it evaluates to false (an empty
    result, as bdl-8 on an entry without fullUrl, is no violation: FHIRPath's three-valued
    logic, as the HL7 validator applies it). fhirpathpy follows FHIRPath strictly, where
    ``as(T)`` on a collection of several items is an error; FHIR R4's dom-3 applies it to
    ``descendants()``, and the FHIR errata (R4B dom-3) rewrote it with ``ofType(T)``: when the
    strict evaluation raises for that reason, the expression is evaluated with ``ofType``."""
    base = {"base": path, "expression": expression}
    variables = {"resource": resource, "rootResource": resource}
    try:
        result = fhirpathpy.evaluate(value, base, variables, models["r4"], _OPTIONS)
    except ValueError as exc:
        if "singleton on left side of 'as'" not in str(exc):
            raise
        base["expression"] = expression.replace(".as(", ".ofType(")
        result = fhirpathpy.evaluate(value, base, variables, models["r4"], _OPTIONS)
    return result != [False]


@functools.cache
def _core_codes(profile: Profile, element_id: str) -> tuple[str, ...] | None:
    """The codes of a FHIR core required binding, as fhir.resources (R4B) lists them for the
    element: the class of the parent (the resource, a backbone element named after its path,
    or a data type) and its field's ``enum_values``."""
    parent_id, _, name = element_id.rpartition(".")
    parts = _path(parent_id).split(".")
    parent_types = [t.get("code") for t in profile.elements[parent_id].get("type", [])]
    if len(parts) == 1 or parent_types in (["BackboneElement"], ["Element"]):
        module, class_name = parts[0].lower(), "".join(_capitalised(p) for p in parts)
    elif len(parent_types) == 1:
        module, class_name = parent_types[0].lower(), parent_types[0]
    else:
        return None
    try:
        model = getattr(importlib.import_module(f"fhir.resources.R4B.{module}"), class_name)
    except (ImportError, AttributeError):
        return None
    info = model.model_fields.get(name)
    codes = (info.json_schema_extra or {}).get("enum_values") if info else None
    return tuple(codes) if codes else None


@functools.cache
def vendored() -> dict[str, Profile]:
    """Every StructureDefinition under tests/data/pdsm/profiles, by canonical URL."""
    loaded = [Profile.load(path) for path in sorted(PROFILES.glob("StructureDefinition-*.json"))]
    return {profile.url: profile for profile in loaded}
