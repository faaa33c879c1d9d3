#!/usr/bin/env bash
# Build sdcard.img for a Raspberry Pi 2, 3 or 4: an MBR with one FAT32 partition holding the Pi
# firmware, the upstream device trees (both from Debian's packages, via fetch-debian.sh), config.txt,
# cmdline.txt and dmakern's kernel8.img (aarch64) and kernel7.img (armv7). No root, no mounts: the
# partition table is written by sfdisk and the file system by mtools, both on the image file.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

usage() {
    cat <<'USAGE'
Usage: tests/hil/sdcard.sh [-o FILE] [--bootargs "ARGS"] [--chainload] [--config FILE]
                           [--overlays DIR] [--no-build]

Build a Raspberry Pi SD card image (default ./sdcard.img): MBR, one FAT32 partition (type 0x0c, LBA)
from 1 MiB to 64 MiB with
  bootcode.bin start*.elf fixup*.dat   Pi firmware (Debian raspi-firmware, non-free-firmware)
  *.dtb                                upstream device trees (Debian's arm64 and armmp kernels)
  kernel8.img kernel7.img              dmakern for aarch64 (Pi 3, 4) and armv7 (Pi 2)
  config.txt                           tests/hil/config.txt (or --config)
  cmdline.txt                          the bootargs; the firmware puts them in /chosen/bootargs

Options:
  -o, --output FILE   where to write the image (default ./sdcard.img)
  --bootargs "ARGS"   kernel command line for cmdline.txt (default: dma_debug=on)
  --chainload         put the serial chain loader (tests/hil/chainload) in place of the kernels
                      (chainload8.img as kernel8.img, chainload7.img as kernel7.img when it is
                      built): the host then sends the kernel over the UART
  --config FILE       use FILE as config.txt
  --overlays DIR      copy DIR/*.dtbo to overlays/ (from raspberrypi/firmware's boot/overlays;
                      Debian has none), for the dtoverlay= lines of config.txt
  --no-build          use the kernel images built last time (target/kernel/dmakern-*.img)
  --help              this text

Exit status: 0 on success, 77 when a prerequisite is missing (a tool, or the firmware cannot be
fetched; the last line on stderr says which), 2 on a usage error, 1 otherwise.
USAGE
}

output=sdcard.img bootargs="dma_debug=on" chainload=0 config=$here/config.txt overlays="" build=1
while [ $# -gt 0 ]; do
    case "$1" in
        -o|--output) output=${2:?$1 needs a file}; shift 2 ;;
        --bootargs) bootargs=${2?--bootargs needs a value}; shift 2 ;;
        --chainload) chainload=1; shift ;;
        --config) config=${2:?--config needs a file}; shift 2 ;;
        --overlays) overlays=${2:?--overlays needs a directory}; shift 2 ;;
        --no-build) build=0; shift ;;
        --help|-h) usage; exit 0 ;;
        *) echo "sdcard.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$bootargs" in *$'\n'*|*$'\r'*) echo "sdcard.sh: --bootargs must be a single line" >&2; exit 2 ;; esac
[ -r "$config" ] || { echo "sdcard.sh: cannot read the config file '$config'" >&2; exit 2; }
if [ -n "$overlays" ] && ! compgen -G "$overlays/*.dtbo" >/dev/null; then
    echo "sdcard.sh: no .dtbo files in '$overlays'" >&2; exit 2
fi

# sfdisk lives in /usr/sbin, which a normal user's PATH often lacks.
PATH=$PATH:/usr/sbin:/sbin
missing() {
    echo "sdcard.sh: $*" >&2
    exit 77
}
for t in truncate:coreutils sfdisk:fdisk mformat:mtools mcopy:mtools mmd:mtools; do
    command -v "${t%%:*}" >/dev/null 2>&1 ||
        missing "'${t%%:*}' is not installed (Debian package ${t#*:}: apt-get install ${t#*:})"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Firmware and device trees: from the cache, fetched on first use.
set +e
fetched=$("$here/fetch-debian.sh" 2>"$work/fetch.log")
status=$?
set -e
cat "$work/fetch.log" >&2
case "$status" in
    0) ;;
    77) missing "no Raspberry Pi firmware: $(tail -n 1 "$work/fetch.log")" ;;
    *) echo "sdcard.sh: fetch-debian.sh failed (status $status)" >&2; exit 1 ;;
esac
fw_dir=$(sed -n 's/^firmware_dir=//p' <<<"$fetched")
dtb_dir=$(sed -n 's/^dtb_dir=//p' <<<"$fetched")

# The kernels (or the chain loader) go on the card as kernel8.img and kernel7.img.
if [ "$build" = 1 ]; then
    "$root/qemu-run.sh" --build-only >&2
    "$root/qemu-run.sh" --build-only --arch armv7 >&2
fi
kernel8=$root/target/kernel/dmakern-aarch64.img kernel7=$root/target/kernel/dmakern-armv7.img
if [ "$chainload" = 1 ]; then
    loader_dir=$root/target/sdcard/chainload
    [ -x "$here/chainload/build.sh" ] || { echo "sdcard.sh: --chainload needs tests/hil/chainload/build.sh" >&2; exit 1; }
    rm -f "$loader_dir/chainload8.img" "$loader_dir/chainload7.img"
    "$here/chainload/build.sh" "$loader_dir" >/dev/null
    kernel8=$loader_dir/chainload8.img
    if [ -s "$loader_dir/chainload7.img" ]; then
        kernel7=$loader_dir/chainload7.img
    else
        echo "sdcard.sh: no armv7 chain loader was built: kernel7.img is dmakern itself (a Pi 2 boots it directly)" >&2
    fi
fi
for k in "$kernel8" "$kernel7"; do
    [ -s "$k" ] || { echo "sdcard.sh: no image at $k (run without --no-build)" >&2; exit 1; }
done

# Layout: 64 MiB image, the partition from sector 2048 (1 MiB, the usual SD erase-block alignment) to
# the end. FAT32 needs at least 65525 clusters: 63 MiB in 512-byte clusters gives about 127000.
readonly SECTOR=512 START=2048 SIZE_MIB=64
total=$((SIZE_MIB * 1024 * 1024 / SECTOR))
part_sectors=$((total - START))

img=$work/sdcard.img
truncate -s "${SIZE_MIB}M" "$img"
# A fixed disk identifier and volume serial keep the image the same from build to build.
printf 'label: dos\nlabel-id: 0x646d6b6e\nunit: sectors\nstart=%d, size=%d, type=c\n' "$START" "$part_sectors" |
    sfdisk --quiet --no-reread --no-tell-kernel "$img" >/dev/null

# mtools addresses the partition as IMAGE@@OFFSET; the geometry check is for real floppies.
export MTOOLS_SKIP_CHECK=1 MTOOLSRC=/dev/null
fat="$img@@$((START * SECTOR))"
mformat -i "$fat" -F -T "$part_sectors" -H "$START" -h 64 -s 32 -N 646d6b6e -v DMAKERN ::

printf '%s\n' "$bootargs" > "$work/cmdline.txt"
cp "$config" "$work/config.txt"
cp "$kernel8" "$work/kernel8.img"
cp "$kernel7" "$work/kernel7.img"
mcopy -i "$fat" -m "$fw_dir"/bootcode.bin "$fw_dir"/start*.elf "$fw_dir"/fixup*.dat "$fw_dir"/LICENCE.broadcom \
    "$dtb_dir"/*.dtb "$work/config.txt" "$work/cmdline.txt" "$work/kernel8.img" "$work/kernel7.img" ::
if [ -n "$overlays" ]; then
    mmd -i "$fat" ::overlays
    mcopy -i "$fat" -m "$overlays"/*.dtbo ::overlays/
fi

mv -f "$img" "$output"
echo "sdcard.sh: wrote $output (${SIZE_MIB} MiB; FAT32 partition at sector $START;" \
     "kernel8.img $(stat -c %s "$kernel8") bytes, kernel7.img $(stat -c %s "$kernel7") bytes; bootargs: $bootargs)" >&2
echo "sdcard.sh: flash it with: dd if=$output of=/dev/sdX bs=4M conv=fsync   (sdX = the card, see lsblk)" >&2
