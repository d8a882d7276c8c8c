#!/usr/bin/env bash
# Idempotent setup on a fresh Debian 12 machine: system packages, then a Python >= 3.12 venv
# at .venv with the project installed (editable: the addons/ packages and supervisord.conf
# are used from the checkout). Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(docker-registry skopeo wireguard-go wireguard-tools iproute2 curl)
# Tests: nginx and wrk for the benchmarks, docker.io for tests/e2e/test_docker.py (which starts
# its own dockerd), Go for the differential tests' recorder (tests/standins/recorder) and the
# OCI conformance suite, Chromium for the live view's browser test (tests/e2e/test_liveview.py),
# PostgreSQL for the shared ledger's tests (tests/support/postgres.py starts its own throwaway cluster).
[[ "${1:-}" == "--test" ]] && APT_PACKAGES+=(nginx-light wrk docker.io golang-go podman chromium
    postgresql)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    # Installing docker.io would start the system's dockerd where systemd runs, which creates
    # a bridge and iptables rules on the host; the tests never use it. While we install, a
    # policy-rc.d (Debian's mechanism; only if none exists) keeps docker and a containerd we
    # bring in from starting, and afterwards they are disabled. One already there is untouched.
    units=(); guard=""
    if [[ " ${missing[*]} " == *" docker.io "* ]]; then
        units=(docker.service docker.socket)
        dpkg-query -W -f='${Status}' containerd 2>/dev/null | grep -q "install ok installed" \
            || units+=(containerd.service)
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            guard=/usr/sbin/policy-rc.d
            trap '$SUDO rm -f "$guard"' EXIT
            printf '#!/bin/sh\ncase "$1" in docker*|containerd*) exit 101;; esac\nexit 0\n' \
                | $SUDO tee "$guard" >/dev/null
            $SUDO chmod 755 "$guard"
        fi
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [[ -n "$guard" ]]; then $SUDO rm -f "$guard"; trap - EXIT; fi
    # Debian starts its own docker-registry service where systemd runs; we run ours.
    $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
    # Debian's postgresql starts a system cluster; the tests start their own.
    if [[ " ${missing[*]} " == *" postgresql "* ]]; then
        $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
    fi
    ((${#units[@]})) && { $SUDO systemctl disable --now "${units[@]}" >/dev/null 2>&1 || true; }
fi

find_python() {
    local pin candidates=()
    pin=$(cat .python-version)
    local root="${PYENV_ROOT:-$HOME/.pyenv}"
    candidates+=("$root/versions/$pin/bin/python3")
    candidates+=("$root"/versions/3.1[2-9]*/bin/python3 python3.13 python3.12 python3)
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 && \
           "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$c"; return 0
        fi
    done
    return 1
}

if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    py=$(find_python) || { echo "setup: no Python >= 3.12 found (pyenv or python3.12)" >&2; exit 1; }
    echo "setup: creating .venv with $py" >&2
    rm -rf .venv
    "$py" -m venv .venv
fi

extras=""; [[ "${1:-}" == "--test" ]] && extras="[test]"
stamp=".venv/.installed$extras"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    .venv/bin/pip install -q --disable-pip-version-check -e ".$extras"
    touch "$stamp"
fi
