"""The confidentiality of a published manifest: an HL7 v3 / TRE_A08 level and the French
visibility (masking) codes of TRE_A07, as the settings, the outbox and the MHD resources
carry it."""

import json
from dataclasses import dataclass

# HL7 v3 Confidentiality (TRE_A08) and the French visibility codes (TRE_A07).
CONFIDENTIALITY_CODES = ("N", "R", "V")
MASKING_CODES = ("MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REPRESENTANTS_LEGAUX",
                 "MASQUE_PSOCIAL", "MASQUE_PT")


@dataclass(frozen=True)
class Confidentiality:
    """Confidentiality code (N, R, V) and visibility (masking) codes of a manifest."""

    level: str = "N"
    masking: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.level not in CONFIDENTIALITY_CODES:
            raise ValueError(f"confidentiality must be one of {', '.join(CONFIDENTIALITY_CODES)}"
                             f", not {self.level!r}")
        unknown = [code for code in self.masking if code not in MASKING_CODES]
        if unknown:
            raise ValueError(f"unknown masking code(s) {', '.join(unknown)}: "
                             f"{', '.join(MASKING_CODES)}")

    def payload(self) -> str:
        """As an outbox payload."""
        return json.dumps({"level": self.level, "masking": list(self.masking)})

    @classmethod
    def from_payload(cls, payload: str) -> "Confidentiality":
        """From an outbox payload."""
        labels = json.loads(payload)
        return cls(labels["level"], tuple(labels["masking"]))
