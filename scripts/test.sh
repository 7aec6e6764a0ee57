#!/usr/bin/env bash
# The project's test suite: formatting, lints, then every test.
# Tests that need a tool this machine lacks skip with the reason printed;
# with CI set they fail instead, since setup-debian.sh installs the tools.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
# Tests that cannot run here say why in this file; it is listed at the end
# (cargo test shows a passing test's output only on failure).
export ULAN_SKIP_LOG="$PWD/target/skipped-tests.log"
mkdir -p target
rm -f "$ULAN_SKIP_LOG"
list_skips() {
    if [ -s "$ULAN_SKIP_LOG" ]; then
        echo "== tests skipped here, and why:"
        sort -u "$ULAN_SKIP_LOG"
    else
        echo "== no test was skipped"
    fi
}
trap list_skips EXIT
cargo test --quiet
