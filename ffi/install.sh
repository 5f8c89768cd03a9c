#!/usr/bin/env bash
# Builds and installs libmosaic.so, libmosaic.a, mosaic.h and mosaic.pc under PREFIX
# (default /usr/local):   bash ffi/install.sh [PREFIX]
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-/usr/local}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
cargo build --release --locked -p mosaic-ffi
install -d "$prefix/lib" "$prefix/include" "$prefix/lib/pkgconfig"
install -m 0755 target/release/libmosaic.so "$prefix/lib/"
install -m 0644 target/release/libmosaic.a "$prefix/lib/"
install -m 0644 include/mosaic.h "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" ffi/mosaic.pc.in > "$prefix/lib/pkgconfig/mosaic.pc"
echo "installed libmosaic $version under $prefix (pkg-config --cflags --libs mosaic)"
