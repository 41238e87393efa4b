"""Accept header parsing and transfer syntax negotiation (RFC 9110 12.5.1, PS3.18 8.7)."""

from dataclasses import dataclass, field

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# Far longer than any real client's (the national consumer's ten ranges are ~1 KB), and
# below the 16 KiB of a whole request head, so that this refusal, which names the header,
# is what a client over it gets.
MAX_ACCEPT_LENGTH = 8192


class NotAcceptableError(Exception):
    """Nothing the client accepts can be produced (HTTP 406)."""


class BadAcceptError(ValueError):
    """The Accept header cannot be read (HTTP 400)."""


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header, parameters unquoted, names lower-cased."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes."""
    parts, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_media_type(text: str) -> MediaRange:
    """One media type or range with its parameters (a Content-Type or an Accept item)."""
    pieces = _split(text, ";")
    media_type = pieces[0].strip().lower()
    if media_type.count("/") != 1:
        raise BadAcceptError(f"invalid media range {media_type[:80]!r}")
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, _, value = piece.partition("=")
        name, value = name.strip().lower(), value.strip().strip('"')
        if name == "q":
            try:
                q = min(max(float(value), 0.0), 1.0)
            except ValueError:
                raise BadAcceptError(f"invalid q value {value[:20]!r}") from None
        elif name:
            params[name] = value
    return MediaRange(media_type, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges by decreasing q, ties in header order; q=0 ranges dropped.

    Lenient where real clients are sloppy: empty items (a trailing comma), unknown
    parameters (``boundary=**``) and spaces around ``=`` are accepted.
    """
    if header is None or not header.strip():
        return [MediaRange("*/*")]
    if len(header) > MAX_ACCEPT_LENGTH:
        raise BadAcceptError(f"Accept header longer than {MAX_ACCEPT_LENGTH} characters")
    ranges = [parse_media_type(item) for item in _split(header, ",") if item.strip()]
    return sorted((r for r in ranges if r.q > 0), key=lambda r: -r.q)


def dicom_transfer_syntaxes(ranges: list[MediaRange]) -> list[str]:
    """Transfer syntaxes acceptable for ``application/dicom`` parts, preferred first.

    ``*`` means "as stored". A range without ``transfer-syntax`` means Explicit VR Little
    Endian, the default of PS3.18 8.7.3.5.2; so do ``*/*`` and ``multipart/*``.
    """
    choices: list[str] = []
    for media in ranges:
        if media.media_type == "multipart/related":
            if media.params.get("type", "application/dicom").lower() != "application/dicom":
                continue
        elif media.media_type not in ("*/*", "multipart/*"):
            continue
        syntax = media.params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN)
        if syntax not in choices:
            choices.append(syntax)
    return choices
