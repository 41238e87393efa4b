"""Attribute matching over the index (PS3.4 C.2.2.2), the engine behind QIDO-RS.

A query names a level (study, series, instance) and a list of ``Match`` objects on DICOM
keywords the index holds; the result rows are dicts keyword -> value. Every value reaches
the database (SQLite or PostgreSQL, through SQLAlchemy) as a named bound parameter, never as
SQL text; where the dialects differ (wildcard matching, aggregates, JSON lists) each gets its
own spelling of the same semantics.

A search can be confined to a set of instances (``within``: those a KOS manifest
references): then nothing else exists for it, as a row, in a count, or as a modality to
match.
"""

import enum
import json
import re
import unicodedata
from dataclasses import dataclass, field

from sqlalchemy import Connection, bindparam, text

from storage.database import group_concat, json_values
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
    "ModalitiesInStudy": Attribute(Level.STUDY, "NULLIF(m.modality, '')", "CS"),  # aggregated
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
    "Rows": Attribute(Level.INSTANCE, 'i."rows"', "US"),
    "Columns": Attribute(Level.INSTANCE, 'i."columns"', "US"),
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

# Each level's table, and how it joins the table of the level below (its child).
_TABLES = {Level.PATIENT: ("patients p", "st.patient_pk = p.pk"),
           Level.STUDY: ("studies st", "se.study_pk = st.pk"),
           Level.SERIES: ("series se", "i.series_pk = se.pk"),
           Level.INSTANCE: ("instances i", "")}


def _from(level: Level, keywords: list[str]) -> str:
    """The tables a ``level`` query on ``keywords`` reads: its level's, and its parents' up
    to the highest level of a keyword (each row has its parents: an unread parent changes
    no count, and costs a join, e.g. every patient for a month of studies)."""
    top = min([level, *(ATTRIBUTES[k].level for k in keywords)])
    joins = [_TABLES[level][0]]
    for parent in range(level - 1, top - 1, -1):
        table, on = _TABLES[Level(parent)]
        joins.append(f"JOIN {table} ON {on}")
    return " ".join(joins)


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
# Confined to ``within`` (a CTE of SOP Instance UIDs, bound as one JSON list): a series
# exists when one of its instances is within, a study when one of its series does.
_IN_WITHIN = "IN (SELECT sop_uid FROM within)"
_SERIES_WITHIN = ("EXISTS (SELECT 1 FROM instances wi WHERE wi.series_pk = {}"
                  f" AND wi.sop_uid {_IN_WITHIN})")
_ROWS_WITHIN = {
    Level.STUDY: "EXISTS (SELECT 1 FROM series ws JOIN instances wi ON wi.series_pk = ws.pk"
                 f" WHERE ws.study_pk = st.pk AND wi.sop_uid {_IN_WITHIN})",
    Level.SERIES: _SERIES_WITHIN.format("se.pk"),
    Level.INSTANCE: f"i.sop_uid {_IN_WITHIN}",
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


@dataclass
class _Params:
    """The named parameters of one statement, :p0, :p1... in the order bound."""

    values: dict[str, object] = field(default_factory=dict)

    def bind(self, value: object) -> str:
        """The placeholder of a new parameter holding ``value``."""
        name = f"p{len(self.values)}"
        self.values[name] = value
        return f":{name}"

    def bind_all(self, values: list[str]) -> str:
        """A parenthesised list of new parameters, for IN."""
        return "(" + ", ".join(self.bind(value) for value in values) + ")"


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


_LIKE_ESCAPE = "\\"


def _wildcard(dialect: str, column: str, key: str, params: _Params) -> str:
    """``column`` matching ``key``, whose ``*`` is any run of characters and ``?`` any one,
    every other character itself, case-sensitive (PS3.4 C.2.2.2.4). SQLite: GLOB (its ``[``
    escaped); PostgreSQL: LIKE (case-sensitive there), its ``%``, ``_`` and escape escaped."""
    if dialect == "postgresql":
        pattern = "".join({"*": "%", "?": "_", "%": "\\%", "_": "\\_", "\\": "\\\\"}.get(c, c)
                          for c in key)
        return f"{column} LIKE {params.bind(pattern)} ESCAPE '{_LIKE_ESCAPE}'"
    return f"{column} GLOB {params.bind(key.replace('[', '[[]'))}"


def _has_wildcard(key: str) -> bool:
    return "*" in key or "?" in key


_NAME_GROUPS = 3  # alphabetic, ideographic, phonetic (PS3.5 6.2.1)


def _trimmed(group: str) -> str:
    """A component group without padding nor trailing empty components (PS3.5 6.2.1:
    "Doe^John" and "Doe^John^^^" are the same name)."""
    return group.strip(" ").rstrip("^ ")


def name_group(name: str, group: int) -> str:
    """Component group ``group`` (0 alphabetic, 1 ideographic, 2 phonetic) of a PN value,
    "" when absent; the SQL function ``name_group`` on SQLite (registered at connect) and
    on PostgreSQL (created by the baseline migration with the same results)."""
    groups = name.split("=")
    return _trimmed(groups[group]) if group < len(groups) else ""


def _group_condition(dialect: str, column: str, group: int, key: str, params: _Params) -> str:
    grouped = f"name_group({column}, {group})"
    if _has_wildcard(key):
        return _wildcard(dialect, grouped, key, params)
    return f"{grouped} = {params.bind(key)}"


def _name_condition(dialect: str, column: str, value: str, params: _Params) -> str:
    """Single value or wild card matching of a PN key on the component groups of the
    names (PS3.4 C.2.2.2.1, PS3.18 8.3.4): a key with "=" matches group by group, its
    empty groups matching anything ("=山田^太郎" is a key on the ideographic group); a key
    of one group matches a name whose alphabetic, ideographic or phonetic group it matches
    ("Yamada^Tarou" and "山田^太郎" both find "Yamada^Tarou=山田^太郎=やまだ^たろう")."""
    keys = [_trimmed(key) for key in value.split("=")[:_NAME_GROUPS]]
    if len(keys) == 1:
        return "(" + " OR ".join(_group_condition(dialect, column, group, keys[0], params)
                                 for group in range(_NAME_GROUPS)) + ")"
    return " AND ".join(_group_condition(dialect, column, group, key, params)
                        for group, key in enumerate(keys) if key) or "TRUE"


def _uid_list(value: str) -> list[str]:
    """The values of a list key (UIDs, modalities), backslash or comma separated."""
    return [v for v in value.replace("\\", ",").split(",") if v]


@dataclass(frozen=True)
class Match:
    """One matching key: a keyword and the value from the query (PS3.18 8.3.4)."""

    keyword: str
    value: str

    def condition(self, dialect: str, fuzzy: bool, confined: bool, params: _Params) -> str:
        """The SQL condition on ``dialect``, its values bound in ``params``; an empty value
        is universal matching. ``confined``: the query has a ``within`` set of instances
        (``search``)."""
        attribute = ATTRIBUTES[self.keyword]
        value = self.value
        if value == "":
            return "TRUE"
        if attribute.vr in ("IS", "US"):
            low, high = (-INT32_MAX - 1, INT32_MAX) if attribute.vr == "IS" else (0, 0xFFFF)
            try:
                return f"{attribute.sql} = {params.bind(parse_int(value, self.keyword, low, high))}"
            except NumberError as exc:
                raise QueryError(str(exc)) from None
        if attribute.vr in ("DA", "TM"):
            _check_date_time(self.keyword, attribute.vr, value)
        if dialect == "postgresql" and "\x00" in value:
            return "FALSE"  # PostgreSQL text holds no NUL: no stored value has one
        if self.keyword == "ModalitiesInStudy":
            modalities = _uid_list(value)
            if not modalities:
                return "FALSE"
            within = " AND " + _SERIES_WITHIN.format("m.pk") if confined else ""
            return (f"EXISTS (SELECT 1 FROM series m WHERE m.study_pk = st.pk"
                    f" AND m.modality IN {params.bind_all(modalities)}{within})")
        if attribute.vr == "UI":
            uids = _uid_list(value)
            return f"{attribute.sql} IN {params.bind_all(uids)}" if uids else "FALSE"
        if attribute.vr in ("DA", "TM") and "-" in value:
            low, _, high = value.partition("-")
            conditions = []
            if low:
                conditions.append(f"{attribute.sql} >= {params.bind(low)}")
            if high:
                # A time bound "1015" includes 101559.999: compare up to any suffix (the
                # column compares code point by code point on both dialects: tables.py).
                bound = high + ("\uffff" if attribute.vr == "TM" else "")
                conditions.append(f"{attribute.sql} <= {params.bind(bound)}")
            if not conditions:
                raise QueryError(f"{self.keyword} range {value!r} has no bound")
            conditions.append(f"{attribute.sql} != ''")
            return " AND ".join(conditions)
        if attribute.vr == "PN" and fuzzy and attribute.folded_sql:
            # A component that starts with the folded value (PS3.18 8.3.4.6: implementation
            # defined); wildcards still work inside it.
            return _wildcard(dialect, attribute.folded_sql, "*^" + fold_name(value)[1:] + "*",
                             params)
        if attribute.vr == "PN":
            return _name_condition(dialect, attribute.sql, value, params)
        if _has_wildcard(value):
            return _wildcard(dialect, attribute.sql, value, params)
        return f"{attribute.sql} = {params.bind(value)}"


def search(conn: Connection, level: Level, matches: list[Match], returned: list[str],
           fuzzy: bool, limit: int, offset: int, within: frozenset[str] | None = None
           ) -> list[dict[str, object]]:
    """Rows of ``level`` matching every ``Match``, with the ``returned`` keywords; only
    those of the instances ``within`` (SOP Instance UIDs) when given. The Request
    Attributes Sequence comes as read, JSON lists one a line: ``with_request_items`` makes
    it items (the index calls it once its connection is back in the pool)."""
    dialect = conn.dialect.name
    columns = [k for k in returned if k in ATTRIBUTES and ATTRIBUTES[k].level <= level]
    groups = _groups(level, columns)
    own = [k for k in columns if not any(k in keywords for _, keywords in groups)]
    params = _Params()
    where = _where(dialect, level, matches, fuzzy, within, params)
    keys = "st.pk, se.pk" if level >= Level.SERIES else "st.pk, NULL"
    tables = _from(level, [*_matched(matches), *own, "StudyInstanceUID"])  # keys: st.pk
    sql = (f"SELECT {', '.join([keys, *(ATTRIBUTES[k].sql for k in own)])}"
           f" FROM {tables} WHERE {where} ORDER BY {_ORDER[level]}"
           f" LIMIT {params.bind(limit)} OFFSET {params.bind(offset)}")
    page = conn.execute(text(_with(dialect, sql, within)), params.values).all()
    rows = [dict(zip(own, row[2:], strict=True)) for row in page]
    # A study's or series' values computed once for each distinct one on the page (an
    # instance result carries its series' and its study's), not once per row.
    for group, keywords in groups:
        pks = sorted({row[group.key] for row in page})
        if not pks:
            continue
        found = group.values(conn, keywords, pks, within)
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


def count(conn: Connection, level: Level, matches: list[Match], fuzzy: bool,
          within: frozenset[str] | None = None) -> int:
    """How many rows of ``level`` match every ``Match``: ``search`` without a page."""
    dialect = conn.dialect.name
    params = _Params()
    where = _where(dialect, level, matches, fuzzy, within, params)
    sql = f"SELECT count(*) FROM {_from(level, _matched(matches))} WHERE {where}"
    return int(conn.execute(text(_with(dialect, sql, within)), params.values).scalar_one())


def _matched(matches: list[Match]) -> list[str]:
    """The keywords ``matches`` match on (universal matching matches on nothing)."""
    return [match.keyword for match in matches if match.value]


def _where(dialect: str, level: Level, matches: list[Match], fuzzy: bool,
           within: frozenset[str] | None, params: _Params) -> str:
    """The WHERE condition of a search, its values bound in ``params`` (``within`` as the
    parameter of the ``_with`` CTE)."""
    for match in matches:
        attribute = ATTRIBUTES.get(match.keyword)
        if attribute is None or attribute.level > level:
            raise QueryError(f"{match.keyword} cannot be matched at the {level.name.lower()}"
                             " level")
        if match.keyword in _RETURNED_ONLY and match.value:
            raise QueryError(f"{match.keyword} is returned, not matched")
    confined = within is not None
    conditions = [_ROWS_WITHIN[level]] if confined else []
    if within is not None:
        params.values["within"] = json.dumps(sorted(within))
    conditions += [match.condition(dialect, fuzzy, confined, params) for match in matches]
    return " AND ".join(conditions) or "TRUE"


def _with(dialect: str, sql: str, within: frozenset[str] | None) -> str:
    """``sql`` with the CTE ``within`` of the instances it is confined to, when it is."""
    if within is None:
        return sql
    # MATERIALIZED: the list read once, not again for each row a nested loop would try.
    return f"WITH within(sop_uid) AS MATERIALIZED ({json_values(dialect, 'within')}) {sql}"


@dataclass(frozen=True)
class _Group:
    """A query computing values of the studies (key 0) or series (key 1) of a page (:pks),
    with {values}, and {within} when confined: one row per pk, or with ``lines`` one row per
    distinct value of a pk, joined one a line."""

    key: int
    sql: str
    within: str
    keywords: frozenset[str]
    lines: bool = False

    def values(self, conn: Connection, keywords: list[str], pks: list[int],
               within: frozenset[str] | None) -> dict[int, list[object]]:
        """The values of ``keywords`` of each of ``pks`` (those it has)."""
        dialect = conn.dialect.name
        sql = self.sql.format(values=", ".join(_grouped(dialect, k) for k in keywords),
                              within=self.within if within is not None else "")
        params: dict[str, object] = {"pks": pks}
        if self.lines:
            params["lines"] = MAX_REQUEST_LINES
        if within is not None:
            params["within"] = json.dumps(sorted(within))
        statement = text(_with(dialect, sql, within)).bindparams(
            bindparam("pks", expanding=True))
        rows = conn.execute(statement, params).all()
        if not self.lines:
            return {pk: values for pk, *values in rows}
        lines: dict[int, list[str]] = {}
        for pk, line in rows:
            lines.setdefault(pk, []).append(line)
        return {pk: ["\n".join(values)] for pk, values in lines.items()}


_STUDY_SERIES = _Group(
    0, "SELECT m.study_pk, {values} FROM series m WHERE m.study_pk IN :pks{within}"
       " GROUP BY m.study_pk",
    " AND " + _SERIES_WITHIN.format("m.pk"),
    frozenset({"ModalitiesInStudy", "NumberOfStudyRelatedSeries"}))
_STUDY_INSTANCES = _Group(
    0, "SELECT xs.study_pk, {values} FROM instances x JOIN series xs ON x.series_pk = xs.pk"
       " WHERE xs.study_pk IN :pks{within} GROUP BY xs.study_pk",
    f" AND x.sop_uid {_IN_WITHIN}", frozenset({"NumberOfStudyRelatedInstances"}))
_SERIES_INSTANCES = _Group(
    1, "SELECT x.series_pk, {values} FROM instances x WHERE x.series_pk IN :pks{within}"
       " GROUP BY x.series_pk",
    f" AND x.sop_uid {_IN_WITHIN}", frozenset({"NumberOfSeriesRelatedInstances"}))
# The Request Attributes of a series: the distinct values (JSON lists) of its instances, the
# first MAX_REQUEST_LINES received, a row each (joined one a line, merged by request_items).
_SERIES_REQUESTS = _Group(
    1, "SELECT series_pk, {values} FROM (SELECT x.series_pk, x.request_attributes,"
       " row_number() OVER (PARTITION BY x.series_pk ORDER BY min(x.pk)) AS n FROM instances x"
       " WHERE x.series_pk IN :pks AND x.request_attributes != ''{within}"
       " GROUP BY x.series_pk, x.request_attributes) AS r"
       " WHERE n <= :lines ORDER BY series_pk, n",
    f" AND x.sop_uid {_IN_WITHIN}", frozenset({"RequestAttributesSequence"}), lines=True)


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


def _grouped(dialect: str, keyword: str) -> str:
    """The SQL of ``keyword`` in its grouped query."""
    if keyword == "RequestAttributesSequence":
        return "request_attributes"  # a row per distinct value (_SERIES_REQUESTS)
    if keyword == "ModalitiesInStudy":
        return group_concat(dialect, ATTRIBUTES[keyword].sql, distinct=True)
    if keyword not in _FROM_INSTANCES:
        return ATTRIBUTES[keyword].sql  # a count
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
