"""The one reader of a registry's OperationOutcome (gateway.publication.operation_outcome):
its issues as lines, whatever JSON it is; the registry client's refusals and the console's
publication history both read through it."""

import json

import httpx
import pytest

from gateway.publication.operation_outcome import outcome_issues
from gateway.publication.registry_client import RegistryClient, RejectedError, TransientError


def _lines(body: object) -> list[str]:
    return [issue.text for issue in outcome_issues(json.dumps(body))]


def test_each_issue_reads_as_severity_code_details_diagnostics_and_where() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": "unknown assigning authority",
         "expression": ["Bundle.entry[1].resource.subject"]},
        {"severity": "warning", "code": "processing", "details": {"text": "late"}},
        {"severity": "error", "code": "duplicate",
         "details": {"text": "XDSDuplicateUniqueIdInRegistry"}, "diagnostics": "already there",
         "location": ["Bundle.entry[0]"]}]}
    assert _lines(outcome) == [
        "error invalid: unknown assigning authority (Bundle.entry[1].resource.subject)",
        "warning processing: late",
        "error duplicate XDSDuplicateUniqueIdInRegistry: already there (Bundle.entry[0])"]
    keys = [issue.key for issue in outcome_issues(json.dumps(outcome))]
    assert keys == ["invalid", "late", "XDSDuplicateUniqueIdInRegistry"]


@pytest.mark.parametrize("body", [
    "", "<html>bad gateway</html>", "null", '"text"', "[1, 2]", "{}", "\xff\xfe",
    '{"resourceType": "Bundle", "issue": [{"code": "invalid"}]}',
    '{"resourceType": "OperationOutcome"}',
    '{"resourceType": "OperationOutcome", "issue": 1}',
    '{"resourceType": "OperationOutcome", "issue": {"code": "invalid"}}',
    '{"resourceType": "OperationOutcome", "issue": ["not an issue", 3, null, []]}',
    '{"resourceType": "OperationOutcome", "issue": [{"expression": 5, "severity": []}]}',
    "[" * 100_000])
def test_what_is_not_an_outcome_with_issues_has_none(body: str) -> None:
    assert outcome_issues(body) == []


def test_values_of_the_wrong_json_type_are_left_out() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [
        "not an issue",
        {"severity": 1, "code": ["invalid"], "diagnostics": {"text": "x"}, "details": "late",
         "expression": ["ok", 5, None]},
        {"severity": "error", "code": "invalid", "diagnostics": 42, "details": [1]},
        {"code": "x" * 2000}]}
    assert _lines(outcome) == ["(ok)", "error invalid", "x" * 500]


def test_a_long_answer_is_cut_to_its_first_issues() -> None:
    outcome = {"resourceType": "OperationOutcome",
               "issue": [{"code": "invalid", "diagnostics": f"n{n}"} for n in range(500)]}
    assert _lines(outcome) == [f"invalid: n{n}" for n in range(20)]


def _answering(status: int, body: bytes) -> RegistryClient:
    return RegistryClient("http://registry.test/fhir", 5, transport=httpx.MockTransport(
        lambda request: httpx.Response(status, content=body)))


def test_the_registry_client_reports_a_refusal_as_its_issues() -> None:
    body = json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "duplicate", "diagnostics": "sent before",
         "details": {"text": "XDSDuplicateUniqueIdInRegistry"}}, 7]}).encode()
    with pytest.raises(RejectedError) as refused:
        _answering(409, body).provide({})
    assert str(refused.value) == ("HTTP 409: error duplicate XDSDuplicateUniqueIdInRegistry:"
                                  " sent before")
    assert refused.value.codes == ["XDSDuplicateUniqueIdInRegistry"]
    with pytest.raises(TransientError, match=r"^HTTP 502: <html>proxy down</html>$"):
        _answering(502, b"<html>proxy down</html>").provide({})
    with pytest.raises(RejectedError, match=r"^HTTP 400: Bad Request$"):
        _answering(400, b"").provide({})
