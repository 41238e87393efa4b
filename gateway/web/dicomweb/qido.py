"""QIDO-RS search (PS3.18 10.6), answered from the index, never by opening files."""

from urllib.parse import urlsplit

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from gateway.urls import retrieve_url
from gateway.web.dicomweb.wado import check_uids
from gateway.web.http.request_target import target_of
from gateway.web.http.responses import error, json_response
from gateway.web.middleware.manifest_scope import scoped_instances
from gateway.web.services import services_of
from storage.numbers import INT32_MAX, NumberError, parse_int
from storage.search import ATTRIBUTES, Level, Match, QueryError
from storage.store import Store

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000  # maxResults of PS3.18 8.3.4.4.1: a larger limit is cut to it
# What every result carries (PS3.18 Tables 10.6.3-3 to -5, with Study Description and Body
# Part Examined besides), and, of those, what is sent only when known (the table's type C
# "Shall be present if known", unless the query names them: dicom_json); the others are sent
# empty when unknown (PS3.4 C.2.2.1.2).
_STUDY_RETURN = ["StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
                 "ModalitiesInStudy", "ReferringPhysicianName", "TimezoneOffsetFromUTC",
                 "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                 "StudyInstanceUID", "StudyID", "StudyDescription",
                 "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
_SERIES_RETURN = ["Modality", "TimezoneOffsetFromUTC", "SeriesDescription",
                  "SeriesInstanceUID", "SeriesNumber", "BodyPartExamined",
                  "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
                  "PerformedProcedureStepStartTime", "RequestAttributesSequence"]
_INSTANCE_RETURN = ["SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
                    "TimezoneOffsetFromUTC", "InstanceNumber", "Rows", "Columns",
                    "BitsAllocated", "NumberOfFrames"]
_IF_KNOWN = {"InstanceAvailability", "TimezoneOffsetFromUTC", "SeriesDescription",
             "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
             "RequestAttributesSequence", "Rows", "Columns", "BitsAllocated", "NumberOfFrames"}
# A Request Attributes Sequence item: Scheduled Procedure Step ID and Requested Procedure ID,
# both required in it (Table 10.6.3-4), both SH.
_REQUEST_ITEM_TAGS = ("00400009", "00401001")
_CONTROL_KEYS = {"limit", "offset", "fuzzymatching", "includefield"}
_MAX_INCLUDEFIELDS = 200


class BadQueryError(ValueError):
    """A query string that cannot be understood (HTTP 400)."""


def _keyword(key: str) -> str:
    """A DICOM keyword from a keyword or an 8-digit hexadecimal tag."""
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        keyword = keyword_for_tag(int(key, 16))
    else:
        keyword = key if tag_for_keyword(key) is not None else ""
    if not keyword:
        raise BadQueryError(f"unknown attribute {key[:64]!r}")
    return keyword


def _default_return(level: Level, scope: dict[str, str]) -> list[str]:
    """The attributes of PS3.18 10.6.3.3: those of the level, and those of the study (of the
    series) when the target is not one study (one series)."""
    returned = ["StudyInstanceUID"] if "StudyInstanceUID" in scope else list(_STUDY_RETURN)
    if level >= Level.SERIES:
        returned += (["SeriesInstanceUID"] if level is Level.INSTANCE and
                     "SeriesInstanceUID" in scope else _SERIES_RETURN)
    if level is Level.INSTANCE:
        returned += _INSTANCE_RETURN
    return list(dict.fromkeys(returned))


def _int_param(name: str, text: str, maximum: int) -> int:
    try:
        return parse_int(text, name, 0, maximum)
    except NumberError as exc:
        raise BadQueryError(str(exc)) from None


def parse_query(items: list[tuple[str, str]], level: Level, scope: dict[str, str]
                ) -> tuple[list[Match], list[str], bool, int, int, set[str]]:
    """Matches, returned keywords, fuzzy flag, limit, offset of a QIDO query string, and
    the keywords it names (matching keys, includefield other than "all")."""
    matches = [Match(keyword, uid) for keyword, uid in scope.items()]
    returned = _default_return(level, scope)
    named: set[str] = set()
    fuzzy, limit, offset = False, DEFAULT_LIMIT, 0
    includes = 0
    for key, value in items:
        if key == "limit":  # any uint; the server returns at most MAX_LIMIT
            limit = min(_int_param("limit", value, INT32_MAX), MAX_LIMIT)
        elif key == "offset":
            offset = _int_param("offset", value, INT32_MAX)
        elif key == "fuzzymatching":
            if value not in ("true", "false"):
                raise BadQueryError("fuzzymatching must be true or false")
            fuzzy = value == "true"
        elif key == "includefield":
            for field in filter(None, value.split(",")):
                includes += 1
                if includes > _MAX_INCLUDEFIELDS:
                    raise BadQueryError(f"more than {_MAX_INCLUDEFIELDS} includefield values")
                if field == "all":
                    wanted = [k for k, a in ATTRIBUTES.items() if a.level <= level]
                else:
                    wanted = [_keyword(field)]
                    named.add(wanted[0])
                returned += [k for k in wanted if k not in returned]
        else:
            keyword = _keyword(key)
            if any(m.keyword == keyword for m in matches):
                raise BadQueryError(f"{keyword} is given more than once")
            matches.append(Match(keyword, value))
            named.add(keyword)
            if keyword not in returned:
                returned.append(keyword)
    return matches, returned, fuzzy, limit, offset, named


# The DICOM JSON key of each attribute QIDO-RS returns (looked up once, not per result).
_TAGS = {keyword: f"{tag_for_keyword(keyword):08X}" for keyword in ATTRIBUTES}


def _json_value(vr: str, value: object) -> dict[str, object]:
    element: dict[str, object] = {"vr": vr}
    if value is None or value == "":
        return element
    if vr == "SQ" and isinstance(value, list):  # Request Attributes items, see storage.search
        element["Value"] = [{tag: _json_value("SH", text)
                             for tag, text in zip(_REQUEST_ITEM_TAGS, item, strict=True)}
                            for item in value]
    elif vr == "PN":
        groups = str(value).split("=")
        names = {k: g for k, g in zip(("Alphabetic", "Ideographic", "Phonetic"), groups,
                                      strict=False) if g}
        element["Value"] = [names]
    elif vr in ("IS", "US"):
        element["Value"] = [int(value)]  # type: ignore[call-overload]
    elif vr == "CS":
        element["Value"] = sorted(str(value).replace(",", "\\").split("\\"))
    else:
        element["Value"] = str(value).split("\\")
    return element


def dicom_json(row: dict[str, object], level: Level, dicomweb_root: str,
               named: set[str]) -> dict[str, object]:
    """One result as a DICOM JSON object, with its RetrieveURL (0008,1190). An attribute
    the query ``named`` is there even without a value: an includefield is a return key,
    C-FIND universal matching (PS3.18 8.3.4.3, PS3.4 C.2.2.2.3: the attribute "be returned"),
    and the response "shall contain" the attributes passed as match or includefield
    parameters (PS3.18 10.6.3.3.1, 10.6.3.3.2); an empty value is an element without
    "Value" (PS3.18 F.2.5)."""
    result = {_TAGS[k]: _json_value(ATTRIBUTES[k].vr, v)
              for k, v in row.items()
              if not (k in _IF_KNOWN and k not in named and v in (None, ""))}
    url = retrieve_url(dicomweb_root, str(row["StudyInstanceUID"]),
                       str(row["SeriesInstanceUID"]) if level >= Level.SERIES else "",
                       str(row["SOPInstanceUID"]) if level is Level.INSTANCE else "")
    result["00081190"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(result.items()))


async def _search(request: Request, level: Level) -> Response:
    if problem := check_uids(request):
        return problem
    target = target_of(request)
    scope = {keyword: uid for keyword, uid in (("StudyInstanceUID", target.study),
                                               ("SeriesInstanceUID", target.series)) if uid}
    try:
        matches, returned, fuzzy, limit, offset, named = parse_query(list(target.query), level,
                                                                     scope)
        for needed in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if ATTRIBUTES[needed].level <= level and needed not in returned:
                returned.append(needed)
        store: Store = services_of(request).store
        # Under a manifest: what it references, and nothing else, exists.
        within = scoped_instances(request)
        rows = await run_in_threadpool(store.index.search, level, matches, returned, fuzzy,
                                       limit, offset, within)
        # A full page may not be the last one: how many matches are left after it.
        remaining = (await run_in_threadpool(store.index.count, level, matches, fuzzy, within)
                     - offset - len(rows) if len(rows) == limit else 0)
    except (BadQueryError, QueryError) as exc:
        return error(400, str(exc))
    root = services_of(request).dicomweb_root
    # 200 with an empty array when nothing matches (CP-2473, RFC 9110 15.3.5).
    response = json_response(request, [dicom_json(row, level, root, named)
                                               for row in rows])
    if remaining > 0:
        # PS3.18 8.3.4.4.1: "299 <service>: There are <remaining> additional results that
        # can be requested", in the syntax of RFC 7234 5.5 (warn-agent host[:port], quoted
        # warn-text), as dcm4chee sends it.
        response.headers["Warning"] = (f'299 {urlsplit(root).netloc} "There are {remaining}'
                                       ' additional results that can be requested"')
    return response


async def search_studies(request: Request) -> Response:
    """GET /studies?..."""
    return await _search(request, Level.STUDY)


async def search_series(request: Request) -> Response:
    """GET /series?... and /studies/{study}/series?..."""
    return await _search(request, Level.SERIES)


async def search_instances(request: Request) -> Response:
    """GET /instances?..., /studies/{study}/instances?... and .../series/{series}/instances?..."""
    return await _search(request, Level.INSTANCE)
