#!/usr/bin/env bash
# The project's test suite: formatting, lints, then every test.
# Tests that need a tool this machine lacks skip with the reason printed;
# with CI set they fail instead, since setup-debian.sh installs the tools.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet
