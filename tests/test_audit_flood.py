"""A flood of refused credentials against a running service cannot flush the audit trail:
repeated authentication failures are aggregated per client and period into one Security
Alert (PS3.15 A.5.3.11) with their count, the aggregation table is bounded whatever the
number of source addresses, legitimate access is still written in full, and rotated files
are removed by age as well as by number."""

import base64
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from gateway.security.audit import OTHER_CLIENTS, read_events
from tests.issuer import LocalIssuer
from tests.processes import PasserelleProcess, wait_for
from tests.service_watch import Watch

QIDO = "/dicom-web/studies"
FLOOD = 5000
PERIOD = 3  # audit_failure_period_seconds, lowered for the test
MAX_RSS_GROWTH = 64 << 20
DAY = 86400


def _code(message: dict) -> str:
    return message["EventIdentification"]["EventID"]["csd-code"]


def _details(message: dict) -> dict[str, list[str]]:
    """The Alert Subject's ParticipantObjectDetail pairs, values decoded."""
    pairs: dict[str, list[str]] = {}
    for pair in message["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]:
        pairs.setdefault(pair["type"], []).append(base64.b64decode(pair["value"]).decode())
    return pairs


def _alerts(audit: Path) -> list[dict]:
    return [m for m in read_events(audit) if _code(m) == "110113"]


def _counted(audit: Path) -> int:
    return sum(int(_details(m)["Count"][0]) for m in _alerts(audit))


def _trail_bytes(audit: Path) -> int:
    return sum(path.stat().st_size for path in audit.glob("audit.jsonl*"))


def _refused(base_url: str, count: int, local_address: str = "127.0.0.1") -> None:
    """``count`` requests without a valid token (none, or a garbage one), from one address."""
    transport = httpx.HTTPTransport(local_address=local_address)
    with httpx.Client(base_url=base_url, transport=transport) as client:
        for n in range(count):
            headers = {"Authorization": "Bearer not-a-jwt"} if n % 2 else {}
            assert client.get(f"{QIDO}?n={n}", headers=headers).status_code == 401


def _old_rotated_files(audit: Path) -> None:
    """Rotated files of an earlier run: .1 written 10 days ago, .2 and .3 40 and 50 days ago."""
    audit.mkdir(parents=True, mode=0o700)
    for n, age in ((1, 10), (2, 40), (3, 50)):
        path = audit / f"audit.jsonl.{n}"
        path.write_text("")
        os.utime(path, (time.time() - age * DAY, time.time() - age * DAY))


def test_a_flood_of_refused_tokens_writes_a_bounded_trail(tmp_path: Path) -> None:
    audit = tmp_path / "data" / "audit"
    _old_rotated_files(audit)
    with LocalIssuer() as issuer, PasserelleProcess(
            tmp_path / "data", **issuer.settings(), audit_max_age_days="30",
            audit_failure_period_seconds=str(PERIOD)) as server:
        # Removed by age at start: the files last written more than 30 days ago.
        wait_for(lambda: not (audit / "audit.jsonl.2").exists(), 10, "removal by age")
        assert not (audit / "audit.jsonl.3").exists() and (audit / "audit.jsonl.1").exists()
        assert server.metric("passerelle_audit_files_removed_total", reason="age") == 2

        reader = {"Authorization": f"Bearer {issuer.token('dicomweb.read')}"}
        assert httpx.get(f"{server.base_url}{QIDO}?AccessionNumber=BEFORE",
                         headers=reader).status_code == 200
        wait_for(lambda: _trail_bytes(audit) > 0, 10, "the first event")
        before = _trail_bytes(audit)
        rss_before = server.rss()
        started = time.monotonic()
        with Watch(server, "refused requests") as watch, ThreadPoolExecutor(4) as pool:
            for done in [pool.submit(_refused, server.base_url, FLOOD // 4) for _ in range(4)]:
                done.result()
        flood_seconds = time.monotonic() - started
        rss_growth = server.rss() - rss_before
        assert httpx.get(f"{server.base_url}{QIDO}?AccessionNumber=AFTER",
                         headers=reader).status_code == 200

        # Every failure is accounted for: written in full (the first of a period) or counted
        # in the Security Alert written at the end of its period.
        def accounted() -> int:
            full = sum(1 for m in read_events(audit) if _code(m) == "110114")
            return full + _counted(audit)
        wait_for(lambda: accounted() == FLOOD, 3 * PERIOD + 10, "the aggregated failures")
        grown = _trail_bytes(audit) - before
        counted = _counted(audit)
        assert server.metric("passerelle_audit_failures_aggregated_total",
                             bucket="client") == counted
        assert server.metric("passerelle_audit_security_alerts_total") == len(_alerts(audit))

    periods = flood_seconds / PERIOD + 2
    print(f"\n{FLOOD} refused requests in {flood_seconds:.1f} s: the trail grew by {grown} bytes"
          f" ({len(_alerts(audit))} Security Alerts counting {counted}); RSS +"
          f"{rss_growth / 2**20:.1f} MiB after it")
    # Per period: the first failure in full, alerts at 100 and 1 000 and at the end (~1 KB each).
    assert grown < periods * 8192
    assert rss_growth < MAX_RSS_GROWTH
    assert watch.latencies and not watch.health_failures  # /health answered throughout
    alert = _alerts(audit)[0]
    identification = alert["EventIdentification"]
    assert identification["EventOutcomeIndicator"] == "4"
    assert identification["EventTypeCode"][0]["csd-code"] == "110132"
    assert alert["ActiveParticipant"][0] == {"UserID": "anonymous", "UserIsRequestor": True,
                                             "NetworkAccessPointID": "127.0.0.1",
                                             "NetworkAccessPointTypeCode": "2"}
    subject = alert["ParticipantObjectIdentification"][0]
    assert (subject["ParticipantObjectID"], subject["ParticipantObjectTypeCodeRole"]) == \
        ("127.0.0.1", "13")
    details = _details(alert)
    assert details["Reason"][0].startswith("no valid token (")
    assert details["First"][0] <= details["Last"][0]
    # Legitimate access is written in full, before and after the flood.
    queries = [m for m in read_events(audit) if _code(m) == "110112"]
    assert [base64.b64decode(m["ParticipantObjectIdentification"][0]["ParticipantObjectQuery"])
            for m in queries] == [b"AccessionNumber=BEFORE", b"AccessionNumber=AFTER"]
    assert all(m["ActiveParticipant"][0]["UserID"] == "899700367909" for m in queries)


def test_many_source_addresses_share_one_bucket_past_the_bound(tmp_path: Path) -> None:
    # 127.0.0.0/8 is all loopback on Linux: each address is a client of its own.
    addresses = [f"127.0.0.{n}" for n in range(2, 22)]
    tracked, each = 4, 25
    audit = tmp_path / "data" / "audit"
    # One HTTP worker: each worker counts the failures it refuses (and its own clients).
    with LocalIssuer() as issuer, PasserelleProcess(
            tmp_path / "data", **issuer.settings(), audit_failure_clients=str(tracked),
            audit_failure_period_seconds="600", http_workers="1") as server:
        rss_before = server.rss()
        for address in addresses:
            _refused(server.base_url, each, address)
        rss_growth = server.rss() - rss_before
        other = server.metric("passerelle_audit_failures_aggregated_total",
                              bucket="other_clients")
    assert server.stop() == 0  # what is counted is written on the way out

    full = [m["ActiveParticipant"][0]["NetworkAccessPointID"] for m in read_events(audit)
            if _code(m) == "110114"]
    # The first failure of each tracked client for each reason (no token, a garbage one) only.
    assert full == [a for a in addresses[:tracked] for _ in range(2)]
    counts: Counter[str] = Counter()
    for alert in _alerts(audit):
        counts[alert["ParticipantObjectIdentification"][0]["ParticipantObjectID"]] += \
            int(_details(alert)["Count"][0])
    untracked = (len(addresses) - tracked) * each
    assert counts == {**{a: each - 2 for a in addresses[:tracked]}, OTHER_CLIENTS: untracked}
    # The bucket's alert was written early, when its count reached 100, then at the end.
    assert len(_alerts(audit)) == tracked + 2
    assert other == untracked
    print(f"\n{len(addresses)} addresses x {each} refused requests: {len(full)} written in full,"
          f" {len(_alerts(audit))} Security Alerts; RSS +{rss_growth / 2**20:.1f} MiB")
    assert rss_growth < MAX_RSS_GROWTH
