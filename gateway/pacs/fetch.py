"""Fetching studies from the PACS peers (``passerelle fetch``, ``POST /admin/fetch``): a
Study Root C-FIND at STUDY level on each peer (or the one named), then a C-MOVE to our own
AE title or a C-GET of each study matched (PS3.4 C.4.2, C.4.3). What arrives goes through
the ingest of every C-STORE (``Store``): the stable-study watcher sees the study change and
publishes it as it publishes one pushed to us.

A fetch is bounded: at most ``MAX_STUDIES`` studies, matched before anything is retrieved.
Its course is a sequence of events (plain dicts, one JSON object each on the admin API):
``found`` (the matches), ``progress`` (after each pending C-MOVE / C-GET response),
``study`` (the outcome of one study) and a final ``summary``.
"""

import datetime
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from gateway import metrics
from gateway.dicom.pacs_client import PacsError, StudyMatch, find_studies, retrieve_study
from gateway.dicom.peer import DicomPeer
from gateway.pacs.restore import Restorer, printable
from storage.uids import is_valid_uid

log = logging.getLogger(__name__)

MAX_STUDIES = 100
# Accession Number is SH (16), Patient ID LO (64) (PS3.5 6.2); a C-FIND key holding "*",
# "?" or "\" would be a wildcard or a list of values (PS3.4 C.2.2.2.4, C.2.2.2.2) and match
# far more than the one value asked for.
_VALUE = {"accession": re.compile(r"[^\x00-\x1f*?\\]{1,16}"),
          "patient_id": re.compile(r"[^\x00-\x1f*?\\]{1,64}")}

Emit = Callable[[dict[str, object]], None]


class FetchRefusedError(ValueError):
    """A fetch refused before anything was retrieved; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FetchQuery:
    """Which studies to fetch: one Study Instance UID, one Accession Number, or the studies
    of one Patient ID (since a study date); from one peer or every peer."""

    study_uid: str = ""
    accession: str = ""
    patient_id: str = ""
    since: datetime.date | None = None
    peer: str = ""

    @classmethod
    def parse(cls, body: Mapping[str, object]) -> "FetchQuery":
        """The query of an ``/admin/fetch`` body (``study``, ``accession``, ``patient``,
        ``since``: YYYY-MM-DD, ``peer``); ValueError saying what is wrong."""
        if not isinstance(body, Mapping):
            raise ValueError("expected a JSON object")
        unknown = set(body) - {"study", "accession", "patient", "since", "peer"}
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))[:200]}")
        fields = {name: body.get(name) for name in ("study", "accession", "patient", "since",
                                                    "peer")}
        for name, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
        study, accession, patient, since, peer = (str(v or "").strip() for v in fields.values())
        if sum(map(bool, (study, accession, patient))) != 1:
            raise ValueError("give exactly one of study, accession or patient")
        if study and not is_valid_uid(study):
            raise ValueError(f"invalid study UID {study[:80]!r}")
        for name, value in (("accession", accession), ("patient_id", patient)):
            if value and not _VALUE[name].fullmatch(value):
                raise ValueError(f"invalid {name.replace('_', ' ')} {value[:80]!r}: at most "
                                 f"{16 if name == 'accession' else 64} characters, no control "
                                 "character, no * ? or \\")
        if since and not patient:
            raise ValueError("since applies to a patient's studies only")
        try:
            date = datetime.date.fromisoformat(since) if since else None
        except ValueError:
            raise ValueError(f"since must be a date, YYYY-MM-DD: {since[:40]!r}") from None
        return cls(study, accession, patient, date, peer)

    def body(self) -> dict[str, str]:
        """The ``/admin/fetch`` body of this query."""
        fields = {"study": self.study_uid, "accession": self.accession,
                  "patient": self.patient_id,
                  "since": self.since.isoformat() if self.since else "", "peer": self.peer}
        return {name: value for name, value in fields.items() if value}

    def describe(self) -> str:
        """The query, for a person."""
        if self.study_uid:
            return f"study {self.study_uid}"
        if self.accession:
            return f"accession number {self.accession}"
        return f"patient {self.patient_id}" + (f" since {self.since}" if self.since else "")


@dataclass(frozen=True)
class Found:
    """The studies a fetch retrieves, each from the first peer that has it, and what
    could not be asked (a peer unreachable while another answered)."""

    matches: list[tuple[DicomPeer, StudyMatch]]
    problems: list[str]


def peers_of(restorer: Restorer, query: FetchQuery) -> list[DicomPeer]:
    """The peers a fetch asks; FetchRefusedError (400) when none is configured or the peer
    named is not one of them."""
    config = restorer.config
    if not config.peers:
        raise FetchRefusedError(400, "no PACS peer is configured (setting pacs, "
                                     "PASSERELLE_PACS): there is nothing to fetch from")
    if not query.peer:
        return list(config.peers)
    peer = config.named(query.peer)
    if peer is None:
        raise FetchRefusedError(400, f"no PACS peer {query.peer[:16]!r}: the configured ones "
                                f"are {', '.join(p.ae_title for p in config.peers)}")
    return [peer]


def find(restorer: Restorer, query: FetchQuery) -> Found:
    """C-FIND on the peers; FetchRefusedError when none answered (502), nothing matched
    (404) or more than ``MAX_STUDIES`` did (400)."""
    config, matches, problems = restorer.config, {}, []
    for peer in peers_of(restorer, query):
        try:
            found = find_studies(peer, config.calling_ae, study_uid=query.study_uid or None,
                                 accession=query.accession or None,
                                 patient_id=query.patient_id or None, since=query.since,
                                 timeout=config.timeout, limit=MAX_STUDIES)
        except PacsError as exc:
            log.warning("fetch of %s: C-FIND on %s failed: %s", query.describe(),
                        peer.ae_title, exc)
            problems.append(printable(str(exc)))
            continue
        for match in found:
            matches.setdefault(match.study_uid, (peer, match))
    if not matches and problems:
        raise FetchRefusedError(502, "; ".join(problems))
    if not matches:
        raise FetchRefusedError(404, f"no study matches {query.describe()} on "
                                f"{', '.join(p.ae_title for p in peers_of(restorer, query))}")
    if len(matches) > MAX_STUDIES:
        raise FetchRefusedError(400, f"{len(matches)} studies match {query.describe()}, more "
                                f"than the {MAX_STUDIES} a fetch retrieves: narrow the query")
    return Found(list(matches.values()), problems)


@dataclass(frozen=True)
class StudyOutcome:
    """How the retrieval of one study ended."""

    study_uid: str
    peer: str
    patient_id: str
    accession_number: str
    study_date: str
    expected: int | None  # the peer's Number of Study Related Instances
    completed: int
    failed: int
    warning: int
    stored: int  # instances of the study the index holds with their file, after it
    error: str = ""


def _match_event(peer: DicomPeer, match: StudyMatch) -> dict[str, object]:
    return {"study_uid": match.study_uid, "peer": peer.ae_title, "patient_id": match.patient_id,
            "patient_name": match.patient_name, "accession_number": match.accession_number,
            "study_date": match.study_date, "modalities": list(match.modalities),
            "instances": match.instance_count}


def retrieve(restorer: Restorer, found: Found, emit: Emit) -> bool:
    """Retrieve every study of ``found``, reporting each step to ``emit``; True when every
    instance of every study was retrieved."""
    emit({"event": "found", "studies": [_match_event(p, m) for p, m in found.matches],
          "problems": found.problems})
    outcomes = [_retrieve_one(restorer, peer, match, emit) for peer, match in found.matches]
    complete = all(not o.error and not o.failed for o in outcomes)
    emit({"event": "summary", "found": len(outcomes),
          "retrieved": sum(o.completed for o in outcomes),
          "failed": sum(o.failed for o in outcomes),
          "studies": [asdict(o) for o in outcomes], "problems": found.problems,
          "complete": complete})
    return complete


def _retrieve_one(restorer: Restorer, peer: DicomPeer, match: StudyMatch,
                  emit: Emit) -> StudyOutcome:
    config, index, uid = restorer.config, restorer.store.index, match.study_uid

    def progress(done: int, total: int) -> None:
        emit({"event": "progress", "study_uid": uid, "done": done, "total": total})

    log.info("fetching study %s from %s by C-%s", uid, peer.ae_title, peer.retrieve.upper())
    error, counts = "", (0, 0, 0)
    try:
        # An on-demand retrieval of the same study waits for this one, and finds it here.
        with restorer.study_lock(uid):
            result = retrieve_study(peer, config.calling_ae, uid, restorer.store,
                                    timeout=config.timeout, on_progress=progress)
            counts = (result.completed, result.failed, result.warning)
            present = index.instances(uid)
            if present and not restorer.missing(present):
                index.copy_restored(uid)  # a fetch of a study whose copy had gone
    except (PacsError, OSError) as exc:
        error = printable(str(exc))
    present = index.instances(uid)
    stored = len(present) - len(restorer.missing(present))
    outcome = StudyOutcome(uid, peer.ae_title, match.patient_id, match.accession_number,
                           match.study_date, match.instance_count, *counts, stored, error)
    result_label = "failed" if error else "incomplete" if outcome.failed else "complete"
    metrics.PACS_FETCHES.labels(result_label).inc()
    for label, count in zip(("completed", "failed", "warning"), counts, strict=True):
        metrics.PACS_FETCHED_INSTANCES.labels(label).inc(count)
    log.info("study %s from %s: %s (%d completed, %d failed, %d warning, %d stored)%s", uid,
             peer.ae_title, result_label, *counts, stored, f": {error}" if error else "")
    emit({"event": "study", **asdict(outcome)})
    return outcome
