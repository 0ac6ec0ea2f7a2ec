#!/usr/bin/env bash
# Installs headless Chromium and its WebDriver from Debian's packages for tests/test_browser.py:
#   apt-get install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core
# A no-op when /usr/bin/chromium and /usr/bin/chromedriver are there. Exits 3 with the reason on
# stderr where there is no apt-get (the test then skips, saying so). Not root: sudo without a password.
set -euo pipefail
have() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }
have && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "no apt-get on this system: install Chromium and its chromedriver with the system's package manager" >&2
    exit 3
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
# Two test workers may ask at once: one installs, the other waits and finds it done.
exec 9>"${TMPDIR:-/tmp}/tiertune-chromium-install.lock"
flock 9
have && exit 0
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get -q -o DPkg::Lock::Timeout=600 update
$sudo apt-get -q -o DPkg::Lock::Timeout=600 install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core
have
