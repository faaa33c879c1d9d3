//! The Raspberry Pi SD card image (tests/hil/sdcard.sh): built with the one command, then read back
//! without mounting anything. The partition table and the FAT32 boot sector are decoded here from the
//! image's bytes; the file system is listed and read with mtools and checked with `fsck.vfat -n`.
//! Every file is compared byte for byte with its source: the kernels just built, the firmware and the
//! device trees in fetch-debian.sh's cache, tests/hil/config.txt, the bootargs given.
//!
//! A test skips (passes, saying why) only when the script reports a missing prerequisite (status
//! 77): the Debian firmware cannot be fetched (no network, no apt) or mtools/fdisk are not installed.
//! CI installs them (.ci/run), so there it really runs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SECTOR: usize = 512;
const PART_START: usize = 2048;
const IMAGE_BYTES: usize = 64 << 20;
/// The smallest cluster count of a FAT32 file system (Microsoft's FAT specification): below it,
/// drivers take the volume for FAT16 whatever the boot sector says.
const FAT32_MIN_CLUSTERS: usize = 65525;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn last_line(b: &[u8]) -> String {
    text(b).lines().last().unwrap_or("").to_string()
}

/// Run tests/hil/sdcard.sh with `args`, writing `name`.img; `None` (after printing why) when a
/// prerequisite is missing.
fn build(name: &str, args: &[&str]) -> Option<PathBuf> {
    let img = out_dir().join(format!("{name}.img"));
    let out = Command::new(root().join("tests/hil/sdcard.sh"))
        .arg("-o")
        .arg(&img)
        .args(args)
        .current_dir(root())
        .output()
        .expect("run tests/hil/sdcard.sh");
    if out.status.code() == Some(77) {
        println!("SKIP {name}: {}", last_line(&out.stderr));
        return None;
    }
    assert!(out.status.success(), "sdcard.sh {args:?} failed ({}):\n{}", out.status, text(&out.stderr));
    Some(img)
}

/// Where fetch-debian.sh keeps the firmware and the device trees (the cache sdcard.sh just filled).
fn fetched_dirs() -> (PathBuf, PathBuf) {
    let out = Command::new(root().join("tests/hil/fetch-debian.sh")).output().expect("run fetch-debian.sh");
    assert!(out.status.success(), "fetch-debian.sh failed after sdcard.sh succeeded:\n{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("fetch-debian.sh printed no {key} line:\n{stdout}"))
    };
    (field("firmware_dir="), field("dtb_dir="))
}

fn le16(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes([b[at], b[at + 1]]) as usize
}

fn le32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// mtools on the FAT partition of `img`.
fn mtool(tool: &str, img: &Path, args: &[&str]) -> Output {
    let fat = format!("{}@@{}", img.display(), PART_START * SECTOR);
    let out = Command::new(tool)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("MTOOLSRC", "/dev/null")
        .arg("-i")
        .arg(&fat)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool} (mtools): {e}"));
    assert!(out.status.success(), "{tool} -i {fat} {args:?}: {}", text(&out.stderr));
    out
}

/// The root directory's file names, from `mdir -b` (one `::/NAME` per line).
fn listing(img: &Path) -> BTreeSet<String> {
    let out = mtool("mdir", img, &["-b", "::"]);
    text(&out.stdout).lines().map(|l| l.trim_start_matches("::/").to_string()).collect()
}

fn read_file(img: &Path, name: &str) -> Vec<u8> {
    mtool("mtype", img, &[&format!("::{name}")]).stdout
}

fn files_in(dir: &Path, keep: impl Fn(&str) -> bool) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| keep(n))
        .collect()
}

/// The settings config.txt gives a board, evaluated as the firmware does: lines apply in order,
/// a `[filter]` line starts a section that applies only to boards the filter names (`all`: every
/// board), later settings override earlier ones, `#` starts a comment.
fn effective(config: &str, board_filters: &[&str]) -> Vec<(String, String)> {
    let mut active = true;
    let mut settings: Vec<(String, String)> = Vec::new();
    for line in config.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(filter) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            active = filter == "all" || board_filters.contains(&filter);
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("config.txt line without '=': {line}"));
        if active {
            settings.retain(|(k, _)| k != key);
            settings.push((key.to_string(), value.to_string()));
        }
    }
    settings
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[test]
fn card_image_layout_and_contents() {
    let bootargs = "dma_debug=on cma=96M";
    let Some(img) = build("sdcard-plain", &["--bootargs", bootargs]) else { return };
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len(), IMAGE_BYTES, "image size");

    // MBR: signature, disk identifier, one primary partition, the other three entries empty.
    assert_eq!(&bytes[510..512], &[0x55, 0xaa], "MBR boot signature");
    assert_eq!(le32(&bytes, 440), 0x646d_6b6e, "disk identifier (fixed, for reproducible images)");
    let entry = &bytes[446..462];
    let part_sectors = IMAGE_BYTES / SECTOR - PART_START;
    assert_eq!(entry[0], 0x00, "partition status (the Pi firmware ignores the boot flag)");
    assert_eq!(entry[4], 0x0c, "partition type: FAT32 with LBA addressing");
    assert_eq!(le32(entry, 8), PART_START, "partition start (LBA)");
    assert_eq!(le32(entry, 12), part_sectors, "partition size in sectors: to the end of the image");
    assert!(bytes[462..510].iter().all(|&b| b == 0), "partition entries 2-4 must be empty");

    // The FAT32 boot sector at the partition's start.
    let bs = &bytes[PART_START * SECTOR..(PART_START + 1) * SECTOR];
    assert!(bs[0] == 0xeb || bs[0] == 0xe9, "boot sector jump instruction: {:#x}", bs[0]);
    assert_eq!(le16(bs, 11), SECTOR, "bytes per sector");
    let per_cluster = bs[13] as usize;
    let reserved = le16(bs, 14);
    let fats = bs[16] as usize;
    assert!(per_cluster.is_power_of_two(), "sectors per cluster {per_cluster}");
    assert_eq!(fats, 2, "number of FATs");
    assert_eq!(le16(bs, 17), 0, "root entries (0 on FAT32)");
    assert_eq!(le16(bs, 19), 0, "16-bit sector count (0 on FAT32)");
    assert_eq!(le16(bs, 22), 0, "16-bit FAT size (0 on FAT32)");
    assert_eq!(le32(bs, 28), PART_START, "hidden sectors = the partition's start");
    assert_eq!(le32(bs, 32), part_sectors, "file system size = the partition's size");
    assert_eq!(&bs[82..90], b"FAT32   ", "file system type string");
    assert_eq!(&bs[510..512], &[0x55, 0xaa], "boot sector signature");
    let fat_sectors = le32(bs, 36);
    let clusters = (part_sectors - reserved - fats * fat_sectors) / per_cluster;
    assert!(clusters >= FAT32_MIN_CLUSTERS, "{clusters} clusters: too few for FAT32");

    // The files: exactly the firmware, the device trees, the kernels and the two text files.
    let (fw_dir, dtb_dir) = fetched_dirs();
    let firmware = files_in(&fw_dir, |n| {
        n == "bootcode.bin"
            || n == "LICENCE.broadcom"
            || (n.starts_with("start") && n.ends_with(".elf"))
            || (n.starts_with("fixup") && n.ends_with(".dat"))
    });
    let dtbs = files_in(&dtb_dir, |n| n.ends_with(".dtb"));
    let mut expected: BTreeSet<String> = firmware.union(&dtbs).cloned().collect();
    expected.extend(["kernel8.img", "kernel7.img", "config.txt", "cmdline.txt"].map(String::from));
    let on_card = listing(&img);
    assert_eq!(on_card, expected, "files on the card");
    let essential = ["bootcode.bin", "start.elf", "fixup.dat", "start4.elf", "fixup4.dat"];
    for must in essential.into_iter().chain(["bcm2836-rpi-2-b.dtb", "bcm2837-rpi-3-b.dtb", "bcm2711-rpi-4-b.dtb"]) {
        assert!(on_card.contains(must), "{must} missing from the card: {on_card:?}");
    }
    for name in &firmware {
        assert_eq!(read_file(&img, name), std::fs::read(fw_dir.join(name)).unwrap(), "{name} differs from raspi-firmware's");
    }
    for name in &dtbs {
        assert_eq!(read_file(&img, name), std::fs::read(dtb_dir.join(name)).unwrap(), "{name} differs from Debian's");
    }
    for (name, built) in [("kernel8.img", "dmakern-aarch64.img"), ("kernel7.img", "dmakern-armv7.img")] {
        let want = std::fs::read(root().join("target/kernel").join(built)).unwrap();
        let got = read_file(&img, name);
        assert_eq!(got.len(), want.len(), "{name}: size differs from target/kernel/{built}");
        assert!(got == want, "{name}: contents differ from target/kernel/{built}");
    }

    // cmdline.txt: the bootargs on one line (the firmware puts it in /chosen/bootargs).
    assert_eq!(text(&read_file(&img, "cmdline.txt")), format!("{bootargs}\n"));

    // config.txt: the template as it is, and what it makes the firmware do on each board.
    let config = text(&read_file(&img, "config.txt"));
    assert_eq!(config, std::fs::read_to_string(root().join("tests/hil/config.txt")).unwrap());
    let boards = [("Pi 2", ["pi2"], "0", "kernel7.img"), ("Pi 3", ["pi3"], "1", "kernel8.img"), ("Pi 4", ["pi4"], "1", "kernel8.img")];
    for (board, filters, bits, kernel) in boards {
        let s = effective(&config, &filters);
        assert_eq!(setting(&s, "arm_64bit"), Some(bits), "{board}: arm_64bit");
        assert_eq!(setting(&s, "kernel"), Some(kernel), "{board}: kernel");
        assert_eq!(setting(&s, "enable_uart"), Some("1"), "{board}: enable_uart");
        assert_eq!(setting(&s, "upstream_kernel"), Some("1"), "{board}: upstream_kernel (picks Debian's DTB names)");
        assert_eq!(setting(&s, "dtoverlay"), None, "{board}: no overlay is active (none is on the card)");
    }
    let commented: Vec<&str> = config.lines().filter_map(|l| l.strip_prefix('#')).collect();
    for line in ["dtoverlay=cma,cma-128", "dtoverlay=cma,cma-256", "dtoverlay=disable-bt"] {
        assert!(commented.contains(&line), "config.txt lacks the commented option `#{line}`");
    }

    // The file system as dosfstools' checker sees it, read-only.
    let part = out_dir().join("sdcard-plain.part");
    std::fs::write(&part, &bytes[PART_START * SECTOR..]).unwrap();
    // In /usr/sbin, which a normal user's PATH often lacks.
    let fsck = ["/usr/sbin/fsck.vfat", "/sbin/fsck.vfat"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("fsck.vfat");
    match Command::new(fsck).arg("-n").arg(&part).output() {
        Ok(out) => assert!(out.status.success(), "fsck.vfat -n: {}{}", text(&out.stdout), text(&out.stderr)),
        Err(_) => println!("note: fsck.vfat is not installed (Debian package dosfstools): file system check not run"),
    }
    let _ = std::fs::remove_file(&part);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn chainload_card_carries_the_loader() {
    let Some(img) = build("sdcard-chainload", &["--chainload"]) else { return };
    let loader_dir = root().join("target/sdcard/chainload");
    let loader = std::fs::read(loader_dir.join("chainload8.img")).unwrap();
    assert_eq!(read_file(&img, "kernel8.img"), loader, "kernel8.img must be the aarch64 chain loader");
    let seven = match std::fs::read(loader_dir.join("chainload7.img")) {
        Ok(loader7) => loader7,
        Err(_) => std::fs::read(root().join("target/kernel/dmakern-armv7.img")).unwrap(),
    };
    assert_eq!(read_file(&img, "kernel7.img"), seven, "kernel7.img: the armv7 loader if built, else the armv7 kernel");
    assert!(listing(&img).contains("bootcode.bin"));
    let _ = std::fs::remove_file(&img);
}

#[test]
fn bad_options_are_refused_before_any_work() {
    let empty = out_dir().join("sdcard-no-overlays");
    std::fs::create_dir_all(&empty).unwrap();
    let empty = empty.display().to_string();
    for (args, says) in [
        (vec!["--bootargs", "a\nb"], "single line"),
        (vec!["--frobnicate"], "unknown option"),
        (vec!["--overlays", &empty], "no .dtbo files"),
        (vec!["--config", "/nonexistent/config.txt"], "cannot read the config file"),
    ] {
        let out = Command::new(root().join("tests/hil/sdcard.sh")).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{args:?}: expected `{says}` in: {}", text(&out.stderr));
    }
}

#[test]
fn a_missing_tool_is_named_with_its_package() {
    // A PATH with the shell and the tools checked before mtools, but no mtools.
    let bin = out_dir().join("sdcard-path-without-mtools");
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    let mut have_sfdisk = false;
    for tool in ["bash", "dirname", "truncate", "sfdisk"] {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let found = std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file());
        if let Some(path) = found {
            std::os::unix::fs::symlink(&path, bin.join(tool)).unwrap();
            have_sfdisk |= tool == "sfdisk";
        }
    }
    let out = Command::new(root().join("tests/hil/sdcard.sh"))
        .env("PATH", &bin)
        .arg("-o")
        .arg(out_dir().join("never.img"))
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("is not installed (Debian package"), "{err}");
    if have_sfdisk {
        assert!(err.contains("'mformat' is not installed (Debian package mtools"), "{err}");
    }
    assert!(!out_dir().join("never.img").exists());
}
