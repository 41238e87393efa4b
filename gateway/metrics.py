"""Prometheus metrics of the service (exposed at ``GET /metrics``).

Under ``passerelle serve`` every process counts in its own files of one directory
(prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor
before its children start) and an HTTP worker answers a scrape with the sum over every
process (``scrape_registry``). Counters add up; each gauge says how it adds up
(``multiprocess_mode``). What is read at scrape time (the outbox states, the restarts and the
recovery of ``passerelle serve``) is collected by the scraping worker itself.
"""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from storage.outbox import Outbox
from storage.store import IngestResult, Outcome

INSTANCES_RECEIVED = Counter(
    "passerelle_instances_received_total",
    "Instances stored, by protocol", ["protocol"])
BYTES_RECEIVED = Counter(
    "passerelle_received_bytes_total",
    "Bytes of Part 10 files stored, by protocol", ["protocol"])
INGEST_FAILURES = Counter(
    "passerelle_ingest_failures_total",
    "Instances refused, by protocol and reason", ["protocol", "reason"])
DUPLICATES = Counter(
    "passerelle_duplicate_instances_total",
    "Instances received again under a stored SOP Instance UID, by kind (duplicate: same data"
    " set; conflict: different data set, replaced under duplicate_policy overwrite; refused"
    " ones count as ingest failures, reason sop-instance-conflict)", ["kind"])
ASSOCIATIONS_OPEN = Gauge(
    "passerelle_dicom_associations_open", "DICOM connections (associations) currently open",
    multiprocess_mode="livesum")
ASSOCIATIONS = Counter(
    "passerelle_dicom_associations_total",
    "DICOM associations by how they ended (released, aborted, rejected)", ["outcome"])
HTTP_CONNECTIONS_CLOSED = Counter(
    "passerelle_http_connections_closed_total",
    "HTTP connections closed by the server before a request, by reason (per_client_limit:"
    " too many open from one address; head_timeout: request line and headers too slow;"
    " head_too_large: request line and headers over 16 KiB)",
    ["reason"])
DIMSE_QUERIES = Counter(
    "passerelle_dimse_queries_total",
    "C-FIND requests answered, by query level and result (success; cancel; refused: an"
    " identifier the information model does not allow, or more than max_find_matches"
    " matches; failed: the index could not answer)", ["level", "result"])
DIMSE_QUERY_MATCHES = Counter(
    "passerelle_dimse_query_matches_total", "C-FIND matches sent, by query level", ["level"])
DIMSE_RETRIEVES = Counter(
    "passerelle_dimse_retrieves_total",
    "C-GET and C-MOVE requests answered, by service (get, move) and result (success;"
    " partial: some sub-operations failed; failed; cancel; refused: unknown destination or"
    " identifier the information model does not allow)", ["service", "result"])
DIMSE_RETRIEVED_INSTANCES = Counter(
    "passerelle_dimse_retrieved_instances_total",
    "C-STORE sub-operations of C-GET and C-MOVE, by service and result (sent: stored by the"
    " peer, warnings included; transcoded: of those, sent in another transfer syntax than"
    " stored; failed)", ["service", "result"])
RENDER_CACHE = Counter(
    "passerelle_render_cache_total",
    "Rendered image requests by cache result (hit; miss: rendered; shared: waited for the"
    " same rendering already under way)", ["result"])

AUTH_FAILURES = Counter(
    "passerelle_auth_failures_total",
    "HTTP requests refused by access control, by reason", ["reason"])
JWKS_FETCHES = Counter(
    "passerelle_jwks_fetches_total",
    "Fetches of the token issuer's JWKS, by result (ok; failed: unreachable, too slow or"
    " unusable, the keys already known stay in use)", ["result"])
HTTP_REFUSED_OVER_LIMIT = Counter(
    "passerelle_http_refused_over_limit_total",
    "HTTP requests refused because their client had too many in progress")
HTTP_REQUESTS_REFUSED = Counter(
    "passerelle_http_requests_refused_total",
    "HTTP requests refused before anything served them, by reason (method: a method the"
    " resource does not serve; repeated_parameter: a single-valued query parameter given"
    " twice)", ["reason"])
MANIFEST_ACCESS = Counter(
    "passerelle_manifest_access_total",
    "Requests scoped by a KOS-SOPInstanceUID header, by result", ["result"])
BUDGET_REFUSALS = Counter(
    "passerelle_budget_refusals_total",
    "Requests refused by the resource budget, by reason (decode_memory, ingest_bytes: the"
    " request alone is larger than the budget; *_busy: no room in time, retried later;"
    " output_pixels, frames, parts: a request bound)", ["reason"])
BUDGET_IN_USE = Gauge(
    "passerelle_budget_bytes_in_use",
    "Bytes reserved right now, by budget (decode_memory, ingest_bytes)", ["budget"],
    multiprocess_mode="livesum")
AUDIT_SYSLOG_DROPPED = Counter(
    "passerelle_audit_syslog_dropped_total",
    "Audit messages never copied to the syslog collector (backlog full)")
AUDIT_FAILURES_AGGREGATED = Counter(
    "passerelle_audit_failures_aggregated_total",
    "Authentication failures counted in a Security Alert audit message instead of written one"
    " by one (the first of each client and reason in a period is written in full), by bucket"
    " (client: the client's own; other_clients: past audit_failure_clients addresses in the"
    " period)", ["bucket"])
AUDIT_SECURITY_ALERTS = Counter(
    "passerelle_audit_security_alerts_total",
    "Security Alert audit messages written, one per client and period with counted"
    " authentication failures")
AUDIT_FILES_REMOVED = Counter(
    "passerelle_audit_files_removed_total",
    "Rotated audit files removed, by reason (age: last written more than audit_max_age_days"
    " ago; size: past audit_backups)", ["reason"])
STUDY_ACCESSES_UNINDEXED = Counter(
    "passerelle_study_accesses_unindexed_total",
    "Study accesses written to the audit trail but not counted in the index's table of who"
    " saw each study (the database write of their batch failed, or too many waited for it;"
    " logged)")

PACS_FETCHES = Counter(
    "passerelle_pacs_fetches_total",
    "Studies fetched from a PACS peer (passerelle fetch, POST /admin/fetch), by result"
    " (complete: every instance retrieved; incomplete: some sub-operations failed; failed:"
    " the retrieval itself failed); refused: a fetch request refused before anything was"
    " retrieved (bad query, no PACS, nothing matched, no C-FIND answer, too many)",
    ["result"])
PACS_FETCHED_INSTANCES = Counter(
    "passerelle_pacs_fetched_instances_total",
    "Instances of fetched studies by the peer's count (completed, failed, warning)",
    ["result"])
RESTORES = Counter(
    "passerelle_pacs_restores_total",
    "On-demand retrievals of a study whose local copy was gone, by result (restored;"
    " already_local: another process had just given it back; failed: no PACS peer gave all"
    " of it back)", ["result"])
RESTORE_WAITS = Counter(
    "passerelle_pacs_restore_waits_total",
    "Requests (HTTP or DIMSE) that found their study's local copy gone, by what they got"
    " (served: after its retrieval; timeout: not back within retrieve_wait_seconds;"
    " unavailable: its retrieval failed; busy: too many other studies being retrieved)",
    ["result"])
REJECTED_INSTANCES = Counter(
    "passerelle_rejected_instances_total",
    "Instances taken out of use by IHE IOCM rejection notes, by reason (the note's title"
    " code: 113001, 113037, 113038, 113039) and action (removed: file and index rows deleted;"
    " hidden: out of the index, file kept under rejected/; not_stored: referenced but not"
    " stored here, refused if sent later)", ["reason", "action"])


def record_ingest(result: IngestResult, protocol: str, size: int) -> None:
    """Count one ingest outcome (shared by C-STORE and STOW-RS)."""
    if result.outcome is Outcome.STORED:
        INSTANCES_RECEIVED.labels(protocol).inc()
        BYTES_RECEIVED.labels(protocol).inc(size)
    elif result.outcome in (Outcome.DUPLICATE, Outcome.CONFLICT):
        DUPLICATES.labels(result.outcome.value).inc()
    else:
        INGEST_FAILURES.labels(protocol, result.reason.value if result.reason else "unknown").inc()


PUBLICATION_ATTEMPTS = Counter(
    "passerelle_publication_attempts_total",
    "Outbox rows worked on, by action and result (acknowledged; rejected: refused for good,"
    " needs a person; retry: transient failure, tried again later)", ["action", "result"])
UNMAPPED_EVENT_CODES = Counter(
    "passerelle_unmapped_event_codes_total",
    "Modality or BodyPartExamined values of published studies with no event code in the"
    " mapping table (event_codes.toml)", ["attribute"])


class OutboxCollector(Collector):
    """``passerelle_publications{state}``: outbox rows per state, read at each scrape."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def collect(self) -> Iterator[Metric]:
        """One sample per state (pending, sent, acknowledged, failed)."""
        family = GaugeMetricFamily("passerelle_publications",
                                   "Publication outbox rows by state", labels=["state"])
        for state, count in self.outbox.counts().items():
            family.add_metric([state], count)
        yield family


class ServiceCollector(Collector):
    """What the supervisor knows, read at each scrape: ``passerelle_process_restarts_total``
    from ``restarts()`` (by role) and ``passerelle_recovery_files`` (by kind), what the check
    of the index against the files found at start, when it ran."""

    def __init__(self, restarts: Callable[[], dict[str, int]],
                 recovery: dict[str, int]) -> None:
        self.restarts = restarts
        self.recovery = recovery

    def collect(self) -> Iterator[Metric]:
        """The restarts by role, and the recovery counts when there was a recovery."""
        restarts = CounterMetricFamily(
            "passerelle_process_restarts",
            "Processes of passerelle serve started again after they died, by role (dicom,"
            " background, http)", labels=["role"])
        for role, count in self.restarts().items():
            restarts.add_metric([role], count)
        yield restarts
        if self.recovery:
            recovery = GaugeMetricFamily(
                "passerelle_recovery_files",
                "What the check of the index against the files found at start after an"
                " unclean stop (reindexed: file without index row; quarantined: unreadable"
                " file moved aside; missing: indexed instance without its file)",
                labels=["kind"])
            for kind, count in self.recovery.items():
                recovery.add_metric([kind], count)
            yield recovery


def scrape_registry(*collectors: Collector) -> CollectorRegistry:
    """What ``/metrics`` shows in a process of ``passerelle serve``: the metrics of every
    process (multiprocess mode) and ``collectors``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    for collector in collectors:
        registry.register(collector)
    return registry


# Retention of local copies (gateway.pacs.retention).
LOCAL_COPIES_REMOVED = Counter(
    "passerelle_local_copies_removed_total",
    "Studies whose local copy was removed, a PACS peer confirmed to hold every instance, by"
    " trigger (age: retention_days; disk: above the high-water mark; purge: asked for)",
    ["trigger"])
LOCAL_INSTANCES_REMOVED = Counter(
    "passerelle_local_instances_removed_total",
    "Instance files deleted with the local copies removed")
LOCAL_COPY_BYTES_FREED = Counter(
    "passerelle_local_copy_bytes_freed_total",
    "Bytes of the instance files deleted with the local copies removed")
RETENTION_REFUSALS = Counter(
    "passerelle_retention_refusals_total",
    "Local copies the retention policy or a purge wanted gone but kept, by reason (no_peer;"
    " receiving: not yet stable; publication: one not acknowledged in the outbox; not_held:"
    " no peer holds every instance; pacs_unreachable: no peer answered; changed: an instance"
    " arrived meanwhile; no_instance: nothing to remove)", ["reason"])
