#!/usr/bin/env bash
# Install what Passerelle needs on Debian: system packages (with --test, the DICOM tools the
# tests drive) and a virtual environment in .venv with the package installed in it.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(python3 python3-venv python3-pip)
if [[ "${1:-}" == "--test" ]]; then
    packages+=(dcmtk dicom3tools)
    extras="[test]"
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

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
