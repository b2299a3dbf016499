#!/usr/bin/env bash
# Set up oppiefs on a fresh Debian machine (as root): system packages for pyfuse3, a
# virtualenv in ./.venv with the package and its test extras. Idempotent and quick when
# everything is already there.
#   bash contrib/setup.sh           set up only
#   bash contrib/setup.sh --start   set up, mount /mnt/state (embedded store), import a sample
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

need=()
for pkg in libfuse3-dev fuse3 pkg-config; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.oppiefs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi

if [ "${1:-}" = "--start" ]; then
  mnt=${OPPIEFS_MOUNT:-/mnt/state}
  exec .venv/bin/python contrib/start.py "$mnt"
fi
