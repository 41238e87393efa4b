"""Attribute matching over the index (PS3.4 C.2.2.2), the engine behind QIDO-RS.

A query names a level (study, series, instance) and a list of ``Match`` objects on DICOM
keywords the index holds; the result rows are dicts keyword -> value. Every value reaches
SQLite as a bound parameter, never as SQL text.

A search can be confined to a set of instances (``within``: those a KOS manifest
references): then nothing else exists for it, as a row, in a count, or as a modality to
match.
"""

import enum
import json
import re
import sqlite3
import unicodedata
from dataclasses import dataclass

from storage.numbers import INT32_MAX, NumberError, parse_int


class Level(enum.IntEnum):
    """Query levels, ordered: a level can match on its own and its parents' attributes."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    INSTANCE = 3


@dataclass(frozen=True)
class Attribute:
    """An attribute the index can match on and return."""

    level: Level
    sql: str
    vr: str
    folded_sql: str | None = None  # accent- and case-folded column, for fuzzy PN matching


ATTRIBUTES: dict[str, Attribute] = {
    "PatientID": Attribute(Level.PATIENT, "p.patient_id", "LO"),
    "IssuerOfPatientID": Attribute(Level.PATIENT, "p.issuer_of_patient_id", "LO"),
    # The patient module of each study is its own (storage.index, v8).
    "PatientName": Attribute(Level.PATIENT, "st.patient_name", "PN", "st.patient_name_folded"),
    "PatientBirthDate": Attribute(Level.PATIENT, "st.patient_birth_date", "DA"),
    "PatientSex": Attribute(Level.PATIENT, "st.patient_sex", "CS"),
    "StudyInstanceUID": Attribute(Level.STUDY, "st.study_uid", "UI"),
    "StudyDate": Attribute(Level.STUDY, "st.study_date", "DA"),
    "StudyTime": Attribute(Level.STUDY, "st.study_time", "TM"),
    "AccessionNumber": Attribute(Level.STUDY, "st.accession_number", "SH"),
    "StudyID": Attribute(Level.STUDY, "st.study_id", "SH"),
    "StudyDescription": Attribute(Level.STUDY, "st.study_description", "LO"),
    "ReferringPhysicianName": Attribute(Level.STUDY, "st.referring_physician", "PN",
                                        "st.referring_physician_folded"),
    # Computed per study or series by its grouped query (_groups), over its series m or its
    # instances x: returned, never matched (but Modalities in Study, see Match.condition).
    "ModalitiesInStudy": Attribute(Level.STUDY, "group_concat(DISTINCT NULLIF(m.modality, ''))",
                                   "CS"),
    "NumberOfStudyRelatedSeries": Attribute(Level.STUDY, "count(*)", "IS"),
    "NumberOfStudyRelatedInstances": Attribute(Level.STUDY, "count(*)", "IS"),
    "SeriesInstanceUID": Attribute(Level.SERIES, "se.series_uid", "UI"),
    "Modality": Attribute(Level.SERIES, "se.modality", "CS"),
    "SeriesNumber": Attribute(Level.SERIES, "se.series_number", "IS"),
    "SeriesDescription": Attribute(Level.SERIES, "se.series_description", "LO"),
    "BodyPartExamined": Attribute(Level.SERIES, "se.body_part", "CS"),
    "SeriesDate": Attribute(Level.SERIES, "se.series_date", "DA"),
    "SeriesTime": Attribute(Level.SERIES, "se.series_time", "TM"),
    "NumberOfSeriesRelatedInstances": Attribute(Level.SERIES, "count(*)", "IS"),
    "SOPInstanceUID": Attribute(Level.INSTANCE, "i.sop_uid", "UI"),
    "SOPClassUID": Attribute(Level.INSTANCE, "i.sop_class_uid", "UI"),
    "InstanceNumber": Attribute(Level.INSTANCE, "i.instance_number", "IS"),
    "Rows": Attribute(Level.INSTANCE, "i.rows", "US"),
    "Columns": Attribute(Level.INSTANCE, "i.columns", "US"),
    "NumberOfFrames": Attribute(Level.INSTANCE, "i.frames", "IS"),
    "BitsAllocated": Attribute(Level.INSTANCE, "i.bits_allocated", "US"),
    # Known from the instances: the sql here is an instance's own value; a study or series
    # result has the one its instances carry (_grouped). Returned, never matched.
    "InstanceAvailability": Attribute(Level.STUDY, "'ONLINE'", "CS"),
    "TimezoneOffsetFromUTC": Attribute(Level.STUDY, "NULLIF(i.timezone_offset, '')", "SH"),
    "PerformedProcedureStepStartDate": Attribute(Level.SERIES, "NULLIF(i.pps_start_date, '')",
                                                 "DA"),
    "PerformedProcedureStepStartTime": Attribute(Level.SERIES, "NULLIF(i.pps_start_time, '')",
                                                 "TM"),
    "RequestAttributesSequence": Attribute(Level.SERIES, "NULLIF(i.request_attributes, '')",
                                           "SQ"),
}

_FROM = {
    Level.STUDY: "studies st JOIN patients p ON st.patient_pk = p.pk",
    Level.SERIES: "series se JOIN studies st ON se.study_pk = st.pk"
                  " JOIN patients p ON st.patient_pk = p.pk",
    Level.INSTANCE: "instances i JOIN series se ON i.series_pk = se.pk"
                    " JOIN studies st ON se.study_pk = st.pk"
                    " JOIN patients p ON st.patient_pk = p.pk",
}
_ORDER = {
    Level.STUDY: "st.study_date DESC, st.study_time DESC, st.pk",
    Level.SERIES: "se.series_number, se.pk",
    Level.INSTANCE: "i.instance_number, i.pk",
}
_COMPUTED_COUNTS = {"ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                    "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances"}
_FROM_INSTANCES = {"InstanceAvailability", "TimezoneOffsetFromUTC",
                   "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                   "RequestAttributesSequence"}
_RETURNED_ONLY = (_COMPUTED_COUNTS - {"ModalitiesInStudy"}) | _FROM_INSTANCES
# Confined to ``within`` (a CTE of SOP Instance UIDs): a series exists when one of its
# instances is within, a study when one of its series does.
_WITHIN = "WITH within(sop_uid) AS (SELECT value FROM json_each(?)) "
_SERIES_WITHIN = ("EXISTS (SELECT 1 FROM instances wi WHERE wi.series_pk = {}"
                  " AND wi.sop_uid IN within)")
_ROWS_WITHIN = {
    Level.STUDY: "EXISTS (SELECT 1 FROM series ws JOIN instances wi ON wi.series_pk = ws.pk"
                 " WHERE ws.study_pk = st.pk AND wi.sop_uid IN within)",
    Level.SERIES: _SERIES_WITHIN.format("se.pk"),
    Level.INSTANCE: "i.sop_uid IN within",
}

# PS3.5 6.2: DA is YYYYMMDD; TM is HH[MM[SS[.F{1,6}]]]. A range is "low-high", either open.
_DATE_TIME = {"DA": re.compile(r"[0-9]{8}"),
              "TM": re.compile(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?")}


def _check_date_time(keyword: str, vr: str, value: str) -> None:
    bounds = value.split("-", 1) if "-" in value else [value]
    if not all(not bound or _DATE_TIME[vr].fullmatch(bound) for bound in bounds):
        example = "20260110 or 20260101-20260131" if vr == "DA" else "1015 or 0800-1200"
        raise QueryError(f"{keyword} must be a {vr} value or range such as {example},"
                         f" not {value[:40]!r}")


class QueryError(ValueError):
    """A query the index cannot answer as asked (HTTP 400)."""


def fold_name(name: str) -> str:
    """Person name folded for fuzzy matching: no accents, lower case, every component
    (family, given, ... of each group) prefixed by ``^`` so a component prefix matches."""
    kept: list[str] = []
    latin_base = False
    for char in unicodedata.normalize("NFKD", name):
        if unicodedata.combining(char):
            if latin_base:  # an accent on a Latin letter: dropped (é -> e)
                continue
        else:
            latin_base = char.isascii()
        kept.append(char)  # other marks (e.g. Japanese dakuten) change the letter: kept
    plain = unicodedata.normalize("NFC", "".join(kept)).casefold()
    for separator in ("=", " ", ",", "-"):
        plain = plain.replace(separator, "^")
    return "^" + "^".join(part for part in plain.split("^") if part)


def _glob(value: str) -> str:
    """DICOM wildcards (* and ?) as a GLOB pattern; GLOB's own ``[`` escaped."""
    return value.replace("[", "[[]")


_NAME_GROUPS = 3  # alphabetic, ideographic, phonetic (PS3.5 6.2.1)


def _trimmed(group: str) -> str:
    """A component group without padding nor trailing empty components (PS3.5 6.2.1:
    "Doe^John" and "Doe^John^^^" are the same name)."""
    return group.strip(" ").rstrip("^ ")


def name_group(name: str, group: int) -> str:
    """Component group ``group`` (0 alphabetic, 1 ideographic, 2 phonetic) of a PN value,
    "" when absent; registered as the SQL function ``name_group`` by the index."""
    groups = name.split("=")
    return _trimmed(groups[group]) if group < len(groups) else ""


def _group_condition(column: str, group: int, key: str) -> tuple[str, str]:
    if "*" in key or "?" in key:
        return f"name_group({column}, {group}) GLOB ?", _glob(key)
    return f"name_group({column}, {group}) = ?", key


def _name_condition(column: str, value: str) -> tuple[str, list[object]]:
    """Single value or wild card matching of a PN key on the component groups of the
    names (PS3.4 C.2.2.2.1, PS3.18 8.3.4): a key with "=" matches group by group, its
    empty groups matching anything ("=山田^太郎" is a key on the ideographic group); a key
    of one group matches a name whose alphabetic, ideographic or phonetic group it matches
    ("Yamada^Tarou" and "山田^太郎" both find "Yamada^Tarou=山田^太郎=やまだ^たろう")."""
    keys = [_trimmed(key) for key in value.split("=")[:_NAME_GROUPS]]
    if len(keys) == 1:
        alternatives = [_group_condition(column, group, keys[0])
                        for group in range(_NAME_GROUPS)]
        return ("(" + " OR ".join(sql for sql, _ in alternatives) + ")",
                [param for _, param in alternatives])
    conditions = [_group_condition(column, group, key) for group, key in enumerate(keys)
                  if key]
    return " AND ".join(sql for sql, _ in conditions) or "1", [p for _, p in conditions]


@dataclass(frozen=True)
class Match:
    """One matching key: a keyword and the value from the query (PS3.18 8.3.4)."""

    keyword: str
    value: str

    def condition(self, fuzzy: bool, confined: bool = False) -> tuple[str, list[object]]:
        """SQL condition and parameters; empty value = universal match. ``confined``: the
        query has a ``within`` set of instances (``search``)."""
        attribute = ATTRIBUTES[self.keyword]
        value = self.value
        if value == "":
            return "1", []
        if self.keyword == "ModalitiesInStudy":
            modalities = [v for v in value.replace("\\", ",").split(",") if v]
            marks = ",".join("?" * len(modalities))
            within = " AND " + _SERIES_WITHIN.format("m.pk") if confined else ""
            return (f"EXISTS (SELECT 1 FROM series m WHERE m.study_pk = st.pk"
                    f" AND m.modality IN ({marks}){within})", list(modalities))
        if attribute.vr == "UI":
            uids = [v for v in value.replace("\\", ",").split(",") if v]
            return f"{attribute.sql} IN ({','.join('?' * len(uids))})", list(uids)
        if attribute.vr in ("IS", "US"):
            low, high = (-INT32_MAX - 1, INT32_MAX) if attribute.vr == "IS" else (0, 0xFFFF)
            try:
                return f"{attribute.sql} = ?", [parse_int(value, self.keyword, low, high)]
            except NumberError as exc:
                raise QueryError(str(exc)) from None
        if attribute.vr in ("DA", "TM"):
            _check_date_time(self.keyword, attribute.vr, value)
        if attribute.vr in ("DA", "TM") and "-" in value:
            low, _, high = value.partition("-")
            conditions, params = [], []
            if low:
                conditions.append(f"{attribute.sql} >= ?")
                params.append(low)
            if high:
                conditions.append(f"{attribute.sql} <= ?")
                # A time bound "1015" includes 101559.999: compare up to any suffix.
                params.append(high + ("\uffff" if attribute.vr == "TM" else ""))
            if not conditions:
                raise QueryError(f"{self.keyword} range {value!r} has no bound")
            conditions.append(f"{attribute.sql} != ''")
            return " AND ".join(conditions), params
        if attribute.vr == "PN" and fuzzy and attribute.folded_sql:
            # A component that starts with the folded value (PS3.18 8.3.4.6: implementation
            # defined); wildcards still work inside it.
            return f"{attribute.folded_sql} GLOB ?", ["*^" + _glob(fold_name(value)[1:]) + "*"]
        if attribute.vr == "PN":
            return _name_condition(attribute.sql, value)
        if "*" in value or "?" in value:
            return f"{attribute.sql} GLOB ?", [_glob(value)]
        return f"{attribute.sql} = ?", [value]


def search(db: sqlite3.Connection, level: Level, matches: list[Match], returned: list[str],
           fuzzy: bool, limit: int, offset: int, within: frozenset[str] | None = None
           ) -> list[dict[str, object]]:
    """Rows of ``level`` matching every ``Match``, with the ``returned`` keywords; only
    those of the instances ``within`` (SOP Instance UIDs) when given. The Request
    Attributes Sequence comes as read, JSON lists one a line: ``with_request_items`` makes
    it items (the index calls it once its lock is released)."""
    columns = [k for k in returned if k in ATTRIBUTES and ATTRIBUTES[k].level <= level]
    groups = _groups(level, columns)
    own = [k for k in columns if not any(k in keywords for _, keywords in groups)]
    where, params = _where(level, matches, fuzzy, within)
    keys = "st.pk, se.pk" if level >= Level.SERIES else "st.pk, NULL"
    sql = (f"SELECT {', '.join([keys, *(ATTRIBUTES[k].sql for k in own)])}"
           f" FROM {_FROM[level]}{where} ORDER BY {_ORDER[level]} LIMIT ? OFFSET ?")
    page = db.execute(_with(sql, within), [*params, limit, offset]).fetchall()
    rows = [dict(zip(own, row[2:], strict=True)) for row in page]
    # A study's or series' values computed once for each distinct one on the page (an
    # instance result carries its series' and its study's), not once per row.
    for group, keywords in groups:
        pks = sorted({row[group.key] for row in page})
        if not pks:
            continue
        sql = group.sql.format(values=", ".join(_grouped(k) for k in keywords),
                               within=group.within if within is not None else "")
        group_params = [*params[:1 if within is not None else 0], json.dumps(pks)]
        if group is _SERIES_REQUESTS:
            group_params.append(MAX_REQUEST_LINES)
        found = {pk: values for pk, *values in db.execute(_with(sql, within), group_params)}
        unknown = [None] * len(keywords)
        for row, keyed in zip(rows, page, strict=True):
            row.update(zip(keywords, found.get(keyed[group.key], unknown), strict=True))
    return [{k: row[k] for k in columns} for row in rows]


def with_request_items(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """``search`` rows with their Request Attributes Sequence as distinct items."""
    for row in rows:
        if "RequestAttributesSequence" in row:
            row["RequestAttributesSequence"] = request_items(
                str(row["RequestAttributesSequence"] or "").splitlines()) or None
    return rows


def count(db: sqlite3.Connection, level: Level, matches: list[Match], fuzzy: bool,
          within: frozenset[str] | None = None) -> int:
    """How many rows of ``level`` match every ``Match``: ``search`` without a page."""
    where, params = _where(level, matches, fuzzy, within)
    sql = f"SELECT count(*) FROM {_FROM[level]}{where}"
    return int(db.execute(_with(sql, within), params).fetchone()[0])


def _where(level: Level, matches: list[Match], fuzzy: bool, within: frozenset[str] | None
           ) -> tuple[str, list[object]]:
    """The WHERE clause of a search and its parameters (``within`` first, when given: the
    parameter of the ``_with`` CTE)."""
    for match in matches:
        attribute = ATTRIBUTES.get(match.keyword)
        if attribute is None or attribute.level > level:
            raise QueryError(f"{match.keyword} cannot be matched at the {level.name.lower()}"
                             " level")
        if match.keyword in _RETURNED_ONLY and match.value:
            raise QueryError(f"{match.keyword} is returned, not matched")
    confined = within is not None
    conditions = [_ROWS_WITHIN[level] if confined else "1"]
    params: list[object] = [json.dumps(sorted(within))] if within is not None else []
    for match in matches:
        sql, values = match.condition(fuzzy, confined)
        conditions.append(sql)
        params += values
    return f" WHERE {' AND '.join(conditions)}", params


def _with(sql: str, within: frozenset[str] | None) -> str:
    return sql if within is None else _WITHIN + sql


@dataclass(frozen=True)
class _Group:
    """A query computing values of the studies (key 0) or series (key 1) of a page, one row
    per pk of those given (a JSON list), with {values}, and {within} when confined."""

    key: int
    sql: str
    within: str
    keywords: frozenset[str]


_STUDY_SERIES = _Group(
    0, "SELECT m.study_pk, {values} FROM series m WHERE m.study_pk IN"
       " (SELECT value FROM json_each(?)){within} GROUP BY m.study_pk",
    " AND " + _SERIES_WITHIN.format("m.pk"),
    frozenset({"ModalitiesInStudy", "NumberOfStudyRelatedSeries"}))
_STUDY_INSTANCES = _Group(
    0, "SELECT xs.study_pk, {values} FROM instances x JOIN series xs ON x.series_pk = xs.pk"
       " WHERE xs.study_pk IN (SELECT value FROM json_each(?)){within} GROUP BY xs.study_pk",
    " AND x.sop_uid IN within", frozenset({"NumberOfStudyRelatedInstances"}))
_SERIES_INSTANCES = _Group(
    1, "SELECT x.series_pk, {values} FROM instances x WHERE x.series_pk IN"
       " (SELECT value FROM json_each(?)){within} GROUP BY x.series_pk",
    " AND x.sop_uid IN within", frozenset({"NumberOfSeriesRelatedInstances"}))
# The Request Attributes of a series: the distinct values (JSON lists) of its instances, the
# first MAX_REQUEST_LINES received, one a line (merged by request_items).
_SERIES_REQUESTS = _Group(
    1, "SELECT series_pk, {values} FROM (SELECT x.series_pk, x.request_attributes,"
       " row_number() OVER (PARTITION BY x.series_pk ORDER BY min(x.pk)) AS n FROM instances x"
       " WHERE x.series_pk IN (SELECT value FROM json_each(?)) AND x.request_attributes != ''"
       "{within} GROUP BY x.series_pk, x.request_attributes ORDER BY x.series_pk, n)"
       " WHERE n <= ? GROUP BY series_pk",
    " AND x.sop_uid IN within", frozenset({"RequestAttributesSequence"}))


def _groups(level: Level, columns: list[str]) -> list[tuple[_Group, list[str]]]:
    """The grouped queries the ``columns`` of a ``level`` result need, each with the
    keywords it computes there (in the order of ``columns``)."""
    from_instances = _FROM_INSTANCES - {"RequestAttributesSequence"}
    computes = [
        (_STUDY_SERIES, _STUDY_SERIES.keywords),
        (_STUDY_INSTANCES, _STUDY_INSTANCES.keywords
         | (from_instances if level is Level.STUDY else frozenset())),
        (_SERIES_INSTANCES, _SERIES_INSTANCES.keywords
         | (from_instances if level is Level.SERIES else frozenset())),
        (_SERIES_REQUESTS, _SERIES_REQUESTS.keywords if level is Level.SERIES
         else frozenset()),
    ]
    return [(group, [k for k in columns if k in keywords]) for group, keywords in computes
            if keywords & set(columns)]


def _grouped(keyword: str) -> str:
    """The SQL of ``keyword`` in its grouped query."""
    if keyword == "RequestAttributesSequence":
        return "group_concat(request_attributes, char(10))"
    if keyword not in _FROM_INSTANCES:
        return ATTRIBUTES[keyword].sql  # a count, or the modalities of the series m
    # A study or series value is the one its instances carry (those without one aside):
    # unknown when they disagree. InstanceAvailability: ONLINE, every indexed instance is on
    # local disk (PS3.3 C.4.23.1.1: immediately retrievable).
    column = ATTRIBUTES[keyword].sql.replace("i.", "x.")  # the expression on the instances x
    return f"CASE WHEN min({column}) = max({column}) THEN max({column}) END"


# PS3.18 Table 10.6.3-4 lists the Request Attributes Sequence of a series "if known" with no
# bound; a series is acquired for one request or a few, so a bound far above that costs a
# real series nothing and keeps a crafted one (thousands of items in each instance, which
# the structure limits allow) from making every search of it slow and its answer
# unbounded: the first MAX_REQUEST_ITEMS distinct items, in the order received, are the
# series' value (each a request the series was made for; any further one is not listed).
MAX_REQUEST_ITEMS = 100
MAX_REQUEST_LINES = 100  # distinct instance values read for one series


def request_items(lines: list[str]) -> list[list[str]]:
    """The distinct (Scheduled Procedure Step ID, Requested Procedure ID) pairs of
    Request Attributes values (JSON lists), in order, at most MAX_REQUEST_ITEMS."""
    seen: dict[tuple[str, ...], None] = {}
    for line in lines:
        for item in json.loads(line) if line else []:
            seen.setdefault(tuple(item))
            if len(seen) == MAX_REQUEST_ITEMS:
                return [list(item) for item in seen]
    return [list(item) for item in seen]
