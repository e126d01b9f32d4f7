#!/usr/bin/env bash
# Builds the broker plugin lms_retain (lms_retain.c, next to this script) into
#   <repository>/.lms-build/lms_retain.so
# when it is missing or lms_retain.c changed since (its sha256 is kept next to the .so).
# The launcher `lms` runs this at every start, after installing gcc and mosquitto-dev.
# By hand:  bash mosquitto/plugin/build.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$(cd "$HERE/../.." && pwd)/.lms-build"
SRC="$HERE/lms_retain.c"
SO="$OUT/lms_retain.so"
STAMP="$OUT/lms_retain.sha256"

want="$(sha256sum "$SRC" | cut -d' ' -f1)"
if [ -f "$SO" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
mkdir -p "$OUT"
echo "lms: building the broker plugin $SO ..." >&2
# Built to a temporary name and moved: a broker never loads a half-written file.
gcc -std=c99 -O2 -Wall -Wextra -Werror -fPIC -shared -o "$SO.tmp" "$SRC"
mv -f "$SO.tmp" "$SO"
echo "$want" > "$STAMP"
