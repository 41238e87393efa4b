"""HTTP client of the document registry (MHD Document Recipient / Responder): ITI-65, the
ITI-67 lookup of a manifest by its uniqueId, and flux 3 patches. Every failure is sorted into
transient (try again later) or rejected (a person must look), with the registry's reason."""

import json
import ssl

import httpx

from gateway.publication.mhd import kos_identifier
from gateway.publication.operation_outcome import outcome_issues

FHIR_JSON = "application/fhir+json"


class TransientError(Exception):
    """No usable answer: network failure, timeout, 408/429/5xx. ``maybe_delivered`` is False
    only when the request certainly never reached the registry (connection refused)."""

    def __init__(self, message: str, maybe_delivered: bool) -> None:
        super().__init__(message)
        self.maybe_delivered = maybe_delivered


class RejectedError(Exception):
    """The registry refused the request (4xx); ``codes`` are its OperationOutcome codes."""

    def __init__(self, status: int, reason: str, codes: list[str], body: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.codes = codes
        self.body = body


def _outcome(response: httpx.Response) -> tuple[str, list[str]]:
    """A readable reason and the issue codes of an error response (its OperationOutcome's
    issues, else the start of its body)."""
    issues = outcome_issues(response.content)
    reason = "; ".join(issue.text for issue in issues)
    return reason or response.text[:300] or response.reason_phrase, [i.key for i in issues]


def registry_http(timeout: float | httpx.Timeout, tls: ssl.SSLContext | None = None,
                  transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """An HTTP client towards the registry as the publisher has it: ``tls`` replaces the
    default certificate checks (own CA, client certificate), FHIR JSON asked for."""
    return httpx.Client(timeout=timeout, transport=transport, verify=tls or True,
                        headers={"Accept": FHIR_JSON,
                                 "User-Agent": "Passerelle (DRIMbox Source)"})


class RegistryClient:
    """The registry at ``base_url`` (its FHIR base); ``tls`` replaces the default
    certificate checks (own CA, client certificate)."""

    def __init__(self, base_url: str, timeout: float, tls: ssl.SSLContext | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = registry_http(timeout, tls, transport)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _request(self, method: str, url: str, **kwargs: object) -> dict:
        try:
            response = self._http.request(method, url, **kwargs)  # type: ignore[arg-type]
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise TransientError(f"registry unreachable: {exc or type(exc).__name__}",
                                 maybe_delivered=False) from exc
        except httpx.TimeoutException as exc:
            raise TransientError(f"no answer from the registry within {self.timeout:g} s",
                                 maybe_delivered=True) from exc
        except httpx.HTTPError as exc:
            raise TransientError(f"registry connection failed: {exc}",
                                 maybe_delivered=True) from exc
        if response.status_code in (408, 429) or response.status_code >= 500:
            reason, _ = _outcome(response)
            raise TransientError(f"HTTP {response.status_code}: {reason}", maybe_delivered=True)
        if response.status_code >= 400:
            reason, codes = _outcome(response)
            raise RejectedError(response.status_code, reason, codes, response.text)
        try:
            return response.json()
        except ValueError as exc:
            raise TransientError(f"HTTP {response.status_code} with a body that is not JSON",
                                 maybe_delivered=True) from exc

    def provide(self, bundle: dict) -> dict:
        """ITI-65: POST the transaction Bundle; the transaction-response."""
        return self._request("POST", self.base_url, content=json.dumps(bundle).encode(),
                             headers={"Content-Type": FHIR_JSON})

    def find(self, kos_uid: str) -> str:
        """``DocumentReference/<id>`` registered under this manifest uniqueId, or ""."""
        found = self._request("GET", f"{self.base_url}/DocumentReference",
                              params={"identifier": kos_identifier(kos_uid)})
        ids = [e["resource"]["id"] for e in found.get("entry", [])
               if e.get("resource", {}).get("resourceType") == "DocumentReference"]
        return f"DocumentReference/{ids[-1]}" if ids else ""

    def patch(self, document_id: str, operations: list[dict]) -> dict:
        """Flux 3: JSON Patch of a DocumentReference; the updated resource."""
        return self._request("PATCH", f"{self.base_url}/{document_id}",
                             content=json.dumps(operations).encode(),
                             headers={"Content-Type": "application/json-patch+json"})
