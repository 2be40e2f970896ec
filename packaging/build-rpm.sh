#!/bin/sh
# Build dist/hostagent-<version>.<arch>.rpm from this checkout (rpmbuild: Debian/Ubuntu package
# rpm, RHEL/Fedora rpm-build).
#   packaging/build-rpm.sh [--version V] [--out DIR] [--compression zstd|xz|gzip|none] ...
# (packaging/build.py --help lists every option)
set -e
exec /usr/bin/python3 "$(dirname "$0")/build.py" rpm "$@"
