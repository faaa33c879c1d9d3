//! The contents of the disk images the block-device test suites use (virtio-mmio in
//! `drivers::virtio`, virtio-pci in this module's suite): the host test harness (tests/dma.rs)
//! writes a 2 MiB image holding [`image_byte`], the kernel checks the first MiB, writes
//! [`written_byte`] over the second, and the harness checks the file afterwards. tests/dma.rs has
//! its own copy of both functions (it is a separate crate); they must stay identical.

/// The byte the test image holds at `pos` before the run.
pub fn image_byte(pos: u64) -> u8 {
    let sector = pos / 512;
    ((sector.wrapping_mul(31) ^ (pos % 512).wrapping_mul(7)) as u8) ^ 0x5a
}

/// The byte the kernel writes at `pos` of the second MiB (`pos` counted from the start of that
/// MiB).
pub fn written_byte(pos: u64) -> u8 {
    ((pos.wrapping_mul(13) >> 3) as u8) ^ 0xa5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_by_hand() {
        // Sector 0: byte i is (7 i mod 256) ^ 0x5a.
        assert_eq!(image_byte(0), 0x5a);
        assert_eq!(image_byte(1), 0x07 ^ 0x5a);
        assert_eq!(image_byte(511), (511u32 * 7 % 256) as u8 ^ 0x5a);
        // Sector 1, byte 0: 31 ^ 0 ^ 0x5a; sector 9, byte 2: (279 ^ 14) mod 256 ^ 0x5a.
        assert_eq!(image_byte(512), 31 ^ 0x5a);
        assert_eq!(image_byte(9 * 512 + 2), ((279u32 ^ 14) % 256) as u8 ^ 0x5a);
        // 13 * 8 >> 3 = 13; 13 * 100 >> 3 = 162.
        assert_eq!(written_byte(0), 0xa5);
        assert_eq!(written_byte(8), 13 ^ 0xa5);
        assert_eq!(written_byte(100), 162 ^ 0xa5);
        // Neither pattern repeats with a period that would hide a misplaced sector.
        assert_ne!((0..512).map(image_byte).collect::<Vec<_>>(), (512..1024).map(image_byte).collect::<Vec<_>>());
        assert_ne!((0..512).map(written_byte).collect::<Vec<_>>(), (512..1024).map(written_byte).collect::<Vec<_>>());
    }
}
