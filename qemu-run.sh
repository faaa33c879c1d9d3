#!/usr/bin/env bash
# Build dmakern (release) and boot it under QEMU. The console streams to stdout; the exit status is 0
# only when the kernel printed its summary line with no failure and exited 0.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

usage() {
    cat <<'USAGE'
Usage: ./qemu-run.sh [options] [-- QEMU_ARGS...]
       ./qemu-run.sh --bench [--arch aarch64|armv7|all] [--update-baseline]

Build dmakern (release) and boot it under QEMU with semihosting, so the kernel's exit status
becomes this script's. Exit status: 0 only when the kernel reported no failure; a crash, a
time-out or a missing summary line is a failure.

Options:
  --arch aarch64|armv7   architecture (default aarch64; armv7 for raspi2b)
  --machine MACHINE      QEMU machine (default virt):
                           virt     aarch64 or armv7, QEMU makes the DTB
                           raspi3b  Raspberry Pi 3B, aarch64
                           raspi2b  Raspberry Pi 2B, armv7
                           raspi4b  Raspberry Pi 4B, aarch64 (QEMU 9.0 and later; with an older
                                    QEMU this script says so and exits 77, "skipped")
                         The raspi machines make no DTB: the kernel boots with the project's own
                         tests/dts/MACHINE.dts (compiled with dtc) unless --dtb names another.
                         Their RAM, CPU model and CPU count are the board's. Both UARTs (PL011,
                         then the mini UART) go to stdout, so either can be the console.
  --mem SIZE             RAM size, QEMU syntax: 128M, 2G (virt; default 1G)
  --smp N                number of CPUs (virt; default 1)
  --cpu MODEL            CPU model (virt; default cortex-a57 on aarch64, cortex-a15 on armv7)
  --append "BOOTARGS"    kernel command line (/chosen/bootargs)
  --dtb FILE             boot with this DTB instead of the one QEMU generates
  --dtb-raw FILE         place FILE in RAM byte for byte (at RAM base + 128 MiB) and pass its
                         address to the kernel, bypassing QEMU's own DTB handling: for checking
                         how the kernel treats a malformed blob QEMU itself would refuse, or (on
                         raspi) a /memory QEMU would rewrite, as the Pi firmware's DTBs leave it
  --dtb-ptr ADDR         pass ADDR as the DTB pointer (with --dtb-raw, or alone: e.g. 0 for none)
  --icount               deterministic timing: one instruction = 1 ns of virtual time
  --gdb                  wait for gdb on :1234 and print the gdb command line
  --timeout SECONDS      kill QEMU after this long and fail (default 120; 0 = none)
  --early-uart ADDR      build a variant that prints to the PL011 at ADDR before the device tree
                         names a console (QEMU virt: 0x09000000), to see why a DTB was refused
  --no-build             boot the image built last time (the test harness builds once)
  --build-only           build the image and stop
  --log FILE             also write the console output to FILE
  --bench                boot every benchmark configuration under --icount and print one table of
                         the counts with their targets and Linux's figures, then check them against
                         the committed baseline (tests/bench-baseline.txt); takes only --arch
                         (aarch64, armv7 or all, the default) and --update-baseline
  --update-baseline      with --bench: accept this run's counts as the new baseline and rewrite
                         README.md's table (the deliberate step after a change in cost)
  --help                 this text
  -- ARGS...             passed to QEMU as they are (e.g. -- -M virt,gic-version=3)
USAGE
}

arch="" machine=virt mem="" smp="" cpu="" append="" dtb="" dtb_raw="" dtb_ptr="" early_uart="" icount=0 gdb=0 timeout=120 build=1 boot=1 log="" bench=0 update_baseline=""
extra=()
given=()
while [ $# -gt 0 ]; do
    case "$1" in --arch|--bench|--update-baseline) ;; *) given+=("$1") ;; esac
    case "$1" in
        --arch) arch=${2:?--arch needs a value}; shift 2 ;;
        --machine) machine=${2:?--machine needs a value}; shift 2 ;;
        --mem) mem=${2:?--mem needs a value}; shift 2 ;;
        --smp) smp=${2:?--smp needs a value}; shift 2 ;;
        --cpu) cpu=${2:?--cpu needs a value}; shift 2 ;;
        --append) append=${2?--append needs a value}; shift 2 ;;
        --dtb) dtb=${2:?--dtb needs a file}; shift 2 ;;
        --dtb-raw) dtb_raw=${2:?--dtb-raw needs a file}; shift 2 ;;
        --dtb-ptr) dtb_ptr=${2:?--dtb-ptr needs an address}; shift 2 ;;
        --early-uart) early_uart=${2:?--early-uart needs an address}; shift 2 ;;
        --icount) icount=1; shift ;;
        --gdb) gdb=1; shift ;;
        --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
        --no-build) build=0; shift ;;
        --build-only) boot=0; shift ;;
        --log) log=${2:?--log needs a file}; shift 2 ;;
        --bench) bench=1; shift ;;
        --update-baseline) update_baseline=1; shift ;;
        --help|-h) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "qemu-run.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$bench" = 1 ]; then
    [ ${#given[@]} = 0 ] || { echo "qemu-run.sh: --bench takes only --arch and --update-baseline, not ${given[*]}" >&2; exit 2; }
    # The configurations, the parsing and the table are a host program (examples/bench_table.rs,
    # sharing tests/common/bench.rs with the regression test); it boots each configuration through
    # this script.
    exec cargo run --example bench_table -- --arch "${arch:-all}" ${update_baseline:+--update-baseline}
fi
[ -z "$update_baseline" ] || { echo "qemu-run.sh: --update-baseline goes with --bench" >&2; exit 2; }
# Each machine: the architectures it runs and, for the boards, the raw image's load address.
case "$machine" in
    virt) board_arch="" ;;
    raspi3b|raspi4b) board_arch=aarch64 ;;
    raspi2b) board_arch=armv7 ;;
    *) echo "qemu-run.sh: machine '$machine' is not supported (supported: virt, raspi2b, raspi3b, raspi4b)" >&2; exit 2 ;;
esac
: "${arch:=${board_arch:-aarch64}}"
case "$arch" in
    aarch64) target=aarch64-unknown-none-softfloat qemu=qemu-system-aarch64 ;;
    armv7) target=armv7a-none-eabi qemu=qemu-system-arm ;;
    *) echo "qemu-run.sh: --arch must be aarch64 or armv7, not '$arch'" >&2; exit 2 ;;
esac
if [ -n "$board_arch" ]; then
    [ "$arch" = "$board_arch" ] || { echo "qemu-run.sh: QEMU's $machine runs $board_arch images, not $arch" >&2; exit 2; }
    for fixed in "mem:$mem" "smp:$smp" "cpu:$cpu"; do
        [ -z "${fixed#*:}" ] || { echo "qemu-run.sh: --${fixed%%:*} does not apply to $machine: RAM, CPUs and CPU model are the board's" >&2; exit 2; }
    done
    [ -z "$dtb" ] || [ -z "$dtb_raw$dtb_ptr" ] || { echo "qemu-run.sh: --dtb and --dtb-raw/--dtb-ptr exclude each other" >&2; exit 2; }
else
    : "${mem:=1G}" "${smp:=1}"
    case "$arch" in aarch64) : "${cpu:=cortex-a57}" ;; armv7) : "${cpu:=cortex-a15}" ;; esac
    [[ "$smp" =~ ^[0-9]+$ ]] && [ "$smp" -ge 1 ] || { echo "qemu-run.sh: --smp needs a positive number" >&2; exit 2; }
fi
[[ "$timeout" =~ ^[0-9]+$ ]] || { echo "qemu-run.sh: --timeout needs a number of seconds" >&2; exit 2; }
if [ -n "$dtb" ] && [ ! -r "$dtb" ]; then echo "qemu-run.sh: cannot read DTB '$dtb'" >&2; exit 2; fi
if [ -n "$dtb_raw" ] && [ ! -r "$dtb_raw" ]; then echo "qemu-run.sh: cannot read '$dtb_raw'" >&2; exit 2; fi

# The kernel builds in its own target directory, apart from host builds (and from a `cargo test`
# that runs this script while it holds the lock on target/).
export CARGO_TARGET_DIR="$here/target/kernel"
if [ -n "$early_uart" ]; then
    [[ "$early_uart" =~ ^0x[0-9a-fA-F]+$ ]] || { echo "qemu-run.sh: --early-uart needs a hex address like 0x09000000" >&2; exit 2; }
    export DMAKERN_EARLY_UART="$early_uart"
    CARGO_TARGET_DIR="$here/target/kernel-early-uart-$early_uart"
else
    unset DMAKERN_EARLY_UART
fi
elf="$CARGO_TARGET_DIR/$target/release/dmakern"
img="$CARGO_TARGET_DIR/dmakern-$arch.img"
if [ "$build" = 1 ]; then
    if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
        rustup target add "$target" >&2 || { echo "qemu-run.sh: run: rustup target add $target" >&2; exit 2; }
    fi
    cargo build --release --target "$target" --bin dmakern >&2
    objcopy="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-objcopy"
    [ -x "$objcopy" ] || { echo "qemu-run.sh: llvm-objcopy missing; run: rustup component add llvm-tools" >&2; exit 2; }
    "$objcopy" -O binary "$elf" "$img.tmp.$$"
    mv -f "$img.tmp.$$" "$img"
    echo "qemu-run.sh: $img: $(stat -c %s "$img") bytes" >&2
fi
[ "$boot" = 1 ] || exit 0
[ -r "$img" ] || { echo "qemu-run.sh: no image at $img (run without --no-build)" >&2; exit 2; }

# QEMU: install it where we can (root on Debian), else say how.
if ! command -v "$qemu" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "qemu-run.sh: $qemu is missing; installing qemu-system-arm with apt-get" >&2
        apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-system-arm >&2
    else
        echo "qemu-run.sh: $qemu is missing. Install it with: sudo apt-get install qemu-system-arm" >&2
        exit 2
    fi
fi

if [ -n "$board_arch" ] && ! "$qemu" -M help | grep -q "^$machine "; then
    echo "qemu-run.sh: SKIP: $("$qemu" --version | head -n 1) has no $machine machine (QEMU 9.0 and later have raspi4b)" >&2
    exit 77
fi
if [ -n "$board_arch" ] && [ -z "$dtb$dtb_raw$dtb_ptr" ]; then
    command -v dtc >/dev/null 2>&1 || { echo "qemu-run.sh: $machine needs a DTB: install dtc (apt-get install device-tree-compiler) or pass --dtb" >&2; exit 2; }
    dtb="$here/target/kernel/$machine.dtb"
    mkdir -p "$here/target/kernel"
    dtc -q -I dts -O dtb -o "$dtb.tmp.$$" "$here/tests/dts/$machine.dts"
    mv -f "$dtb.tmp.$$" "$dtb"
fi

cleanup=()
trap 'rm -f "${cleanup[@]}"' EXIT
args=(-M "$machine" -nodefaults -display none -semihosting-config enable=on,target=native -no-reboot)
if [ -n "$board_arch" ]; then
    # PL011 first, mini UART second (QEMU's order for the BCM283x), both on stdout.
    args+=(-chardev stdio,id=console,mux=on -serial chardev:console -serial chardev:console)
else
    args+=(-cpu "$cpu" -m "$mem" -smp "$smp" -serial stdio -global virtio-mmio.force-legacy=false)
fi
if [ -n "$dtb_raw" ] || [ -n "$dtb_ptr" ]; then
    # Play the boot loader ourselves: the image and the blob go into RAM as they are, and a
    # five-instruction stub loads the DTB register and jumps to the image. QEMU's virt RAM starts
    # at 1 GiB, where QEMU still puts its own DTB (1 MiB) for firmware; everything goes above it.
    # The raspi machines keep -kernel, which places the image (at 0x200000 with the arm64 header,
    # 0x10000 on armv7) and sets up the secondary CPUs' spin code; the stub only replaces how
    # the boot CPU enters.
    case "$machine:$arch" in
        virt:*) ram=0x40000000 load=$((0x40200000)) ;;
        *:aarch64) ram=0 load=$((0x200000)) ;;
        *:armv7) ram=0 load=$((0x10000)) ;;
    esac
    blob=$((ram + 0x8000000))
    ptr=$(( ${dtb_ptr:-$blob} ))
    entry=$((load - 0x1000))
    stub=$(mktemp "${TMPDIR:-/tmp}/dmakern-dtb-stub.XXXXXX")
    cleanup+=("$stub")
    lo=$((ptr & 0xffff)) hi=$(((ptr >> 16) & 0xffff)) klo=$((load & 0xffff)) khi=$(((load >> 16) & 0xffff))
    case "$arch" in
        aarch64)  # movz x0, lo; movk x0, hi, lsl 16; movz x1, klo; movk x1, khi, lsl 16; br x1
            words="$(( 0xd2800000 | lo << 5 )) $(( 0xf2a00000 | hi << 5 )) $(( 0xd2800001 | klo << 5 )) $(( 0xf2a00001 | khi << 5 )) $((0xd61f0020))" ;;
        armv7)    # movw r2, lo; movt r2, hi; movw r3, klo; movt r3, khi; bx r3
            mw() { echo $(( $1 | ($3 >> 12) << 16 | $2 << 12 | ($3 & 0xfff) )); }
            words="$(mw 0xe3000000 2 $lo) $(mw 0xe3400000 2 $hi) $(mw 0xe3000000 3 $klo) $(mw 0xe3400000 3 $khi) $((0xe12fff13))" ;;
    esac
    : > "$stub"
    for w in $words; do
        for shift in 0 8 16 24; do printf "\\$(printf %03o $(( (w >> shift) & 255 )))" >> "$stub"; done
    done
    if [ -n "$board_arch" ]; then
        args+=(-kernel "$img")
    else
        args+=(-device "loader,file=$img,addr=$load,force-raw=on")
    fi
    args+=(-device "loader,file=$stub,addr=$entry,force-raw=on,cpu-num=0")
    [ -n "$dtb_raw" ] && args+=(-device "loader,file=$dtb_raw,addr=$blob,force-raw=on")
else
    args+=(-kernel "$img")
fi
[ -n "$append" ] && args+=(-append "$append")
[ -n "$dtb" ] && args+=(-dtb "$dtb")
[ "$icount" = 1 ] && args+=(-icount shift=0,sleep=off)
if [ "$gdb" = 1 ]; then
    args+=(-s -S)
    case "$machine:$arch" in
        virt:aarch64) load=0x40200000 ;;
        virt:armv7) load=0x40010000 ;;
        *:aarch64) load=0x200000 ;;
        *:armv7) load=0x10000 ;;
    esac
    echo "qemu-run.sh: waiting for gdb on :1234. In another terminal:" >&2
    echo "  gdb-multiarch -ex 'target remote :1234' -ex 'add-symbol-file $elf -o $load'" >&2
    timeout=0
fi
args+=("${extra[@]}")

out=$(mktemp)
cleanup+=("$out")
set +e
if [ "$timeout" -gt 0 ]; then
    timeout -k 5 "$timeout" "$qemu" "${args[@]}" </dev/null | tee "$out"
else
    "$qemu" "${args[@]}" | tee "$out"
fi
status=${PIPESTATUS[0]}
set -e
[ -n "$log" ] && cp "$out" "$log"

if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "qemu-run.sh: TIMEOUT: no exit after ${timeout}s, QEMU killed" >&2
    exit 124
fi
summary=$(grep -aE '^dmakern: [0-9]+ passed, [0-9]+ failed, [0-9]+ skipped' "$out" | tail -n 1 | tr -d '\r' || true)
if [ -z "$summary" ]; then
    echo "qemu-run.sh: FAIL: no summary line from the kernel (QEMU exit status $status)" >&2
    exit $(( status == 0 ? 1 : status ))
fi
if [ "$status" != 0 ]; then
    echo "qemu-run.sh: FAIL: kernel exit status $status ($summary)" >&2
    exit "$status"
fi
case "$summary" in
    *" 0 failed,"*) exit 0 ;;
    *) echo "qemu-run.sh: FAIL: $summary" >&2; exit 1 ;;
esac
