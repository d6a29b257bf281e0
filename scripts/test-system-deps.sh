#!/usr/bin/env bash
# System packages the test suite needs beyond Python (sourced by test.sh): Debian's Chromium and
# its chromedriver for the browser tests (no browser download). Installed with apt when missing
# and this shell may (root, or passwordless sudo); otherwise the browser tests skip with the
# reason, except where TRAINFLOW_REQUIRE_BROWSER=1 (CI) makes them fail.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "[test] installing chromium chromium-driver fonts-liberation (apt)"
    # Without recommends (systemd, udev, cups... are not needed headless); one font for readable screenshots.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver fonts-liberation >/dev/null
  else
    echo "[test] chromium/chromedriver missing and apt not usable here: the browser tests will skip"
  fi
fi
