#!/usr/bin/env bash
# Install Debian's chromium for the page test (Playwright drives it; Playwright's own browser download
# needs the internet). Does nothing when a chromium is already on PATH. CHROMIUM_PACKAGE names the package.
set -euo pipefail
for exe in chromium chromium-browser; do
  if command -v "$exe" >/dev/null 2>&1; then exit 0; fi
done
pkg="${CHROMIUM_PACKAGE:-chromium}"
if [ "$(id -u)" = 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo="sudo -n"
else
  echo "error: the page test needs Chromium: run 'sudo apt-get install $pkg' (or set DUOCLASS_CHROMIUM to a chromium binary)" >&2
  exit 1
fi
echo "installing $pkg for the page test (apt-get)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || {
  echo "error: $pkg installed, but no chromium binary is on PATH" >&2; exit 1; }
