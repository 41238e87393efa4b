"""The official PDSm profiles vendored under tests/data/pdsm/profiles: the elements every
instance must have (from the snapshots, not from our code), and finding or removing one."""

import json
from pathlib import Path

PROFILES = Path(__file__).parent / "data" / "pdsm" / "profiles"
DOCUMENT_REFERENCE = PROFILES / "StructureDefinition-pdsm-comprehensive-document-reference.json"
SUBMISSION_SET = PROFILES / "StructureDefinition-pdsm-submissionset-comprehensive.json"


def elements(profile: Path) -> dict[str, dict]:
    """The snapshot's ElementDefinitions by id."""
    return {e["id"]: e for e in json.loads(profile.read_text())["snapshot"]["element"]}


def mandatory(profile: Path) -> dict[str, str | None]:
    """Paths (below the resource) that every instance has: min >= 1 on the element and on
    each ancestor. An extension slice (``extension:name``) comes with the URL it requires;
    other slices and the insides of slices are left out."""
    table = elements(profile)
    found: dict[str, str | None] = {}
    for element_id, element in table.items():
        parts = element_id.split(".")
        if len(parts) < 2 or any(":" in part for part in parts[1:-1]):
            continue
        if ":" in parts[-1] and not parts[-1].startswith("extension:"):
            continue
        if all(table[".".join(parts[:n])].get("min", 0) >= 1 for n in range(2, len(parts) + 1)):
            url = element["type"][0]["profile"][0] if ":" in parts[-1] else None
            found[".".join(parts[1:])] = url
    return found


def has(resource: dict, path: str, url: str | None = None) -> bool:
    """Whether ``resource`` has a non-empty value at ``path`` (in every item of a list)."""
    head, _, rest = path.partition(".")
    if head.startswith("extension:"):
        return any(e.get("url") == url for e in resource.get("extension", []))
    value = resource.get(head)
    if value in (None, "", [], {}):
        return False
    items = value if isinstance(value, list) else [value]
    return not rest or all(has(item, rest, url) for item in items)


def remove(resource: dict, path: str, url: str | None = None) -> bool:
    """Delete what is at ``path`` (in every item of a list); whether anything was there."""
    head, _, rest = path.partition(".")
    if head.startswith("extension:"):
        kept = [e for e in resource.get("extension", []) if e.get("url") != url]
        removed = len(kept) < len(resource.get("extension", []))
        resource["extension"] = kept
        return removed
    if head not in resource:
        return False
    if not rest:
        del resource[head]
        return True
    value = resource[head]
    return any([remove(item, rest, url) for item in (value if isinstance(value, list)
                                                      else [value])])
