#!/usr/bin/env bash
# Installs what ulan's build, demo and tests need on Debian 12.
# Run as root, or as a user with sudo. Safe to run again.
set -euo pipefail

packages=(
    build-essential pkg-config   # cc for crates with C parts
    vde2 vdeplug vde-switch      # vde_plug and vde_switch: real third-party clients and the benchmark peer
    qemu-system-x86 qemu-utils   # guests, and qemu-img for disk overlays
    linux-image-amd64            # the built-in guest image's kernel and virtio modules
    busybox-static iperf3        # the built-in guest image's userland
    user-mode-linux              # UML nodes (they do not boot on every host: see ulan doctor)
    iproute2 iputils-ping        # the demo's namespaces
    util-linux                   # unshare
    socat curl                   # the README's examples
    dpdk dpdk-dev                # dpdk-testpmd (in dpdk-dev on Debian 12): the vhost-user reference backend
    tshark                       # reads captures back in the tests
    graphviz                     # dot parses ulan graph --format dot in the tests
    chromium chromium-driver     # the web page tests: headless Chromium over WebDriver
    crun                         # container nodes: the OCI runtime (rootless)
    umoci skopeo zstd            # tests of `ulan image import`: third-party OCI/docker archives, zstd layers
    uidmap                       # newuidmap/newgidmap: container nodes map /etc/subuid ranges
    btrfs-progs                  # mkfs.btrfs: the Btrfs snapshot-root test makes a loop-mounted Btrfs
)

find_missing() {
    missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
}

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
find_missing
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    # apt may remove a package to install another (a newer qemu-utils
    # from elsewhere goes when Debian's qemu-system-x86 pulls in its own
    # qemu-block-extra): install what went missing again, from Debian.
    find_missing
    if ((${#missing[@]})); then
        echo "setup: installing again ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
        find_missing
        if ((${#missing[@]})); then
            echo "setup: could not install ${missing[*]}" >&2
            exit 1
        fi
    fi
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found. Install a Rust toolchain (1.80 or newer), e.g. with rustup, then run this again." >&2
    exit 1
fi
echo "setup: ok ($(cargo --version))"
