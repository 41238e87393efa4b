"""A registry's OperationOutcome (FHIR R4) read as issues a person reads, whatever shape
its JSON has: the one reader of the registry client's refusals, the console's publication
history and the registry probe."""

import json
from dataclasses import dataclass

_MAX_ISSUES = 20  # an answer listing more is cut: a person reads the first ones
_MAX_FIELD = 500  # characters of one field of an issue


@dataclass(frozen=True, slots=True)
class Issue:
    """One ``OperationOutcome.issue``: its severity, issue type, details text (an XDS error
    code at an MHD registry), diagnostics and where (expression, else location); "" or ()
    for what it does not say, or says with a value of the wrong JSON type."""

    severity: str
    code: str
    details: str
    diagnostics: str
    where: tuple[str, ...]

    @property
    def key(self) -> str:
        """What names the problem: the details text, else the issue type."""
        return self.details or self.code

    @property
    def text(self) -> str:
        """One line: ``severity code [details]: diagnostics (where)``, the details standing
        for the diagnostics when there are none."""
        said = self.diagnostics or self.details
        label = self.details if self.diagnostics else ""
        head = " ".join(part for part in (self.severity, self.code, label) if part)
        line = f"{head}: {said}" if head and said else head or said
        where = f"({', '.join(self.where)})" if self.where else ""
        return f"{line} {where}" if line and where else line or where


def _string(value: object) -> str:
    return value[:_MAX_FIELD] if isinstance(value, str) else ""


def _strings(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else []
    return tuple(item[:_MAX_FIELD] for item in items[:_MAX_ISSUES] if isinstance(item, str))


def outcome_issues(body: str | bytes) -> list[Issue]:
    """The issues of the OperationOutcome in ``body`` (JSON text), at most 20; [] when it is
    not JSON, not an OperationOutcome, or has no issue saying anything."""
    try:
        outcome = json.loads(body) if body else None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return []
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    listed = outcome.get("issue")
    issues = []
    for item in listed[:_MAX_ISSUES] if isinstance(listed, list) else []:
        if not isinstance(item, dict):
            continue
        details = item.get("details")
        issue = Issue(_string(item.get("severity")), _string(item.get("code")),
                      _string(details.get("text")) if isinstance(details, dict) else "",
                      _string(item.get("diagnostics")),
                      _strings(item.get("expression")) or _strings(item.get("location")))
        if issue.text:
            issues.append(issue)
    return issues
