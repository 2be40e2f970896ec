#!/bin/sh
# Build dist/hostagent_<version>_<arch>.deb from this checkout.
#   packaging/build-deb.sh [--version V] [--out DIR] [--compression zstd|xz|gzip|none] ...
# (packaging/build.py --help lists every option)
set -e
exec /usr/bin/python3 "$(dirname "$0")/build.py" deb "$@"
