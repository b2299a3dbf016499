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
for pkg in libfuse3-dev fuse3 pkg-config patch; do
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
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
    || [ contrib/pyfuse3-ino-without-open.patch -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
  # pyfuse3 rebuilt from its sdist with contrib/pyfuse3-ino-without-open.patch, so that the
  # kernel may cache snapshot listings and files without opening them (the patch says why).
  # If that fails, stock pyfuse3 stays and oppiefs works without both. Only pyfuse3 comes as
  # source: with --no-binary :all: pip also built its build tools (Cython: minutes).
  if ! .venv/bin/python -c "import pyfuse3, sys; sys.exit(not getattr(pyfuse3, 'READ_INO_WITHOUT_OPEN', False))"; then
    version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('pyfuse3'))")
    build=$(mktemp -d)
    if .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary pyfuse3 \
          -d "$build" "pyfuse3==$version" 2>/dev/null \
        && tar -xzf "$build/pyfuse3-$version.tar.gz" -C "$build" \
        && patch -s -d "$build/pyfuse3-$version" -p1 < contrib/pyfuse3-ino-without-open.patch \
        && rm -f "$build/pyfuse3-$version/src/pyfuse3/__init__.c" \
        && .venv/bin/pip install -q --disable-pip-version-check --no-deps --force-reinstall \
          "$build/pyfuse3-$version" 2>/dev/null; then
      echo "setup: pyfuse3 $version rebuilt with contrib/pyfuse3-ino-without-open.patch" >&2
    else
      echo "setup: WARNING: could not rebuild pyfuse3 with the inode patch;" \
           "the kernel will not cache snapshot listings, and every open is a round trip" >&2
    fi
    rm -rf "$build"
  fi
  touch "$stamp"
fi

if [ "${1:-}" = "--start" ]; then
  mnt=${OPPIEFS_MOUNT:-/mnt/state}
  exec .venv/bin/python contrib/start.py "$mnt"
fi
