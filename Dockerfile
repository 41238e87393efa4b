# Passerelle in a container: DICOM on 11112, HTTP on 8080, data in /var/lib/passerelle.
# (Not built in CI: the CI machines have no Docker engine.) HTTP listens on every interface,
# so `serve` needs authentication configured (PASSERELLE_AUTH_ISSUER, ...) or
# PASSERELLE_ALLOW_UNAUTHENTICATED=true; the HEALTHCHECK assumes plain HTTP.
FROM python:3.11-slim-bookworm

RUN useradd --system --home-dir /var/lib/passerelle --create-home passerelle
WORKDIR /opt/passerelle
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY storage ./storage
COPY config ./config
RUN pip install --no-cache-dir .

USER passerelle
ENV PASSERELLE_DATA_DIR=/var/lib/passerelle \
    PASSERELLE_DICOM_HOST=0.0.0.0 \
    PASSERELLE_HTTP_HOST=0.0.0.0
VOLUME ["/var/lib/passerelle"]
EXPOSE 11112 8080
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')"
ENTRYPOINT ["passerelle"]
CMD ["serve"]
