"""What the HTTP handlers work with, made once by the composition root
(``gateway.service``) and reached from a request by ``services_of``."""

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from starlette.requests import Request

from gateway.imaging.budget import ResourceBudget
from gateway.imaging.render_cache import RenderCache
from gateway.pacs.restore import Restorer
from gateway.pacs.retention import Retention
from gateway.publication.registry_probe import RegistryProbe
from gateway.security.audit import AuditTrail
from gateway.urls import dicomweb_root
from storage.outbox import Outbox
from storage.store import Store


@dataclass(frozen=True)
class Services:
    """The service's parts as the HTTP side sees them."""

    store: Store
    outbox: Outbox
    audit: AuditTrail
    render_cache: RenderCache
    budget: ResourceBudget  # every decode and reception asks it first
    deidentify_key: bytes  # secret of WADO-URI anonymize=yes
    session_key: bytes  # signs the sign-in's cookies (empty without sign-in)
    public_url: str  # base URL consumers reach us by, without a trailing slash
    max_instance_bytes: int  # largest STOW-RS part
    body_timeout_seconds: float  # longest silence of a STOW-RS body
    # The pids serving now, by role (gateway.liveness): /health.
    serving: Callable[[], dict[str, list[int]]]
    wake_publisher: Callable[[], None]  # something was queued: send it now
    registry_url: str  # where queued publications are sent; empty: they stay queued
    registry_probe: RegistryProbe | None  # whether it answers now (None: no registry_url)
    metrics: CollectorRegistry  # what /metrics shows
    restorer: Restorer  # the PACS peers: fetches, local copies given back on demand
    retention: Retention | None = None  # purge and retention passes (admin_retention)

    @property
    def dicomweb_root(self) -> str:
        """The DICOMweb root as consumers reach it."""
        return dicomweb_root(self.public_url)


def services_of(request: Request) -> Services:
    """The services of the application serving ``request``."""
    return request.app.state.services
