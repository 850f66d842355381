#!/bin/sh
# Runs inside a vm-test guest, chrooted into the overlay of the host's root (see init), with
# the run directory at /vmtest. `cargo xtask vm-test` wrote there:
#   env    shell assignments (AMBIT_TEST_TIMEOUT_SCALE, TEST_THREADS, BINARY_TIMEOUT)
#   binds  "<snapshot> <path>" pairs: the binaries as they were when the run started, bound
#          over the paths compiled into the tests (CARGO_BIN_EXE_ambit), so that a rebuild on
#          the host during the run changes nothing here
#   plan   "<name> <test executable> <test name>..." lines, one per test binary
# and reads back <name>.out (libtest's output), <name>.rc (its exit status) and uname.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# No backtraces: the failure report is long enough with the node logs the tests print.
export HOME=/root LANG=C.UTF-8 NO_COLOR=1 RUST_BACKTRACE=0
TEST_THREADS=1
BINARY_TIMEOUT=1800
. /vmtest/env
export AMBIT_TEST_TIMEOUT_SCALE

uname -r >/vmtest/uname
while read -r src dst; do
    [ -n "$src" ] && mount --bind "$src" "$dst"
done </vmtest/binds

while read -r name exe tests; do
    [ -n "$name" ] || continue
    echo "vm-test: $name: $tests"
    start=$(date +%s)
    # shellcheck disable=SC2086 # the test names are separate arguments
    {
        timeout -k 10 "$BINARY_TIMEOUT" "$exe" --test-threads="$TEST_THREADS" --exact $tests
        echo "$?" >"/vmtest/$name.rc"
    } 2>&1 | tee "/vmtest/$name.out"
    echo "vm-test: $name finished in $(($(date +%s) - start)) s, exit $(cat "/vmtest/$name.rc")"
done </vmtest/plan
sync
