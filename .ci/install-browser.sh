#!/bin/sh
# Headless Chromium + chromedriver for tests/integration/test_report_browser.py (Debian/Ubuntu).
# Never fails CI: where apt is missing or not allowed, the browser test skips with its reason.
set +e
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "install-browser: chromium and chromedriver already present"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get here; the browser test will be skipped"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install-browser: not root and no sudo; the browser test will be skipped"; exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
# Debian names them chromium / chromium-driver; Ubuntu's are snaps, so try both spellings.
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || $SUDO apt-get install -y -qq chromium-browser chromium-chromedriver >/dev/null 2>&1 \
    || echo "install-browser: apt could not install chromium; the browser test will be skipped"
command -v chromium >/dev/null 2>&1 && chromium --version 2>/dev/null | head -1
exit 0
