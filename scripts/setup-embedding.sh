#!/usr/bin/env bash
# Install what tests/test_embedding.py needs: the npm packages of examples/node and examples/web (exact
# versions from their package-lock.json) and Debian's Chromium for the browser test. Idempotent: a second run
# checks stamps and returns in well under a second.
#
#   bash scripts/setup-embedding.sh
#
# Nothing here downloads a binary from outside a package registry: onnxruntime-node's install script (which
# fetches GPU builds from another host) is skipped, its CPU build ships inside the npm package; sharp's
# prebuilt libvips comes as npm packages (@img/sharp-*); playwright-core downloads no browser.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup-embedding: %s\n' "$*"; }
die() { say "error: $*" >&2; exit 1; }

# ---- Node.js (sharp 0.35 needs 20.9 or newer; Debian 12's nodejs package is 18, too old) ----------------
command -v node >/dev/null && command -v npm >/dev/null || die "node and npm (Node.js >= 20.9) are not on PATH"
node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 9) ? 0 : 1)' \
    || die "node $(node --version) is older than 20.9, which sharp needs"

# ---- npm packages, from the lock files --------------------------------------------------------------------
# `npm ci` wipes node_modules and reinstalls (~10 s each from npm's cache): run it only when the lock file
# changed since the last install, which a stamp inside node_modules records.
npm_install() {
    local dir=$1 stamp want
    stamp="$dir/node_modules/.cifarkit-installed"
    want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        say "$dir: npm packages up to date"
        return
    fi
    say "$dir: npm ci"
    # --ignore-scripts and ONNXRUNTIME_NODE_INSTALL=skip: no install script may reach for another host.
    (cd "$dir" && ONNXRUNTIME_NODE_INSTALL=skip npm ci --ignore-scripts --no-audit --no-fund --prefer-offline --loglevel=error)
    echo "$want" > "$stamp"
}
npm_install examples/node
npm_install examples/web

# ---- Chromium, for the browser test -------------------------------------------------------------------------
chromium=${CHROMIUM:-/usr/bin/chromium}
if [ -x "$chromium" ]; then
    say "chromium: $chromium"
else
    say "installing Debian's chromium"
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || die "no $chromium, and not root to apt-get install chromium"
        sudo="sudo"
    fi
    # fonts-dejavu-core: without a font the page renders boxes (Chromium only recommends fonts).
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
    [ -x "$chromium" ] || die "apt-get installed chromium, but $chromium is still missing"
fi
say "ready"
