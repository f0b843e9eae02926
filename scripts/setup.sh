#!/usr/bin/env bash
# Idempotent machine + venv setup for mailfs (Debian 12). Run via `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config dovecot-imapd sshfs openssh-server iproute2 strace
              python3-venv gcc python3-dev)
VENV=.venv
STAMP=$VENV/.setup-stamp

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    # Keep the packages' own services (a system dovecot on :143, sshd) from starting: the
    # test rigs run private instances, and a system one would only compete for resources.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        trap 'as_root rm -f "$policy"' EXIT
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ setup.py -nt "$STAMP" ] \
        || [ src/mailfs/fs/session/fuse_caps.c -nt "$STAMP" ]; then
    echo "setup: installing mailfs into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test,dev]'
    touch "$STAMP"
fi

# Dovecot refuses to touch mail as root; the rigs and the demo run it as vmail.
getent group vmail >/dev/null || as_root groupadd --system vmail
id -u vmail >/dev/null 2>&1 || as_root useradd --system --gid vmail --home-dir /nonexistent \
    --no-create-home --shell /usr/sbin/nologin vmail

# allow_other is needed for Dovecot (as vmail) to see a mount made by another user.
if ! grep -qs '^[[:space:]]*user_allow_other' /etc/fuse.conf; then
    as_root sh -c 'echo user_allow_other >> /etc/fuse.conf'
fi
