"""Everything the index knows of one study, in the shape a manifest needs: patient, study,
request identifiers, and every series with its instances: those published, not the IOCM
rejection notes (storage.rejections records each in rejected_instances; the instances they
reject are out of the index already)."""

from dataclasses import dataclass, field, fields

from storage.identifiers import (
    Issuer,
    OtherPatientId,
    Request,
    decode_issuer,
    decode_other_ids,
    decode_requests,
    decode_texts,
)
from storage.index import Index


@dataclass(frozen=True)
class SeriesContents:
    """One series and the instances it holds."""

    series_uid: str
    modality: str
    body_part: str
    series_number: int | None
    series_date: str
    series_time: str
    requests: list[Request]
    instances: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, SOP instance)


@dataclass(frozen=True)
class StudyContents:
    """A study as indexed (text values as received; JSON columns decoded)."""

    study_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_id_qualifiers: Issuer  # its universal id only (Issuer of Patient ID Qualifiers)
    other_patient_ids: list[OtherPatientId]
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    accession_issuer: Issuer
    study_id: str
    study_description: str
    referring_physician: str
    requested_procedure_ids: list[str]
    placer_order_numbers: list[str]
    first_received_at: float
    last_received_at: float
    character_set: str  # Specific Character Set of its text, values joined by backslashes
    series: list[SeriesContents]

    @property
    def patient_id_issuer(self) -> Issuer:
        """The authority of Patient ID: Issuer of Patient ID and its universal id."""
        return Issuer(self.issuer_of_patient_id, self.patient_id_qualifiers.universal,
                      self.patient_id_qualifiers.universal_type)

    @property
    def sop_uids(self) -> list[str]:
        """Every SOP Instance UID of the study."""
        return [sop for series in self.series for _, sop in series.instances]


_STUDY = """
    SELECT st.study_uid, p.patient_id, p.issuer_of_patient_id, st.patient_id_qualifiers,
           st.other_patient_ids,
           st.patient_name, st.patient_birth_date, st.patient_sex, st.study_date, st.study_time,
           st.accession_number, st.accession_issuer, st.study_id, st.study_description,
           st.referring_physician, st.requested_procedure_ids, st.placer_order_numbers,
           st.first_received_at, st.last_received_at, st.character_set
    FROM studies st JOIN patients p ON st.patient_pk = p.pk WHERE st.study_uid = :study_uid
"""
_INSTANCES = """
    SELECT se.series_uid, se.modality, se.body_part, se.series_number, se.series_date,
           se.series_time, se.requests, i.sop_class_uid, i.sop_uid
    FROM instances i JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk
    WHERE st.study_uid = :study_uid
    AND NOT EXISTS (SELECT 1 FROM rejected_instances r WHERE r.sop_uid = i.sop_uid)
    ORDER BY se.series_number, se.pk, i.instance_number, i.pk
"""
_DECODERS = {"patient_id_qualifiers": decode_issuer, "other_patient_ids": decode_other_ids,
             "accession_issuer": decode_issuer,
             "requested_procedure_ids": decode_texts, "placer_order_numbers": decode_texts}


def _indexed_before_v7(values: dict) -> list[Request]:
    """The requests of a series indexed before v7 (which kept none), from what the study row
    kept of its first instance: its Requested Procedure IDs and Placer Order Numbers, each
    list deduplicated. Paired by position when the lists are as long (one per request item),
    each with the one order (or procedure) when there is one; unpaired otherwise, as the
    pairing was not kept. Each is a request of the study's accession."""
    procedures, orders = values["requested_procedure_ids"], values["placer_order_numbers"]
    if len(procedures) == len(orders):
        pairs = list(zip(procedures, orders, strict=True))
    elif len(orders) <= 1 or len(procedures) <= 1:
        pairs = [(procedure, order) for procedure in procedures or [""]
                 for order in orders or [""]]
    else:
        pairs = [(procedure, "") for procedure in procedures] + \
            [("", order) for order in orders]
    return [Request(values["accession_number"], values["accession_issuer"],
                    procedure_id=procedure, placer_order=order) for procedure, order in pairs]


def _identifiers(request: Request) -> tuple[str, str, str]:
    return request.accession, request.procedure_id, request.placer_order


def load_study_contents(index: Index, study_uid: str) -> StudyContents | None:
    """The study with every series and instance, or None when it is not indexed. A series
    without stored requests (indexed before v7, or whose instances named none) is given
    those of the study row (``_indexed_before_v7``), each as a series states it if one does
    (with its description and filler order)."""
    rows = index.fetch(_STUDY, {"study_uid": study_uid})
    if not rows:
        return None
    names = [f.name for f in fields(StudyContents) if f.name != "series"]
    values = {name: _DECODERS[name](value) if name in _DECODERS else value
              for name, value in zip(names, rows[0], strict=True)}
    series: dict[str, SeriesContents] = {}
    for *columns, sop_class, sop_uid in index.fetch(_INSTANCES, {"study_uid": study_uid}):
        if columns[0] not in series:
            series[columns[0]] = SeriesContents(*columns[:-1], decode_requests(columns[-1]))
        series[columns[0]].instances.append((sop_class, sop_uid))
    stated = {_identifiers(request): request for item in series.values()
              for request in item.requests}
    fallback = [stated.get(_identifiers(request), request)
                for request in _indexed_before_v7(values)]
    for item in series.values():
        if not item.requests:
            item.requests.extend(fallback)
    return StudyContents(**values, series=list(series.values()))
