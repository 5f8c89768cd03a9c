#!/usr/bin/env bash
# Builds libmosaic, then the C tests with -Wall -Wextra -Werror against the static and the shared
# library, and once more under AddressSanitizer, and runs each. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../../.."
cargo build --release --locked -p mosaic-ffi -p mosrun
out=target/c-tests
mkdir -p "$out"
cflags=(-std=c11 -Wall -Wextra -Werror -O1 -g -Iinclude)
libs=(-lpthread -ldl -lm)

cc "${cflags[@]}" ffi/tests/c/test_api.c target/release/libmosaic.a "${libs[@]}" -o "$out/test_api_static"
cc "${cflags[@]}" ffi/tests/c/test_api.c -Ltarget/release -lmosaic -Wl,-rpath,"$PWD/target/release" -o "$out/test_api_shared"
# Under ASan: Mosaic's own SIGBUS handler serves faults, so ASan must not take SIGBUS.
cc "${cflags[@]}" -fsanitize=address -fno-omit-frame-pointer ffi/tests/c/test_api.c \
  target/release/libmosaic.a "${libs[@]}" -o "$out/test_api_asan"

# A program with its own SIGBUS handler beside Mosaic's (sigaction and signal are interposed).
cc "${cflags[@]}" ffi/tests/c/sigbus_chain.c target/release/libmosaic.a "${libs[@]}" -o "$out/sigbus_chain_static"
cc "${cflags[@]}" ffi/tests/c/sigbus_chain.c -Ltarget/release -lmosaic -Wl,-rpath,"$PWD/target/release" \
  -o "$out/sigbus_chain_shared"
for t in sigbus_chain_static sigbus_chain_shared; do
  echo "--- $t"
  "$out/$t"
done

for t in test_api_static test_api_shared test_api_asan; do
  echo "--- $t"
  ASAN_OPTIONS=handle_sigbus=0:detect_leaks=1 "$out/$t"
done

# The examples: C (a heat stencil) and Fortran (iso_c_binding), each over network RAM four times
# their local budget, with an in-process memory server.
cc "${cflags[@]}" -O2 examples/c/stencil.c target/release/libmosaic.a "${libs[@]}" -o "$out/stencil"
echo "--- examples/c/stencil.c"
env -u MOSAIC_SERVERS "$out/stencil" 32
gfortran -Wall -Werror -O2 -J "$out" examples/fortran/mosaic.f90 examples/fortran/sum.f90 target/release/libmosaic.a "${libs[@]}" -o "$out/fortran_sum"
echo "--- examples/fortran/sum.f90"
"$out/fortran_sum"

# DSM through the C API: a job of three processes started by mosrun -n.
cc "${cflags[@]}" -O2 examples/c/dsm_counter.c target/release/libmosaic.a "${libs[@]}" -o "$out/dsm_counter"
echo "--- examples/c/dsm_counter.c (mosrun -n 3)"
env -u MOSAIC_CLUSTER_KEY -u MOSAIC_CLUSTER_KEY_FILE target/release/mosrun -n 3 "$out/dsm_counter" 500

# The parallel histogram with the C API's allocation and global atomics, under mosrun -n 3.
cc "${cflags[@]}" -O2 examples/c/dsm_histogram.c target/release/libmosaic.a "${libs[@]}" -o "$out/dsm_histogram"
echo "--- examples/c/dsm_histogram.c (mosrun -n 3)"
env -u MOSAIC_CLUSTER_KEY -u MOSAIC_CLUSTER_KEY_FILE target/release/mosrun -n 3 "$out/dsm_histogram" 3000

# DSM from Fortran (iso_c_binding), under mosrun -n 3.
gfortran -Wall -Werror -O2 -J "$out" examples/fortran/mosaic.f90 examples/fortran/dsm_sum.f90 target/release/libmosaic.a "${libs[@]}" -o "$out/fortran_dsm_sum"
echo "--- examples/fortran/dsm_sum.f90 (mosrun -n 3)"
env -u MOSAIC_CLUSTER_KEY -u MOSAIC_CLUSTER_KEY_FILE target/release/mosrun -n 3 "$out/fortran_dsm_sum"

# The C DSM example, unchanged, started by Open MPI's mpirun (Debian's openmpi-bin; .ci/run
# installs it): the nodes take their rank from OMPI_COMM_WORLD_* and meet by the job's name.
if command -v mpirun >/dev/null 2>&1; then
  echo "--- examples/c/dsm_counter.c (mpirun -n 2)"
  MOSAIC_CLUSTER_KEY="c-tests-mpirun-key-$$-0123456789" \
    mpirun --allow-run-as-root --oversubscribe -x MOSAIC_CLUSTER_KEY -n 2 "$out/dsm_counter" 500
else
  echo "--- examples/c/dsm_counter.c under mpirun: skipped (no mpirun; apt-get install openmpi-bin)"
fi
