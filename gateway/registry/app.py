"""A small MHD Document Recipient and Document Responder (FHIR R4, base ``/fhir``): enough of
a PDSm document registry to run the whole chain on one machine and to test the gateway.

ITI-65 (``POST /fhir``, all or nothing, checked by ``validate``), ITI-67 (``GET
/fhir/DocumentReference``), ITI-68 (``GET /fhir/Binary/{id}``), flux 3 updates (``PATCH``,
JSON Patch on status / securityLabel / extension only, as PDSm allows).
"""

import base64
import json
import logging
from pathlib import Path

import jsonpatch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.registry import pdsm
from gateway.registry.documents import DocumentStore, DuplicateDocumentError
from gateway.registry.validate import Issue, check_provide_bundle

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"
_SEARCH_PARAMETERS = {"patient.identifier", "identifier", "status", "related",
                      "related:identifier", "event"}
_PATCHABLE = ("/status", "/securityLabel", "/extension")


class RegistryError(Exception):
    """A request the registry refuses: HTTP status and the OperationOutcome issues."""

    def __init__(self, status: int, *issues: Issue) -> None:
        super().__init__(issues[0].diagnostics if issues else str(status))
        self.status = status
        self.issues = issues


def _fhir(body: dict, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status, headers=headers, media_type=FHIR_JSON)


def _outcome(error: RegistryError) -> JSONResponse:
    log.warning("refused (%d): %s", error.status,
                "; ".join(f"{i.details}: {i.diagnostics}" for i in error.issues))
    return _fhir({"resourceType": "OperationOutcome",
                  "issue": [issue.as_fhir() for issue in error.issues]}, error.status)


def _error(status: int, code: str, details: str, diagnostics: str, where: str) -> RegistryError:
    return RegistryError(status, Issue(code, details, diagnostics, where))


async def _json_body(request: Request, kinds: tuple[str, ...]) -> object:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in kinds:
        raise _error(415, "not-supported", "UnsupportedMediaType",
                     f"Content-Type must be one of {', '.join(kinds)}", "Content-Type")
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _error(400, "structure", "InvalidJSON", f"body is not JSON: {exc}", "body") \
            from exc


def _rewrite(value: object, ids: dict[str, str]) -> object:
    """References to Bundle entries (their fullUrl) become references to stored resources."""
    if isinstance(value, dict):
        return {k: (ids.get(v, v) if k == "reference" and isinstance(v, str)
                    else _rewrite(v, ids)) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, ids) for v in value]
    return value


def _supersede(store: DocumentStore, reference: str, where: str) -> dict:
    kind, _, resource_id = reference.partition("/")
    document = store.read("DocumentReference", resource_id) if kind == "DocumentReference" \
        else None
    if document is None:
        raise _error(404, "not-found", "XDSUnknownDocument",
                     f"{reference} is not a document of this registry", where)
    if document["status"] == "superseded":
        return document
    return store.write(int(resource_id), {**document, "status": "superseded"})


def _provide(store: DocumentStore, bundle: dict, base: str) -> dict:
    """Store an ITI-65 Bundle (already checked); the transaction-response."""
    entries = bundle["entry"]
    ids: dict[str, str] = {}
    for entry in entries:
        resource = entry["resource"]
        if resource["resourceType"] == "Binary":
            binary_id = store.add_binary(resource["contentType"],
                                         base64.b64decode(resource["data"]))
            ids[entry["fullUrl"]] = f"Binary/{binary_id}"
        elif entry["request"]["method"] == "POST":
            ids[entry["fullUrl"]] = f"{resource['resourceType']}/" \
                                    f"{store.reserve(resource['resourceType'])}"
    answers = []
    for n, entry in enumerate(entries):
        resource = entry["resource"]
        if entry["request"]["method"] == "PATCH":
            updated = _supersede(store, entry["request"]["url"], f"Bundle.entry[{n}]")
            answers.append({"status": "200 OK", "location": f"DocumentReference/"
                            f"{updated['id']}/_history/{updated['meta']['versionId']}"})
            continue
        location = ids[entry["fullUrl"]]
        if resource["resourceType"] != "Binary":
            resource = _rewrite({k: v for k, v in resource.items() if k != "id"}, ids)
            if resource["resourceType"] == "DocumentReference":
                for content in resource["content"]:
                    content["attachment"]["url"] = f"{base}/{ids[content['attachment']['url']]}"
                for relation in resource.get("relatesTo", []):
                    if relation.get("code") == "replaces":
                        _supersede(store, relation.get("target", {}).get("reference", ""),
                                   f"Bundle.entry[{n}].resource.relatesTo")
            try:
                store.write(int(location.partition("/")[2]), resource)
            except DuplicateDocumentError as exc:
                raise _error(409, "duplicate", "XDSDuplicateUniqueIdInRegistry",
                             f"masterIdentifier {exc} is already registered",
                             f"Bundle.entry[{n}].resource.masterIdentifier") from exc
        answers.append({"status": "201 Created", "location": f"{location}/_history/1"})
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": answer} for answer in answers]}


def _token(value: str) -> tuple[str | None, str]:
    """FHIR token ``system|value`` (``|value``: no system; ``value``: any system)."""
    if "|" not in value:
        return None, value
    system, _, code = value.partition("|")
    return system, code


def _search_tokens(request: Request) -> tuple[list[tuple[str, str | None, str]], list[str]]:
    tokens: list[tuple[str, str | None, str]] = []
    statuses: list[str] = []
    names = set()
    for name, value in request.query_params.multi_items():
        if name not in _SEARCH_PARAMETERS:
            raise _error(400, "not-supported", "UnknownSearchParameter",
                         f"search parameter {name!r} is not supported here "
                         f"({', '.join(sorted(_SEARCH_PARAMETERS))})", name)
        names.add(name)
        if name == "status":
            statuses += value.split(",")
        else:
            tokens.append((name.removesuffix(":identifier"), *_token(value)))
    if not names & {"patient.identifier", "identifier"}:
        raise _error(400, "required", "ITI-67",
                     "a search needs patient.identifier (or identifier, a document's "
                     "uniqueId)", "patient.identifier")
    if "patient.identifier" in names and not statuses:
        raise _error(400, "required", "ITI-67", "a search by patient needs status", "status")
    return tokens, statuses


def _patch_operations(body: object) -> list[dict]:
    if not isinstance(body, list) or not all(isinstance(op, dict) for op in body):
        raise _error(400, "structure", "InvalidPatch", "a JSON Patch is a list of operations",
                     "body")
    for op in body:
        path = str(op.get("path", ""))
        if not any(path == allowed or path.startswith(f"{allowed}/") for allowed in _PATCHABLE):
            raise _error(405, "not-supported", "MiseAJourMetadonneeFiche",
                         f"only status, securityLabel and extension may be changed, not {path!r}",
                         path)
    return body


def create_registry_app(data_dir: Path) -> Starlette:
    """The registry's HTTP application on a store under ``data_dir``."""
    store = DocumentStore(data_dir / "registry.sqlite")

    def base_of(request: Request) -> str:
        return f"{str(request.base_url).rstrip('/')}/fhir"

    async def provide(request: Request) -> Response:
        try:
            bundle = await _json_body(request, (FHIR_JSON, "application/json"))
            issues = check_provide_bundle(bundle)
            errors = [issue for issue in issues if issue.severity == "error"]
            if errors:
                status = 400 if any(i.code == "structure" for i in errors) else 422
                raise RegistryError(status, *errors)

            def write() -> dict:
                with store.transaction():
                    return _provide(store, bundle, base_of(request))

            response = await run_in_threadpool(write)
        except RegistryError as error:
            return _outcome(error)
        warnings = [issue.as_fhir() for issue in issues]
        if warnings:
            response["entry"][1]["response"]["outcome"] = {"resourceType": "OperationOutcome",
                                                           "issue": warnings}
        log.info("ITI-65 stored: %s", ", ".join(e["response"]["location"]
                                                for e in response["entry"]))
        return _fhir(response)

    async def search(request: Request) -> Response:
        try:
            tokens, statuses = _search_tokens(request)
        except RegistryError as error:
            return _outcome(error)
        found = await run_in_threadpool(store.search, tokens, statuses)
        base = base_of(request)
        return _fhir({"resourceType": "Bundle", "type": "searchset", "total": len(found),
                      "entry": [{"fullUrl": f"{base}/DocumentReference/{doc['id']}",
                                 "resource": doc, "search": {"mode": "match"}}
                                for doc in found]})

    async def read(request: Request) -> Response:
        kind, resource_id = request.path_params["type"], request.path_params["id"]
        resource = store.read(kind, resource_id)
        if resource is None:
            return _outcome(_error(404, "not-found", "NotFound", f"no {kind}/{resource_id}",
                                   kind))
        return _fhir(resource, headers={"ETag": f'W/"{resource["meta"]["versionId"]}"'})

    async def binary(request: Request) -> Response:
        found = store.binary(request.path_params["id"])
        if found is None:
            return _outcome(_error(404, "not-found", "XDSMissingDocument", "no such Binary",
                                   "Binary"))
        content_type, data = found
        if FHIR_JSON in request.headers.get("accept", ""):
            return _fhir({"resourceType": "Binary", "id": request.path_params["id"],
                          "contentType": content_type,
                          "data": base64.b64encode(data).decode()})
        return Response(data, media_type=content_type)

    async def patch(request: Request) -> Response:
        try:
            resource_id = request.path_params.get("id")
            if resource_id is None:  # conditional patch on the uniqueId (PDSm flux 3)
                identifier = request.query_params.get("identifier", "")
                found = store.search([("identifier", *_token(identifier))], [])
                if len(found) != 1:
                    raise _error(404 if not found else 412, "not-found", "XDSUnknownDocument",
                                 f"{len(found)} documents match identifier={identifier}",
                                 "identifier")
                resource_id = found[0]["id"]
            operations = _patch_operations(
                await _json_body(request, ("application/json-patch+json",)))

            def apply() -> dict:
                with store.transaction():
                    document = store.read("DocumentReference", resource_id)
                    if document is None:
                        raise _error(404, "not-found", "XDSUnknownDocument",
                                     f"no DocumentReference/{resource_id}", "id")
                    try:
                        updated = jsonpatch.apply_patch(document, operations)
                    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                        raise _error(422, "processing", "InvalidPatch", str(exc), "body") \
                            from exc
                    if updated.get("status") not in pdsm.DOCUMENT_STATUSES:
                        raise _error(422, "value", "XDSRegistryMetadataError",
                                     "status must be one of "
                                     f"{', '.join(sorted(pdsm.DOCUMENT_STATUSES))}", "status")
                    return store.write(int(resource_id), updated)

            updated = await run_in_threadpool(apply)
        except RegistryError as error:
            return _outcome(error)
        log.info("DocumentReference/%s updated: status %s", updated["id"], updated["status"])
        return _fhir(updated, headers={"ETag": f'W/"{updated["meta"]["versionId"]}"'})

    async def metadata(request: Request) -> Response:
        return _fhir({"resourceType": "CapabilityStatement", "status": "active",
                      "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
                      "software": {"name": "Passerelle local registry"},
                      "rest": [{"mode": "server", "interaction": [{"code": "transaction"}],
                                "resource": [
                                    {"type": "DocumentReference",
                                     "interaction": [{"code": "read"}, {"code": "patch"},
                                                     {"code": "search-type"}],
                                     "conditionalUpdate": True,
                                     "searchParam": [{"name": n, "type": "token"}
                                                     for n in sorted(_SEARCH_PARAMETERS)]},
                                    {"type": "Binary", "interaction": [{"code": "read"}]},
                                    {"type": "List", "interaction": [{"code": "read"}]}]}]})

    app = Starlette(routes=[
        Route("/fhir", provide, methods=["POST"]),
        Route("/fhir/metadata", metadata, methods=["GET"]),
        Route("/fhir/DocumentReference", search, methods=["GET"]),
        Route("/fhir/DocumentReference", patch, methods=["PATCH"]),
        Route("/fhir/DocumentReference/{id}", patch, methods=["PATCH"]),
        Route("/fhir/Binary/{id}", binary, methods=["GET"]),
        Route("/fhir/{type:str}/{id}", read, methods=["GET"]),
    ])
    app.state.store = store
    return app
