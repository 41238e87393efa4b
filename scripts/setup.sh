#!/usr/bin/env bash
# Install what Passerelle needs on Debian: system packages (with --test, the DICOM tools the
# tests drive and the PostgreSQL server whose throwaway clusters they start), a virtual
# environment in .venv with the package installed in it (editable), and the OHIF viewer
# served at /viewer/ (the pinned npm package @ohif/app, checked against its integrity).
#
# Idempotent and quick when nothing changed: apt runs only for a missing package, pip only
# when .venv is new or pyproject.toml changed since the last successful install, or when
# --test asks for the test extras and that install was without them. The stamp file
# .venv/.passerelle-setup records the sha256 of pyproject.toml and the extras installed; the
# viewer is fetched again only when viewer/VERSION is not the pinned version.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(python3 python3-venv python3-pip)
# npm fetches the viewer; Debian's package only where no Node.js has one already.
command -v npm >/dev/null || packages+=(npm)
if [[ "${1:-}" == "--test" ]]; then
    # The tests start a PostgreSQL cluster of their own, drive a headless Chromium, and run
    # Orthanc as the PACS (its DICOMweb plugin for the benchmarks beside it).
    packages+=(dcmtk dicom3tools postgresql chromium chromium-driver orthanc orthanc-dicomweb)
    extras="test"
else
    extras=""
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"
fi

stamp=.venv/.passerelle-setup
digest=$(sha256sum pyproject.toml | cut -d " " -f 1)
# The stamp is one line: the digest, then the extras installed ("test" or nothing).
read -r stamped_digest stamped_extras 2>/dev/null <"$stamp" || true
if ! [[ -x .venv/bin/python && "${stamped_digest:-}" == "$digest" \
        && ( -z "$extras" || "${stamped_extras:-}" == "$extras" ) ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    rm -f "$stamp"
    .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
    echo "$digest $extras" >"$stamp"
fi

# scripts/ohif.pin: the version of @ohif/app and its npm integrity (the Dockerfile reads it too).
read -r ohif_version ohif_integrity <scripts/ohif.pin
viewer_dir=${PASSERELLE_VIEWER_DIR:-viewer}
if [[ "$(cat "$viewer_dir/VERSION" 2>/dev/null)" != "$ohif_version" ]]; then
    download=$(mktemp -d)
    trap 'rm -rf "$download"' EXIT
    npm pack --quiet --pack-destination "$download" "@ohif/app@$ohif_version" >/dev/null
    .venv/bin/passerelle install-viewer --integrity "$ohif_integrity" \
        "$download/ohif-app-$ohif_version.tgz"
fi
