#!/usr/bin/env bash
# Fetch the Raspberry Pi boot firmware and the upstream Raspberry Pi device trees from Debian 12's
# packages into a cache outside the repository, with `apt-get download` under a private APT
# configuration: no root, nothing installed, no foreign architecture added to the host.
#
# Used by tests/hil/sdcard.sh (SD card image) and by the QEMU matrix (real DTBs). A second run finds
# everything in the cache and touches no network.
set -euo pipefail

# Exit status when the files cannot be had (no apt, no network, a package gone from the mirror):
# callers skip their tests with the one-line reason printed last on stderr. 77 is the "skipped"
# status of automake's test harness.
readonly EXIT_UNAVAILABLE=77

usage() {
    cat <<'USAGE'
Usage: tests/hil/fetch-debian.sh [--refresh] [--help]

Fetch into the cache ${DMAKERN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dmakern}/debian:
  firmware/  bootcode.bin, start*.elf, fixup*.dat and LICENCE.broadcom from raspi-firmware
             (bookworm non-free-firmware)
  dtbs/      the upstream Raspberry Pi DTBs of the arm64 kernel (bcm2837-rpi-3-b.dtb,
             bcm2711-rpi-4-b.dtb, ...) and bcm2836-rpi-2-b.dtb from the armmp kernel
  packages.txt  the package versions they came from

On success prints two lines on stdout, for scripts:
  firmware_dir=DIR
  dtb_dir=DIR
Exit status: 0 on success (from the cache or freshly fetched), 77 when the files cannot be fetched
(no apt-get, no network, ...; the last line on stderr says why), 2 on a usage error, 1 otherwise.

  --refresh   fetch again even when the cache is complete (e.g. after a Debian point release)

The mirrors are the host's (/etc/apt/sources.list.d/debian.sources), else deb.debian.org;
DMAKERN_DEBIAN_MIRROR and DMAKERN_DEBIAN_SECURITY_MIRROR override them.
USAGE
}

refresh=0
while [ $# -gt 0 ]; do
    case "$1" in
        --refresh) refresh=1; shift ;;
        --help|-h) usage; exit 0 ;;
        *) echo "fetch-debian.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

unavailable() {
    echo "fetch-debian.sh: cannot fetch the Debian Raspberry Pi files: $*" >&2
    exit "$EXIT_UNAVAILABLE"
}

cache=${DMAKERN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dmakern}/debian
fw_dir=$cache/firmware
dtb_dir=$cache/dtbs
# The files the users of the cache rely on; the cache counts as complete when all are there.
required=("$fw_dir/bootcode.bin" "$fw_dir/start.elf" "$fw_dir/fixup.dat" "$fw_dir/start4.elf"
          "$fw_dir/fixup4.dat" "$dtb_dir/bcm2837-rpi-3-b.dtb" "$dtb_dir/bcm2711-rpi-4-b.dtb"
          "$dtb_dir/bcm2836-rpi-2-b.dtb" "$cache/packages.txt")

complete() {
    local f
    for f in "${required[@]}"; do [ -s "$f" ] || return 1; done
}

report() {
    echo "firmware_dir=$fw_dir"
    echo "dtb_dir=$dtb_dir"
}

mkdir -p "$cache" || unavailable "cannot create the cache directory $cache"
# Several tests may call this at once: one fetches, the others wait and then find the cache full.
exec 9>"$cache/.lock"
flock 9

if [ "$refresh" = 0 ] && complete; then
    echo "fetch-debian.sh: using the cache $cache ($(paste -sd " " "$cache/packages.txt"))" >&2
    report
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb tar; do
    command -v "$tool" >/dev/null 2>&1 || unavailable "'$tool' is not installed (needs a Debian-based host)"
done
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || unavailable "$keyring is missing (apt-get install debian-archive-keyring)"

# The host's mirrors (deb822 sources as on Debian 12), else Debian's CDN.
mirror_for() {
    local suite=$1 default=$2 file=/etc/apt/sources.list.d/debian.sources
    [ -r "$file" ] || { echo "$default"; return; }
    awk -v suite="$suite" -v def="$default" '
        /^URIs:/ { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite && uri != "" && !found) found = uri }
        /^$/ { uri = "" }
        END { print (found != "" ? found : def) }' "$file"
}
main_uri=${DMAKERN_DEBIAN_MIRROR:-$(mirror_for bookworm http://deb.debian.org/debian)}
security_uri=${DMAKERN_DEBIAN_SECURITY_MIRROR:-$(mirror_for bookworm-security http://deb.debian.org/debian-security)}

# A private APT: its own sources, lists, cache and (empty) status, none of the host's apt.conf.d
# hooks (appstream, packagekit), only the two ARM architectures the files are built for.
apt=$cache/apt
work=""
# The indexes (~150 MB with APT's caches) are only needed while fetching.
trap 'rm -rf "$apt" ${work:+"$work"}' EXIT
rm -rf "$apt"
mkdir -p "$apt/etc/apt.conf.d" "$apt/etc/sources.list.d" "$apt/etc/preferences.d" \
         "$apt/etc/trusted.gpg.d" "$apt/state/lists/partial" "$apt/cache/archives/partial"
: > "$apt/state/status"
opts="arch=arm64,armhf signed-by=$keyring"
components="main non-free-firmware"
cat > "$apt/etc/sources.list" <<EOF
deb [$opts] $main_uri bookworm $components
deb [$opts] $main_uri bookworm-updates $components
deb [$opts] $security_uri bookworm-security $components
deb [$opts] $main_uri bookworm-backports $components
EOF
{
    echo "Dir::Etc \"$apt/etc\";"
    echo "Dir::Etc::Parts \"$apt/etc/apt.conf.d\";"
    echo "Dir::State \"$apt/state\";"
    echo "Dir::State::status \"$apt/state/status\";"
    echo "Dir::Cache \"$apt/cache\";"
    echo 'APT::Architecture "arm64";'
    echo 'APT::Architectures { "arm64"; "armhf"; };'
    echo 'Acquire::Languages "none";'
    echo 'Acquire::PDiffs "false";'
    echo 'Acquire::GzipIndexes "true";'
    echo 'Acquire::Retries "2";'
    # The host's proxy settings still apply (its apt.conf.d is not read).
    apt-config dump 2>/dev/null | grep -E '^Acquire::(https?|ftp)::Proxy' || true
} > "$apt/apt.conf"
export APT_CONFIG=$apt/apt.conf

# The most telling line of an apt-get run's output: an error, else a warning (an unreachable mirror
# only warns), else an "Err:" item with its indented cause.
first_error() {
    printf '%s\n' "$1" | awk '
        /^E:/ && e == "" { e = $0 }
        /^W:/ && w == "" { w = $0 }
        err_next { err = err " -" $0; err_next = 0 }
        /^Err:/ && err == "" { err = $0; err_next = 1 }
        END { print (e != "" ? e : w != "" ? w : err) }' | tr -s ' '
}

echo "fetch-debian.sh: apt-get update ($main_uri, $security_uri)" >&2
# A mirror in the middle of a sync serves a stale index now and then: try twice. An index still
# missing after that only matters if a wanted package is in it, which the look-ups below notice.
update_error=""
for attempt in 1 2; do
    # apt-get update exits 0 when a mirror cannot be reached at all (it only warns): judge by
    # the messages.
    log=$(apt-get -q update 2>&1) || true
    update_error=$(first_error "$log")
    [ -n "$update_error" ] || break
    echo "fetch-debian.sh: apt-get update (attempt $attempt): ${update_error:-failed}" >&2
done
[ -n "$(find "$apt/state/lists" -maxdepth 1 -name '*_Packages*' -print -quit)" ] ||
    unavailable "apt-get update fetched no package index: ${update_error:-see apt-get update}"

# The current kernels, whatever their ABI number: what the metapackages depend on.
kernel_of() {
    local meta=$1 dep
    dep=$(apt-cache depends "$meta" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | sed -n 1p)
    [ -n "$dep" ] || unavailable "no candidate for $meta in the bookworm archive${update_error:+ ($update_error)}"
    echo "$dep"
}
kernel_arm64=$(kernel_of linux-image-arm64:arm64)
kernel_armhf=$(kernel_of linux-image-armmp:armhf)
packages=(raspi-firmware:arm64 "$kernel_arm64" "$kernel_armhf")

work=$(mktemp -d "$cache/work.XXXXXX")
echo "fetch-debian.sh: apt-get download ${packages[*]}" >&2
if ! log=$(cd "$work" && apt-get -q download "${packages[@]}" 2>&1); then
    reason=$(first_error "$log")
    unavailable "apt-get download failed: ${reason:-see apt-get output}${update_error:+ ($update_error)}"
fi

# Unpack only the wanted members of each package's data archive, then drop the .deb.
unpack() {
    local deb=$1; shift
    mkdir -p "$work/x"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/x" --wildcards "$@"
    rm -f "$deb"
}
versions=()
for deb in "$work"/*.deb; do
    name=$(dpkg-deb -f "$deb" Package)
    versions+=("$name=$(dpkg-deb -f "$deb" Version)")
    case "$name" in
        raspi-firmware)
            unpack "$deb" './usr/lib/raspi-firmware/*' './usr/share/doc/raspi-firmware/copyright' ;;
        *-armmp)
            unpack "$deb" './usr/lib/linux-image-*/bcm2836-rpi-2-b.dtb' ;;
        *)
            unpack "$deb" './usr/lib/linux-image-*/broadcom/bcm2*-rpi-*.dtb' ;;
    esac
done

# Replace the cache's contents only once everything is unpacked.
mkdir -p "$work/firmware" "$work/dtbs"
find "$work/x/usr/lib/raspi-firmware" -maxdepth 1 -type f \
    \( -name 'bootcode.bin' -o -name 'start*.elf' -o -name 'fixup*.dat' \) -exec mv -t "$work/firmware" {} +
mv "$work/x/usr/share/doc/raspi-firmware/copyright" "$work/firmware/LICENCE.broadcom"
find "$work/x/usr/lib" -name '*.dtb' -exec mv -t "$work/dtbs" {} +
printf '%s\n' "${versions[@]}" > "$work/packages.txt"
rm -rf "$fw_dir" "$dtb_dir"
mv "$work/firmware" "$fw_dir"
mv "$work/dtbs" "$dtb_dir"
mv "$work/packages.txt" "$cache/packages.txt"
complete || { echo "fetch-debian.sh: the packages lacked some expected files (see ${required[*]})" >&2; exit 1; }
echo "fetch-debian.sh: fetched ${versions[*]} into $cache" >&2
report
