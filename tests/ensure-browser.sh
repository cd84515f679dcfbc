#!/usr/bin/env bash
# What tests/integration/test_review_page.py needs from the system: Debian's chromium (Playwright
# cannot download its own browser here) and the fonts the page is drawn with. `make test` runs this
# first. Missing packages are installed with apt-get when run as root; otherwise, or when that
# fails, it says before the run which test will be skipped and why. It never fails the build.
set -uo pipefail

PACKAGES=(chromium fonts-liberation fonts-dejavu-core)
TEST=tests/integration/test_review_page.py

installed() {  # chromium counts when on PATH, as the test finds it; fonts when dpkg has them
  if [ "$1" = chromium ]; then
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
  else
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
  fi
}

missing=()
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "ensure-browser: chromium and fonts present ($(command -v chromium || command -v chromium-browser))"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "ensure-browser: installing ${missing[*]} for $TEST (apt-get)"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    exit 0
  fi
  why="apt-get could not install ${missing[*]}"
else
  why="${missing[*]} missing, and apt-get is unavailable or this is not root"
fi
if installed chromium; then
  echo "ensure-browser: $why; $TEST still runs, its screenshot drawn with fallback fonts"
else
  echo "ensure-browser: $why: $TEST will be SKIPPED (the review page is not checked);" \
    "install them (sudo apt-get install ${PACKAGES[*]}) to run it"
fi
exit 0
