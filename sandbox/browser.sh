#!/usr/bin/env bash
# Headless Chromium for the report's screenshot test, with no network: /usr/bin/chromium when installed,
# else Debian's chromium debs from the apt cache unpacked (dpkg -x, no root) into .chromium/ together with
# every dependency the system lacks (found by walking Depends). Prints the path of a runnable wrapper.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.chromium"
CACHE="${APT_CACHE:-/var/cache/apt/archives}"
WRAPPER="$DEST/chromium"

if command -v chromium >/dev/null 2>&1 && [ "$(command -v chromium)" != "$WRAPPER" ]; then
  mkdir -p "$DEST"
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v chromium)" > "$WRAPPER"
  chmod +x "$WRAPPER"
  echo "$WRAPPER"; exit 0
fi

if [ ! -f "$DEST/.unpacked" ]; then
  deb() { { ls "$CACHE/$1"_*.deb 2>/dev/null || true; } | sort -V | tail -1; }
  [ -n "$(deb chromium)" ] || { echo "no chromium deb in $CACHE: install chromium (apt-get install chromium)" >&2; exit 1; }
  rm -rf "$DEST"; mkdir -p "$DEST"
  declare -A seen=()
  queue=(chromium)
  while [ ${#queue[@]} -gt 0 ]; do
    pkg="${queue[0]}"; queue=("${queue[@]:1}")
    [ -n "${seen[$pkg]:-}" ] && continue
    seen[$pkg]=1
    file="$(deb "$pkg")"
    [ -n "$file" ] || continue
    if [ "$pkg" != chromium ] && dpkg -s "$pkg" >/dev/null 2>&1; then continue; fi
    dpkg -x "$file" "$DEST"
    for dep in $( (dpkg-deb -f "$file" Depends; echo; dpkg-deb -f "$file" Pre-Depends) | tr ',' '\n' | sed 's/(.*//; s/|.*//; s/:any//; s/ //g'); do
      [ -n "$dep" ] && queue+=("$dep")
    done
  done
  touch "$DEST/.unpacked"
fi

LIBS="$DEST/usr/lib/x86_64-linux-gnu:$DEST/usr/lib/x86_64-linux-gnu/pulseaudio:$DEST/lib/x86_64-linux-gnu:$DEST/usr/lib/chromium"
missing="$(LD_LIBRARY_PATH="$LIBS" ldd "$DEST/usr/lib/chromium/chromium" | grep 'not found' || true)"
if [ -n "$missing" ]; then
  echo "chromium's shared libraries do not resolve:" >&2; echo "$missing" >&2; exit 1
fi
cat > "$WRAPPER" <<WRAP
#!/bin/sh
export LD_LIBRARY_PATH="$LIBS\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export FONTCONFIG_PATH="\${FONTCONFIG_PATH:-/etc/fonts}"
exec "$DEST/usr/lib/chromium/chromium" "\$@"
WRAP
chmod +x "$WRAPPER"
echo "$WRAPPER"
