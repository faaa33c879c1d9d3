#!/usr/bin/env bash
# Build the serial chain loader: tests/hil/chainload/build.sh OUTDIR
# writes OUTDIR/chainload8.img (aarch64 raw image with an arm64 Image header: kernel8.img on a Pi 3/4
# SD card, or QEMU raspi3b -kernel) and OUTDIR/probe8.img (a test payload for tests/hil.rs, see
# src/probe.rs), and the same for armv7 as chainload7.img (kernel7.img on a Pi 2/3, QEMU raspi2b)
# and probe7.img. Prints the aarch64 loader's path on stdout.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$here"

tools="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin"
unset CARGO_ENCODED_RUSTFLAGS
export CARGO_TARGET_DIR="${CHAINLOAD_TARGET_DIR:-$here/../../../target/chainload}"

# build TARGET LINKER_SCRIPT RELOCATION SUFFIX: the loader and the probe for one architecture.
build() {
    local target=$1 script=$2 reloc=$3 suffix=$4 bin elf img
    # Its own flags: RUSTFLAGS replaces the kernel's [target.*] rustflags that cargo would
    # otherwise pick up from the parent directory's .cargo/config.toml. PIE linked at 0 (the entry
    # assembly applies the relative relocations); strict alignment, because with the MMU off every
    # access is to device (strongly-ordered) memory, where unaligned accesses fault.
    RUSTFLAGS="-C relocation-model=pie -C link-arg=--pie -C link-arg=-T$here/$script -C link-arg=-znotext $5" \
        cargo build --release --target "$target" --bins >&2
    for bin in chainload probe; do
        elf="$CARGO_TARGET_DIR/$target/release/$bin"
        # Only relative relocations can be applied at entry; refuse an image that needs others.
        if "$tools/llvm-readobj" --relocations "$elf" | grep -E '^\s+0x' | grep -v "$reloc" >&2; then
            echo "build.sh: $bin ($target) has relocations other than $reloc" >&2
            exit 1
        fi
        img="$out/$bin$suffix.img"
        "$tools/llvm-objcopy" -O binary "$elf" "$img.tmp.$$"
        mv -f "$img.tmp.$$" "$img"
        echo "build.sh: $img: $(stat -c %s "$img") bytes" >&2
    done
}

# aarch64-unknown-none-softfloat implies strict alignment already.
build aarch64-unknown-none-softfloat aarch64.ld R_AARCH64_RELATIVE 8 ""
build armv7a-none-eabi armv7.ld R_ARM_RELATIVE 7 "-C target-feature=+strict-align"
echo "$out/chainload8.img"
