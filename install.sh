#!/usr/bin/env bash
# Installs everything ctmigrate needs on a Debian host and builds ctmigrate.
# Idempotent: run it again at any time; finished steps are skipped.
#
#   sudo ./install.sh
#
# What it installs:
#   - runc, iptables, busybox-static, iproute2, protoc and build tools (apt)
#   - CRIU >= 4.2: the distribution's if it is new enough and `criu check`
#     passes, else built from Debian's own source package (suite sid),
#     installed as /usr/local/sbin/criu with its RPC schema at
#     /usr/local/include/criu/rpc.proto, with this repository's
#     criu-patches/*.patch applied in order; what was built (binary, its
#     sha256, the patches) is recorded in
#     /usr/local/share/ctmigrate/criu-build.json. A source build whose record
#     is missing or names other patches than the repository's is rebuilt.
#   - for the pre-copy tests: qemu (software emulation) and Debian's own
#     kernel (which tracks dirty memory) unpacked under $GUEST_DIR
#   - for the real-workload tests: mmdebstrap, which builds Debian root
#     filesystems at test time (cached under /var/cache/ctmigrate/rootfs)
#   - clippy, which the README's test command runs first: with rustup,
#     `rustup component add clippy` when `cargo clippy` is missing
#   - ctmigrate itself at /usr/local/bin/ctmigrate, and the static test
#     fixture at /usr/local/libexec/ctmigrate/pattern-fixture
set -euo pipefail

MIN_CRIU_MAJOR=4
MIN_CRIU_MINOR=2
CRIU_PREFIX=/usr/local
RPC_PROTO_DEST="$CRIU_PREFIX/include/criu/rpc.proto"
CRIU_SOURCE_BINARY="$CRIU_PREFIX/sbin/criu"
# Read by `ctmigrate check` and the sender's preflight (criu_build.rs).
CRIU_BUILD_MARKER=/usr/local/share/ctmigrate/criu-build.json
FIXTURE_DIR=/usr/local/libexec/ctmigrate
GUEST_DIR=/var/cache/ctmigrate/guest-kernel
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CRIU_PATCH_DIR="$REPO_DIR/criu-patches"

log() { printf 'install.sh: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo ./install.sh): it installs system packages"
command -v apt-get >/dev/null || die "this installer supports Debian-based hosts only (no apt-get found)"

export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
    runc iptables nftables busybox-static iproute2 procps util-linux psmisc patch
    protobuf-compiler pkg-config build-essential zstd tar ca-certificates
    # CRIU build dependencies (used only when CRIU is built from source)
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler python3-protobuf
    libnl-3-dev libnet1-dev libcap-dev libaio-dev libbsd-dev libgnutls28-dev
    libnftables-dev uuid-dev libdrm-dev dpkg-dev xz-utils
    # pre-copy test guest
    qemu-system-x86 kmod cpio
    # the benchmark's plot labels
    fonts-dejavu-core
    # the real-workload tests (tests/workloads.rs) build Debian root
    # filesystems from Debian's packages at test time
    mmdebstrap mount debian-archive-keyring
)

missing_packages() {
    local p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

install_apt_packages() {
    local missing
    missing=$(missing_packages)
    if [ -z "$missing" ]; then
        log "system packages already installed"
        return
    fi
    log "installing packages: $(echo $missing | tr '\n' ' ')"
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
}

# Prints "MAJOR MINOR" of the criu on PATH, or nothing.
criu_version() {
    local v
    v=$(criu --version 2>/dev/null | sed -n 's/^Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n1)
    echo "$v"
}

# The repository's CRIU patches, in the order they are applied (by name,
# byte order), one path a line.
criu_patch_files() {
    [ -d "$CRIU_PATCH_DIR" ] || return 0
    find "$CRIU_PATCH_DIR" -maxdepth 1 -type f -name '*.patch' | LC_ALL=C sort
}

# The marker's "patches" line for the repository's patches: each patch's
# file name and sha256, so that a changed patch also means a rebuild.
criu_patches_json_line() {
    local f name sum sep="" out=""
    while IFS= read -r f; do
        [ -n "$f" ] || continue
        name=$(basename "$f")
        case "$name" in
            *[!A-Za-z0-9._-]*) die "CRIU patch file name $name: only letters, digits, '.', '_' and '-' please" ;;
        esac
        sum=$(sha256sum "$f" | cut -d' ' -f1)
        out="$out$sep{\"name\": \"$name\", \"sha256\": \"$sum\"}"
        sep=", "
    done < <(criu_patch_files)
    printf '  "patches": [%s],\n' "$out"
}

# A CRIU built from source here is usable only if the marker says it is
# this very binary, built with exactly the repository's patches.
criu_source_build_is_current() {
    local bin=$1
    [ -f "$CRIU_BUILD_MARKER" ] || { log "no build record $CRIU_BUILD_MARKER for $bin: rebuilding CRIU"; return 1; }
    local sum
    sum=$(sha256sum "$bin" | cut -d' ' -f1)
    grep -qF "\"sha256\": \"$sum\"" "$CRIU_BUILD_MARKER" \
        || { log "$bin is not the binary $CRIU_BUILD_MARKER records: rebuilding CRIU"; return 1; }
    grep -qxF "$(criu_patches_json_line)" "$CRIU_BUILD_MARKER" \
        || { log "$bin was built with other patches than criu-patches/ holds: rebuilding CRIU"; return 1; }
}

criu_is_usable() {
    command -v criu >/dev/null || return 1
    local bin
    bin=$(command -v criu)
    if [ "$bin" = "$CRIU_SOURCE_BINARY" ]; then
        criu_source_build_is_current "$bin" || return 1
    fi
    local v major minor
    v=$(criu_version)
    [ -n "$v" ] || return 1
    read -r major minor <<<"$v"
    if [ "$major" -lt "$MIN_CRIU_MAJOR" ] || { [ "$major" -eq "$MIN_CRIU_MAJOR" ] && [ "$minor" -lt "$MIN_CRIU_MINOR" ]; }; then
        return 1
    fi
    criu check >/dev/null 2>&1 || return 1
    [ -f "$RPC_PROTO_DEST" ] || [ -f /usr/include/criu/rpc.proto ] || return 1
}

build_criu_from_debian_source() {
    local src_list=/etc/apt/sources.list.d/ctmigrate-criu-src.sources
    if [ ! -f "$src_list" ]; then
        log "adding a deb-src entry for Debian sid (source packages only: no binary comes from it)"
        cat >"$src_list" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        apt-get update -q
    fi
    local work=/var/cache/ctmigrate/criu-src
    mkdir -p "$work"
    cd "$work"
    if ! ls criu_*.orig.tar.* >/dev/null 2>&1; then
        log "downloading CRIU's Debian source package"
        # The Debian packaging tarball may be missing from the mirror; the
        # upstream (orig) tarball is all the build needs, so a failure here is
        # judged by whether the orig tarball arrived.
        apt-get source --download-only criu || true
    fi
    local orig
    orig=$(ls criu_*.orig.tar.* 2>/dev/null | sort -V | tail -n1)
    [ -n "$orig" ] || die "could not download CRIU's source (criu_*.orig.tar.*) from Debian sid"
    log "building CRIU from $orig"
    rm -rf build && mkdir build
    tar -xf "$orig" -C build --strip-components=1
    local p
    while IFS= read -r p; do
        [ -n "$p" ] || continue
        log "applying $(basename "$p")"
        patch -d build -p1 --forward --batch --quiet <"$p" || die "CRIU patch $p does not apply to $orig"
    done < <(criu_patch_files)
    make -C build -j"$(nproc)" criu >build.log 2>&1 || { tail -n 40 build.log >&2; die "CRIU build failed (full log: $work/build.log)"; }
    install -D -m 0755 build/criu/criu "$CRIU_SOURCE_BINARY"
    install -D -m 0644 build/images/rpc.proto "$RPC_PROTO_DEST"
    write_criu_build_marker "$orig"
    cd "$REPO_DIR"
    hash -r
}

# Records what build_criu_from_debian_source installed. One key a line:
# criu_source_build_is_current greps it.
write_criu_build_marker() {
    local orig=$1 sum version
    sum=$(sha256sum "$CRIU_SOURCE_BINARY" | cut -d' ' -f1)
    version=$("$CRIU_SOURCE_BINARY" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1)
    mkdir -p "$(dirname "$CRIU_BUILD_MARKER")"
    {
        printf '{\n'
        printf '  "binary": "%s",\n' "$CRIU_SOURCE_BINARY"
        printf '  "sha256": "%s",\n' "$sum"
        printf '  "version": "%s",\n' "$version"
        printf '  "source": "%s",\n' "$(basename "$orig")"
        criu_patches_json_line
        printf '  "built_at": "%s"\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        printf '}\n'
    } >"$CRIU_BUILD_MARKER.tmp"
    mv "$CRIU_BUILD_MARKER.tmp" "$CRIU_BUILD_MARKER"
    log "recorded the CRIU build in $CRIU_BUILD_MARKER"
}

install_criu() {
    if criu_is_usable; then
        log "CRIU $(criu --version | sed -n 's/^Version: *//p') is usable"
        return
    fi
    # The distribution's package first: if it is new enough and works on this
    # kernel, it is the better-maintained choice.
    if apt-cache policy criu 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        local cand
        cand=$(apt-cache policy criu | sed -n 's/ *Candidate: *//p')
        case "$cand" in
            [5-9]*|4.[2-9]*|4.[1-9][0-9]*)
                log "trying the distribution's criu $cand"
                apt-get install -y -q --no-install-recommends criu libcriu-dev || true
                if criu_is_usable; then return; fi
                ;;
        esac
    fi
    build_criu_from_debian_source
    criu_is_usable || die "CRIU at $(command -v criu) does not pass 'criu check' on this kernel"
    log "CRIU $(criu --version | sed -n 's/^Version: *//p') installed"
}

# Debian's kernel has CONFIG_MEM_SOFT_DIRTY=y; the pre-copy tests boot it
# under qemu. Unpacked, not installed: this host keeps its own kernel.
install_guest_kernel() {
    if [ -f "$GUEST_DIR/ready" ]; then
        log "pre-copy guest kernel ready ($(cat "$GUEST_DIR/ready"))"
        return
    fi
    local pkg
    pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n1)
    [ -n "$pkg" ] || die "no linux-image-6.1.0-*-amd64 package found (apt-get update?)"
    log "unpacking $pkg for the pre-copy test guest"
    rm -rf "$GUEST_DIR" && mkdir -p "$GUEST_DIR/dl"
    (cd "$GUEST_DIR/dl" && apt-get download "$pkg" >/dev/null)
    dpkg -x "$GUEST_DIR"/dl/*.deb "$GUEST_DIR/root"
    rm -rf "$GUEST_DIR/dl"
    local kver
    kver=$(ls "$GUEST_DIR/root/lib/modules" | head -n1)
    depmod -b "$GUEST_DIR/root" "$kver"
    grep -q '^CONFIG_MEM_SOFT_DIRTY=y' "$GUEST_DIR/root/boot/config-$kver" \
        || die "$pkg lacks CONFIG_MEM_SOFT_DIRTY: the pre-copy guest needs it"
    echo "$kver" >"$GUEST_DIR/ready"
}

build_fixtures() {
    log "building the static test fixtures"
    mkdir -p "$FIXTURE_DIR"
    gcc -O2 -static -pthread -Wall -Wextra -o "$FIXTURE_DIR/pattern-fixture" "$REPO_DIR/fixtures/pattern-fixture.c"
}

# The README's test command runs `cargo clippy` before the tests.
install_clippy() {
    command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) first"
    cd "$REPO_DIR"
    if cargo clippy --version >/dev/null 2>&1; then
        log "$(cargo clippy --version) is installed"
        return
    fi
    command -v rustup >/dev/null \
        || die "cargo clippy not found and no rustup to add it: install clippy for $(cargo --version) (the test command runs it)"
    log "adding clippy to the Rust toolchain (rustup component add clippy)"
    rustup component add clippy >&2 || die "'rustup component add clippy' failed: the test command needs cargo clippy"
    cargo clippy --version >/dev/null 2>&1 || die "cargo clippy still does not run after 'rustup component add clippy'"
}

build_ctmigrate() {
    command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) first"
    log "building ctmigrate"
    cd "$REPO_DIR"
    cargo build --release --locked
    install -m 0755 target/release/ctmigrate /usr/local/bin/ctmigrate
    log "installed /usr/local/bin/ctmigrate"
}

# sshd for the SSH transport test: the test starts its own sshd inside a
# test network namespace; installing the package must not start one on
# this host, so service starts are refused while it installs.
install_sshd_for_tests() {
    if dpkg-query -W -f='${Status}' openssh-server 2>/dev/null | grep -q "install ok installed"; then
        return
    fi
    log "installing openssh-server (not started: the SSH test runs its own sshd)"
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
    fi
    apt-get install -y -q --no-install-recommends openssh-server openssh-client || { [ "$created" = 1 ] && rm -f "$policy"; die "cannot install openssh-server"; }
    [ "$created" = 1 ] && rm -f "$policy"
    return 0
}

install_apt_packages
install_sshd_for_tests
install_criu
install_guest_kernel
build_fixtures
install_clippy
build_ctmigrate
log "done: try 'sudo ctmigrate check' and 'sudo ctmigrate validate'"
