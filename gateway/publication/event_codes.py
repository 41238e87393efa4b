"""Event codes of a manifest (XDS eventCodeList, FHIR ``context.event``): the study's
acquisition modalities (DICOM code system) and anatomic regions (SNOMED CT), looked up in
``event_codes.toml`` beside this module (package data); values found nowhere are reported,
never guessed."""

import tomllib
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
BUILT_IN = resources.files(__package__) / "event_codes.toml"


@dataclass(frozen=True, slots=True)
class EventCode:
    """One code of the event code list."""

    system: str
    code: str
    text: str


@dataclass(frozen=True)
class EventCodeTable:
    """Modality and body part mappings (see event_codes.toml)."""

    modalities: dict[str, str]  # DICOM Modality -> French label
    regions: dict[str, str]  # SNOMED CT region code -> French label
    body_parts: dict[str, tuple[str, ...]]  # normalised BodyPartExamined -> region codes
    ignored_modalities: frozenset[str]
    ignored_body_parts: frozenset[str]

    def codes(self, modalities: list[str], body_parts: list[str]
              ) -> tuple[list[EventCode], list[str]]:
        """The event codes of these series values, and what could not be mapped (as
        ``"Modality XYZ"`` / ``"BodyPartExamined XYZ"``), both in first-seen order."""
        found: dict[tuple[str, str], EventCode] = {}
        unknown: list[str] = []
        for modality in modalities:
            modality = modality.strip().upper()
            if modality in self.modalities:
                found.setdefault((DCM, modality),
                                 EventCode(DCM, modality, self.modalities[modality]))
            elif modality not in self.ignored_modalities:
                unknown.append(f"Modality {modality}")
        for body_part in body_parts:
            key = normalise(body_part)
            if key in self.ignored_body_parts:
                continue
            if key not in self.body_parts:
                unknown.append(f"BodyPartExamined {body_part.strip()}")
            for region in self.body_parts.get(key, ()):
                found.setdefault((SNOMED, region), EventCode(SNOMED, region, self.regions[region]))
        return list(found.values()), list(dict.fromkeys(unknown))


def normalise(value: str) -> str:
    """Capitals without spaces, underscores, hyphens or accents."""
    decomposed = unicodedata.normalize("NFKD", value.upper())
    return "".join(c for c in decomposed if c.isalnum() and not unicodedata.combining(c))


def load_event_codes(extra: Path | None = None) -> EventCodeTable:
    """The built-in table, with the entries of ``extra`` (same format) merged over it.

    Raises ValueError when a body part maps to a region missing from ``[regions]``.
    """
    tables = [tomllib.loads(BUILT_IN.read_text(encoding="utf-8"))]
    if extra is not None:
        tables.append(tomllib.loads(extra.read_text(encoding="utf-8")))
    modalities: dict[str, str] = {}
    regions: dict[str, str] = {}
    body_parts: dict[str, tuple[str, ...]] = {}
    ignored_modalities: set[str] = set()
    ignored_body_parts: set[str] = set()
    for table in tables:
        modalities.update({k.upper(): v for k, v in table.get("modalities", {}).items()})
        regions.update({str(k): v for k, v in table.get("regions", {}).items()})
        for name, codes in table.get("body_parts", {}).items():
            body_parts[normalise(name)] = (codes,) if isinstance(codes, str) else tuple(codes)
        ignored = table.get("ignored", {})
        ignored_modalities.update(m.upper() for m in ignored.get("modalities", []))
        ignored_body_parts.update(normalise(b) for b in ignored.get("body_parts", []))
    for name, codes in body_parts.items():
        missing = [code for code in codes if code not in regions]
        if missing:
            raise ValueError(f"body part {name} maps to {missing}, not listed in [regions]")
    return EventCodeTable(modalities, regions, body_parts, frozenset(ignored_modalities),
                          frozenset(ignored_body_parts))
