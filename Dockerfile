# syntax=docker/dockerfile:1
# Passerelle in a container: DICOM on 11112, HTTP on 8080, data in the volume /var/lib/passerelle.
# (Not built in CI: the CI machines have no Docker engine; tests/test_packaging.py installs and
# runs the wheel the builder stage makes.) HTTP listens on every interface, so `serve` needs
# authentication configured (PASSERELLE_AUTH_ISSUER, ...) or PASSERELLE_ALLOW_UNAUTHENTICATED=true.
# A config file goes in with PASSERELLE_CONFIG (mounted read-only, e.g. /etc/passerelle/...);
# set the HTTP port and TLS through the environment, which the HEALTHCHECK reads. Stopping waits
# for in-flight work up to PASSERELLE_SHUTDOWN_GRACE_SECONDS (10 s): give `docker stop` more
# (`--stop-timeout 20`, compose `stop_grace_period: 20s`) than its default 10 s.

# Builder: the passerelle wheel and the wheels of its dependencies, in /wheels.
FROM python:3.11-slim-bookworm AS builder
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
COPY storage ./storage
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# The OHIF viewer: the npm tarball of the version pinned in scripts/ohif.pin.
FROM node:22-bookworm-slim AS viewer
COPY scripts/ohif.pin /ohif.pin
RUN read -r version integrity </ohif.pin \
    && npm pack --quiet --pack-destination /tmp "@ohif/app@$version" \
    && mv "/tmp/ohif-app-$version.tgz" /tmp/ohif-app.tgz

# Runtime: those wheels installed (no index, no source tree), run by the system user passerelle
# (named by its uid, 10001, so that Kubernetes' runAsNonRoot can check it).
FROM python:3.11-slim-bookworm
RUN useradd --system --user-group --uid 10001 --home-dir /var/lib/passerelle --create-home \
        --shell /usr/sbin/nologin passerelle
# Unpinned but fixed: --no-index, only the builder's wheels.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels passerelle
# The viewer, checked against the pinned integrity, installed where /viewer/ serves it from.
ENV PASSERELLE_VIEWER_DIR=/opt/passerelle/viewer
RUN --mount=type=bind,from=viewer,source=/tmp,target=/ohif \
    --mount=type=bind,source=scripts/ohif.pin,target=/ohif.pin \
    read -r version integrity </ohif.pin \
    && mkdir -p /opt/passerelle && passerelle install-viewer --integrity "$integrity" /ohif/ohif-app.tgz

USER 10001:10001
WORKDIR /var/lib/passerelle
ENV PASSERELLE_DATA_DIR=/var/lib/passerelle \
    PASSERELLE_DICOM_HOST=0.0.0.0 \
    PASSERELLE_HTTP_HOST=0.0.0.0
VOLUME ["/var/lib/passerelle"]
EXPOSE 11112 8080
# GET /health on the configured port; HTTPS when a server certificate is configured, not
# verified (the probe only asks whether the service answers). With mutual TLS on HTTP
# (PASSERELLE_TLS_CLIENT_CA_FILE) the probe has no client certificate: override it.
HEALTHCHECK --start-period=30s --timeout=5s CMD ["python", "-c", "import os, ssl, urllib.request; \
    tls = bool(os.environ.get('PASSERELLE_TLS_CERT_FILE')); \
    port = os.environ.get('PASSERELLE_HTTP_PORT', '8080'); \
    url = ('https' if tls else 'http') + '://127.0.0.1:' + port + '/health'; \
    urllib.request.urlopen(url, timeout=4, context=ssl._create_unverified_context() if tls else None)"]
ENTRYPOINT ["passerelle"]
CMD ["serve"]
