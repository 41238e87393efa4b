"""Identifiers and their assigning authorities as the index keeps them: an issuer in the
HL7 v2 HD shape DICOM uses (PS3.3 10.14: local namespace, universal id and its type), and
the Other Patient IDs of a patient (where the INS travels). In the index they are JSON
objects with the fields' names; these classes are the only code that reads or writes them."""

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Issuer:
    """Who assigned an identifier; every field may be empty."""

    local: str = ""  # Local Namespace Entity ID / Issuer of Patient ID
    universal: str = ""  # Universal Entity ID (an OID when the type is ISO)
    universal_type: str = ""  # Universal Entity ID Type (ISO, DNS, ...)

    def __bool__(self) -> bool:
        return bool(self.local or self.universal)

    def to_json(self) -> dict[str, str]:
        """Its JSON object: the fields that have a value."""
        return {name: value for name, value in asdict(self).items() if value}

    @classmethod
    def from_json(cls, value: dict[str, str]) -> "Issuer":
        """An issuer from its JSON object."""
        return cls(**{name: str(value.get(name, "")) for name in ("local", "universal",
                                                                   "universal_type")})


@dataclass(frozen=True)
class OtherPatientId:
    """One item of Other Patient IDs Sequence."""

    id: str
    type: str = ""  # Type of Patient ID (TEXT, RFID, BARCODE)
    issuer: Issuer = field(default_factory=Issuer)

    def to_json(self) -> dict[str, object]:
        """Its JSON object: the fields that have a value."""
        value: dict[str, object] = {"id": self.id, "type": self.type,
                                    "issuer": self.issuer.to_json()}
        return {name: item for name, item in value.items() if item}

    @classmethod
    def from_json(cls, value: dict) -> "OtherPatientId":
        """An identifier from its JSON object."""
        return cls(str(value.get("id", "")), str(value.get("type", "")),
                   Issuer.from_json(value.get("issuer") or {}))


@dataclass(frozen=True)
class Request:
    """One request an instance was acquired for (an item of its Request Attributes Sequence,
    PS3.3 Table 10-9, or its top-level attributes when it has none): the identifiers stay
    paired as received."""

    accession: str = ""
    accession_issuer: Issuer = field(default_factory=Issuer)
    procedure_id: str = ""  # Requested Procedure ID
    procedure_description: str = ""
    placer_order: str = ""  # Placer Order Number / Imaging Service Request
    filler_order: str = ""

    def to_json(self) -> dict[str, object]:
        """Its JSON object: the fields that have a value."""
        value: dict[str, object] = {**asdict(self), "accession_issuer":
                                    self.accession_issuer.to_json()}
        return {name: item for name, item in value.items() if item}

    @classmethod
    def from_json(cls, value: dict) -> "Request":
        """A request from its JSON object."""
        texts = {name: str(value.get(name, "")) for name in (
            "accession", "procedure_id", "procedure_description", "placer_order",
            "filler_order")}
        return cls(**texts, accession_issuer=Issuer.from_json(value.get("accession_issuer")
                                                              or {}))


def encode(value: object) -> str:
    """The index column text of a JSON value; empty for an empty value."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) if value else ""


def decode_issuer(text: str) -> Issuer:
    """The issuer kept in an index column ("" = none)."""
    return Issuer.from_json(json.loads(text)) if text else Issuer()


def decode_other_ids(text: str) -> list[OtherPatientId]:
    """The Other Patient IDs kept in an index column."""
    return [OtherPatientId.from_json(item) for item in json.loads(text)] if text else []


def decode_texts(text: str) -> list[str]:
    """A list of strings kept in an index column."""
    return [str(item) for item in json.loads(text)] if text else []


def decode_requests(text: str) -> list[Request]:
    """The requests kept in an index column."""
    return [Request.from_json(item) for item in json.loads(text)] if text else []
