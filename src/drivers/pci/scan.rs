//! Finding the functions on a bus, sizing their BARs, and programming the assigned addresses.
//!
//! BAR sizing is the standard dance (PCI Local Bus 3.0, section 6.2.5.1): write all-ones, read
//! back, restore. The bits that stay zero below the lowest one are the size; the low bits are
//! read-only flags (bit 0: I/O; for memory, bits 2:1 the type and bit 3 prefetchable). The
//! lowest writable address bit is the size even when the upper bits do not all stick (an I/O BAR
//! that decodes only 16 bits reads back zeros in bits 31:16), as in Linux's `pci_size`.

use alloc::vec::Vec;

use super::{
    BarInfo, Bdf, ConfigSpace, IntxPin, PciDevice, PciError, Space, COMMAND_BUS_MASTER, COMMAND_IO,
    COMMAND_MEMORY, REG_BAR0, REG_CLASS, REG_COMMAND, REG_HEADER, REG_ID, REG_INTERRUPT,
};

/// Header Type bit 7: the device implements functions other than 0.
const HEADER_MULTIFUNCTION: u8 = 0x80;
/// BAR bit 0: I/O space.
const BAR_IO: u32 = 1 << 0;
/// Memory BAR bit 3: prefetchable.
const BAR_PREFETCHABLE: u32 = 1 << 3;
/// The flag bits of an I/O and of a memory BAR.
const BAR_IO_FLAGS: u32 = 0x3;
const BAR_MEM_FLAGS: u32 = 0xf;

/// A function as found on the bus, before its BARs are assigned.
pub(super) struct Found {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub revision: u8,
    pub header_type: u8,
    pub irq_pin: Option<IntxPin>,
    pub bars: [Option<BarInfo>; 6],
}

/// Every function on `bus`, in device/function order, with its BARs sized. Functions 1..8 are
/// looked at only when function 0 exists and sets the multi-function bit (a single-function
/// device may decode all eight function numbers as itself).
pub(super) fn scan_bus<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    bus: u8,
) -> Result<Vec<Found>, PciError> {
    let mut found = Vec::new();
    for bdf0 in (0..32).filter_map(|device| Bdf::new(bus, device, 0)) {
        if !present(cfg, bdf0) {
            continue;
        }
        let multifunction = header_type_register(cfg, bdf0) & HEADER_MULTIFUNCTION != 0;
        let functions = if multifunction { 8 } else { 1 };
        for bdf in (0..functions).filter_map(|f| Bdf::new(bus, bdf0.device(), f)) {
            if present(cfg, bdf) {
                found.push(probe_function(cfg, bdf)?);
            }
        }
    }
    Ok(found)
}

/// Whether a function answers at `bdf`: a missing function reads as all-ones, and no vendor is
/// assigned the IDs 0xffff or 0 (some broken bridges return zeros).
fn present<C: ConfigSpace + ?Sized>(cfg: &C, bdf: Bdf) -> bool {
    !matches!(cfg.read32(bdf, REG_ID) as u16, 0 | 0xffff)
}

fn header_type_register<C: ConfigSpace + ?Sized>(cfg: &C, bdf: Bdf) -> u8 {
    (cfg.read32(bdf, REG_HEADER) >> 16) as u8
}

fn probe_function<C: ConfigSpace + ?Sized>(cfg: &mut C, bdf: Bdf) -> Result<Found, PciError> {
    let header_type = header_type_register(cfg, bdf) & !HEADER_MULTIFUNCTION;
    if header_type != 0 {
        return Err(PciError::UnsupportedHeader { bdf, header_type });
    }
    let id = cfg.read32(bdf, REG_ID);
    let class = cfg.read32(bdf, REG_CLASS);
    let interrupt = cfg.read32(bdf, REG_INTERRUPT);
    let bars = size_bars(cfg, bdf)?;
    Ok(Found {
        bdf,
        vendor: id as u16,
        device: (id >> 16) as u16,
        class: class >> 8,
        revision: class as u8,
        header_type,
        irq_pin: IntxPin::from_register((interrupt >> 8) as u8),
        bars,
    })
}

/// The config offset of BAR slot `index` (0..6).
fn bar_offset(index: u8) -> u16 {
    REG_BAR0 + 4 * u16::from(index)
}

/// Sizes the six BARs of the type-0 function `bdf`: one entry per implemented BAR, in the slot
/// of its (low) register; unimplemented BARs and the upper halves of 64-bit BARs are `None`.
///
/// Memory and I/O decoding are switched off while the BARs hold all-ones (the function would
/// otherwise claim whatever addresses that pattern decodes to), and the command register and
/// every BAR are restored afterwards, so the function is left as it was found.
///
/// Errors: a memory BAR of the reserved type 11b, or a 64-bit BAR in slot 5 (no room for its
/// upper half).
pub fn size_bars<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    bdf: Bdf,
) -> Result<[Option<BarInfo>; 6], PciError> {
    let command = cfg.read32(bdf, REG_COMMAND) & 0xffff;
    let decoding = u32::from(COMMAND_IO | COMMAND_MEMORY);
    cfg.write32(bdf, REG_COMMAND, command & !decoding);
    let bars = size_each(cfg, bdf);
    cfg.write32(bdf, REG_COMMAND, command);
    bars
}

fn size_each<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    bdf: Bdf,
) -> Result<[Option<BarInfo>; 6], PciError> {
    let mut bars = [None; 6];
    let mut index = 0u8;
    while index < 6 {
        let off = bar_offset(index);
        let low = cfg.read32(bdf, off);
        let low_mask = probe(cfg, bdf, off, low);
        let (kind, mask) = if low & BAR_IO != 0 {
            (Space::Io, u64::from(low_mask & !BAR_IO_FLAGS))
        } else {
            match (low >> 1) & 0x3 {
                // 01b is the old "below 1 MiB" type: decodes 32 bits like 00b.
                0b00 | 0b01 => (Space::Mem32, u64::from(low_mask & !BAR_MEM_FLAGS)),
                0b10 => {
                    if index == 5 {
                        return Err(PciError::BadBar {
                            bdf,
                            index,
                            what: "64-bit BAR in the last slot (no room for its upper half)",
                        });
                    }
                    let high = cfg.read32(bdf, off + 4);
                    let high_mask = probe(cfg, bdf, off + 4, high);
                    let mask = u64::from(high_mask) << 32 | u64::from(low_mask & !BAR_MEM_FLAGS);
                    (Space::Mem64, mask)
                }
                _ => {
                    return Err(PciError::BadBar {
                        bdf,
                        index,
                        what: "memory BAR of the reserved type 11b",
                    })
                }
            }
        };
        // A BAR whose address bits are all read-only is not implemented.
        if mask != 0 {
            if let Some(slot) = bars.get_mut(usize::from(index)) {
                *slot = Some(BarInfo {
                    index,
                    size: 1 << mask.trailing_zeros(),
                    kind,
                    prefetchable: kind != Space::Io && low & BAR_PREFETCHABLE != 0,
                });
            }
        }
        index += if kind == Space::Mem64 { 2 } else { 1 };
    }
    Ok(bars)
}

/// Writes all-ones to the register at `off`, reads back what stuck, and restores `original`.
fn probe<C: ConfigSpace + ?Sized>(cfg: &mut C, bdf: Bdf, off: u16, original: u32) -> u32 {
    cfg.write32(bdf, off, u32::MAX);
    let mask = cfg.read32(bdf, off);
    cfg.write32(bdf, off, original);
    mask
}

/// Writes `dev`'s assigned BARs, then enables memory decoding if it has a memory BAR, I/O
/// decoding if it has an I/O BAR, and bus mastering. The BARs' bus addresses come from
/// `assign`, which keeps 32-bit and I/O BARs below 4 GiB.
pub(super) fn program<C: ConfigSpace + ?Sized>(cfg: &mut C, dev: &PciDevice) {
    let mut enable = COMMAND_BUS_MASTER;
    for bar in dev.bars.iter().flatten() {
        let off = bar_offset(bar.index);
        // The flag bits are read-only, and an address aligned to the BAR's size has zeros there.
        cfg.write32(dev.bdf, off, bar.pci_addr as u32);
        if bar.kind == Space::Mem64 {
            cfg.write32(dev.bdf, off + 4, (bar.pci_addr >> 32) as u32);
        }
        enable |= match bar.kind {
            Space::Io => COMMAND_IO,
            Space::Mem32 | Space::Mem64 => COMMAND_MEMORY,
        };
    }
    // The dword's upper half is the status register, whose error bits are write-one-to-clear:
    // writing zeros there leaves them as they are.
    let command = cfg.read32(dev.bdf, REG_COMMAND) & 0xffff;
    cfg.write32(dev.bdf, REG_COMMAND, command | u32::from(enable));
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeConfig;
    use super::*;
    use proptest::prelude::*;

    fn bdf(d: u8) -> Bdf {
        Bdf::new(0, d, 0).unwrap()
    }

    fn info(index: u8, size: u64, kind: Space, prefetchable: bool) -> Option<BarInfo> {
        Some(BarInfo {
            index,
            size,
            kind,
            prefetchable,
        })
    }

    #[test]
    fn sizes_each_kind_of_bar() {
        let mut cfg = FakeConfig::new();
        cfg.add(bdf(1), 0x1234, 0x5678, 0, 0)
            .bar(0, 32, Space::Io, false)
            .bar(1, 1 << 20, Space::Mem32, false)
            .bar(2, 8 << 30, Space::Mem64, true)
            .io_bar16(4, 256)
            .bar(5, 16, Space::Mem32, true);
        // Leftover addresses from an earlier owner, which sizing must put back.
        cfg.poke(bdf(1), REG_BAR0 + 4, 0x2030_0000);
        cfg.poke(bdf(1), REG_BAR0 + 12, 0x2);
        cfg.poke(bdf(1), REG_COMMAND, 0x0000_0007);
        let before: Vec<u32> = (0..7).map(|i| cfg.read32(bdf(1), 0x04 + 4 * i)).collect();
        let bars = size_bars(&mut cfg, bdf(1)).unwrap();
        assert_eq!(
            bars,
            [
                info(0, 32, Space::Io, false),
                info(1, 1 << 20, Space::Mem32, false),
                info(2, 8 << 30, Space::Mem64, true),
                None,
                info(4, 256, Space::Io, false),
                info(5, 16, Space::Mem32, true),
            ]
        );
        let after: Vec<u32> = (0..7).map(|i| cfg.read32(bdf(1), 0x04 + 4 * i)).collect();
        assert_eq!(before, after, "command register and BARs restored");
        assert!(!cfg.sized_while_decoding());
    }

    #[test]
    fn legacy_below_1m_type_is_32_bit_and_reserved_type_is_an_error() {
        let mut cfg = FakeConfig::new();
        cfg.add(bdf(1), 0x1234, 0x5678, 0, 0)
            .bar(0, 4096, Space::Mem32, false);
        // Type 01b: the flag bits are read-only, so set them in the register directly.
        cfg.poke(bdf(1), REG_BAR0, 0b010);
        assert_eq!(
            size_bars(&mut cfg, bdf(1)).unwrap()[0],
            info(0, 4096, Space::Mem32, false)
        );
        cfg.poke(bdf(1), REG_BAR0, 0b110);
        let e = size_bars(&mut cfg, bdf(1)).unwrap_err();
        assert_eq!(
            format!("{e}"),
            "pci 00:01.0 BAR0: memory BAR of the reserved type 11b"
        );
    }

    #[test]
    fn a_64bit_bar_in_slot_5_is_an_error() {
        let mut cfg = FakeConfig::new();
        cfg.add(bdf(1), 0x1234, 0x5678, 0, 0);
        cfg.poke(bdf(1), REG_BAR0 + 20, 0b100);
        assert!(matches!(
            size_bars(&mut cfg, bdf(1)),
            Err(PciError::BadBar { index: 5, .. })
        ));
    }

    #[test]
    fn multifunction_bit_decides_which_functions_are_scanned() {
        let mut cfg = FakeConfig::new();
        // Function 1 answering on a single-function device (it decodes all function numbers).
        cfg.add(bdf(2), 0x1234, 0x0001, 0, 0);
        cfg.add(Bdf::new(0, 2, 1).unwrap(), 0x1234, 0x0001, 0, 0);
        // A multi-function device with functions 0, 3 and 7.
        cfg.add(bdf(9), 0x1234, 0x0002, 0, 0x80);
        cfg.add(Bdf::new(0, 9, 3).unwrap(), 0x1234, 0x0003, 0, 0);
        cfg.add(Bdf::new(0, 9, 7).unwrap(), 0x1234, 0x0004, 0, 0);
        // Function 1 without function 0: not a device.
        cfg.add(Bdf::new(0, 12, 1).unwrap(), 0x1234, 0x0005, 0, 0);
        // A bogus all-zero vendor ID.
        cfg.add(bdf(13), 0x0000, 0x1234, 0, 0);
        let found: Vec<_> = scan_bus(&mut cfg, 0)
            .unwrap()
            .iter()
            .map(|f| (f.bdf.device(), f.bdf.function(), f.device))
            .collect();
        assert_eq!(found, [(2, 0, 1), (9, 0, 2), (9, 3, 3), (9, 7, 4)]);
    }

    /// One BAR to place in the fake: (kind, log2 of size, prefetchable); `None` = unimplemented.
    fn bar_spec() -> impl Strategy<Value = Option<(Space, u32, bool)>> {
        prop_oneof![
            Just(None),
            (2u32..=8).prop_map(|l| Some((Space::Io, l, false))),
            (4u32..=31, any::<bool>()).prop_map(|(l, p)| Some((Space::Mem32, l, p))),
            (4u32..=48, any::<bool>()).prop_map(|(l, p)| Some((Space::Mem64, l, p))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever mix of BARs a function has, sizing reports exactly it and restores every
        /// register.
        #[test]
        fn sizing_reports_what_the_function_decodes(
            specs in proptest::collection::vec(bar_spec(), 6),
            leftovers in proptest::collection::vec(any::<u32>(), 6),
        ) {
            let mut cfg = FakeConfig::new();
            let mut expected = [None; 6];
            {
                let f = cfg.add(bdf(3), 0x1234, 0x5678, 0, 0);
                let mut i = 0usize;
                while i < 6 {
                    match specs[i] {
                        Some((Space::Mem64, _, _)) if i == 5 => {}
                        Some((kind, log2, pref)) => {
                            f.bar(i as u8, 1 << log2, kind, pref);
                            expected[i] = info(i as u8, 1 << log2, kind, pref);
                            if kind == Space::Mem64 {
                                i += 1;
                            }
                        }
                        None => {}
                    }
                    i += 1;
                }
            }
            for (i, v) in leftovers.iter().enumerate() {
                cfg.write32(bdf(3), REG_BAR0 + 4 * i as u16, *v);
            }
            let before: Vec<u32> = (0..6).map(|i| cfg.read32(bdf(3), REG_BAR0 + 4 * i)).collect();
            prop_assert_eq!(size_bars(&mut cfg, bdf(3)).unwrap(), expected);
            let after: Vec<u32> = (0..6).map(|i| cfg.read32(bdf(3), REG_BAR0 + 4 * i)).collect();
            prop_assert_eq!(before, after);
        }
    }
}
