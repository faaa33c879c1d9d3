//! Locating a modern virtio-pci function's structures (virtio 1.2, 4.1.4): each is described by a
//! vendor-specific PCI capability (ID 0x09) giving its type, the BAR holding it, and its offset
//! and length in that BAR:
//!
//! ```text
//! +0 cap_vndr  cap_next  cap_len  cfg_type     +4 bar  id  padding[2]
//! +8 offset (le32)     +12 length (le32)       +16 notify_off_multiplier (le32, notify only)
//! ```
//!
//! The driver uses the first capability of each type it can use (as the specification
//! recommends) and ignores types and BAR numbers the specification reserves. Everything comes
//! from the device, so every field is checked: the BAR must be assigned and decode memory, the
//! structure must lie inside it and be long enough for what the driver reads there.

use super::VirtioError;
use crate::drivers::pci::{capabilities, ConfigSpace, PciDevice, Space, CAP_VENDOR};

/// `cfg_type` values.
pub const CFG_COMMON: u8 = 1;
pub const CFG_NOTIFY: u8 = 2;
pub const CFG_ISR: u8 = 3;
pub const CFG_DEVICE: u8 = 4;

/// The common configuration fields the driver uses end at 0x38 (`queue_device` included).
pub const COMMON_MIN_LEN: u32 = 0x38;
/// One 16-bit notification write.
pub const NOTIFY_MIN_LEN: u32 = 2;
/// The ISR status byte.
pub const ISR_MIN_LEN: u32 = 1;
/// `struct virtio_pci_cap` is 16 bytes; the notify capability adds the multiplier.
const CAP_LEN: u8 = 16;
const NOTIFY_CAP_LEN: u8 = 20;

/// A structure's place: `len` bytes at `offset` into the memory BAR in slot `bar`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub bar: u8,
    pub offset: u32,
    pub len: u32,
}

/// The structures of one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCaps {
    pub common: Region,
    pub notify: Region,
    /// Queue `q`'s notification address is `notify.offset + queue_notify_off(q) * this`.
    pub notify_multiplier: u32,
    pub isr: Region,
    /// Optional: some device types have no configuration.
    pub device: Option<Region>,
}

/// The name of a structure type, for messages.
fn structure(cfg_type: u8) -> &'static str {
    match cfg_type {
        CFG_COMMON => "common configuration",
        CFG_NOTIFY => "notify",
        CFG_ISR => "ISR",
        _ => "device configuration",
    }
}

/// A structure type while the list is walked: the first usable instance, or why the first
/// instance was not usable.
#[derive(Clone, Copy)]
enum Slot {
    Empty,
    Found(Region, u32),
    Rejected { offset: u8, what: &'static str },
}

/// Finds the virtio structures of `pdev` through `cfg`. Common configuration, notify and ISR are
/// required: if none of a kind is usable the error names the first one found and why it was
/// refused, or says there is none.
pub fn find<C: ConfigSpace + ?Sized>(cfg: &C, pdev: &PciDevice) -> Result<VirtioCaps, VirtioError> {
    let bdf = pdev.bdf;
    let mut slots = [Slot::Empty; 4];
    for cap in capabilities(cfg, bdf) {
        let cap = cap.map_err(VirtioError::Pci)?;
        if cap.id != CAP_VENDOR {
            continue;
        }
        let at = u16::from(cap.offset);
        let dw0 = cfg.read32(bdf, at);
        let dw1 = cfg.read32(bdf, at + 4);
        let (cap_len, cfg_type, bar) = ((dw0 >> 16) as u8, (dw0 >> 24) as u8, dw1 as u8);
        let Some(slot) = usize::from(cfg_type).checked_sub(1).and_then(|i| slots.get_mut(i)) else {
            // A type the driver does not use (PCI configuration access, shared memory) or one
            // the specification reserves.
            continue;
        };
        if matches!(slot, Slot::Found(..)) {
            continue;
        }
        if bar > 5 {
            // Reserved BAR numbers: the specification says to ignore the capability.
            continue;
        }
        let parsed = check(cfg, pdev, at, cap_len, cfg_type, bar);
        *slot = match (parsed, *slot) {
            (Ok((region, multiplier)), _) => Slot::Found(region, multiplier),
            (Err(_), rejected @ Slot::Rejected { .. }) => rejected,
            (Err(what), _) => Slot::Rejected { offset: cap.offset, what },
        };
    }
    let required = |cfg_type: u8| -> Result<(Region, u32), VirtioError> {
        match slots[usize::from(cfg_type) - 1] {
            Slot::Found(r, m) => Ok((r, m)),
            Slot::Rejected { offset, what } => {
                Err(VirtioError::BadCapability { bdf, offset, structure: structure(cfg_type), what })
            }
            Slot::Empty => Err(VirtioError::MissingCapability { bdf, structure: structure(cfg_type) }),
        }
    };
    let (common, _) = required(CFG_COMMON)?;
    let (notify, notify_multiplier) = required(CFG_NOTIFY)?;
    let (isr, _) = required(CFG_ISR)?;
    let device = match slots[usize::from(CFG_DEVICE) - 1] {
        Slot::Found(r, _) => Some(r),
        Slot::Empty => None,
        Slot::Rejected { offset, what } => {
            return Err(VirtioError::BadCapability { bdf, offset, structure: structure(CFG_DEVICE), what })
        }
    };
    Ok(VirtioCaps { common, notify, notify_multiplier, isr, device })
}

/// The region (and notify multiplier) of the capability at config offset `at`, or why it is
/// unusable.
fn check<C: ConfigSpace + ?Sized>(
    cfg: &C,
    pdev: &PciDevice,
    at: u16,
    cap_len: u8,
    cfg_type: u8,
    bar: u8,
) -> Result<(Region, u32), &'static str> {
    let needed_cap_len = if cfg_type == CFG_NOTIFY { NOTIFY_CAP_LEN } else { CAP_LEN };
    if cap_len < needed_cap_len {
        return Err("capability too short");
    }
    let offset = cfg.read32(pdev.bdf, at + 8);
    let len = cfg.read32(pdev.bdf, at + 12);
    let multiplier = if cfg_type == CFG_NOTIFY { cfg.read32(pdev.bdf, at + 16) } else { 0 };
    let min = match cfg_type {
        CFG_COMMON => COMMON_MIN_LEN,
        CFG_NOTIFY => NOTIFY_MIN_LEN,
        CFG_ISR => ISR_MIN_LEN,
        _ => 0,
    };
    if len < min {
        return Err("structure too short");
    }
    let b = pdev.bar(usize::from(bar)).ok_or("its BAR is not assigned")?;
    if b.kind == Space::Io {
        return Err("in an I/O BAR");
    }
    if u64::from(offset) + u64::from(len) > b.size {
        return Err("structure extends beyond its BAR");
    }
    Ok((Region { bar, offset, len }, multiplier))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::pci::{Bar, Bdf, PciError};
    use crate::mm::addr::PhysAddr;

    /// The configuration space of one function (256 bytes); other functions read all-ones.
    struct OneFunction {
        bdf: Bdf,
        bytes: [u8; 256],
    }

    impl ConfigSpace for OneFunction {
        fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
            let o = usize::from(offset);
            if bdf != self.bdf || o + 4 > self.bytes.len() {
                return u32::MAX;
            }
            u32::from_le_bytes(self.bytes[o..o + 4].try_into().unwrap())
        }

        fn write32(&mut self, _bdf: Bdf, _offset: u16, _value: u32) {}
    }

    /// (config offset, cfg_type, bar, offset, length, cap_len, multiplier)
    type VCap = (u8, u8, u8, u32, u32, u8, u32);

    fn function(caps: &[VCap], other: &[(u8, u8)]) -> OneFunction {
        let mut f = OneFunction { bdf: Bdf::new(0, 1, 0).unwrap(), bytes: [0; 256] };
        f.bytes[6] = 0x10; // status: capability list
        // Chain: the other capabilities first, then the vendor ones, in the order given.
        let mut chain: Vec<(u8, u8)> = other.to_vec();
        chain.extend(caps.iter().map(|c| (c.0, CAP_VENDOR)));
        f.bytes[0x34] = chain.first().map_or(0, |c| c.0);
        for (i, &(at, id)) in chain.iter().enumerate() {
            let a = usize::from(at);
            f.bytes[a] = id;
            f.bytes[a + 1] = chain.get(i + 1).map_or(0, |c| c.0);
        }
        for &(at, cfg_type, bar, offset, len, cap_len, mult) in caps {
            let a = usize::from(at);
            f.bytes[a + 2] = cap_len;
            f.bytes[a + 3] = cfg_type;
            f.bytes[a + 4] = bar;
            f.bytes[a + 8..a + 12].copy_from_slice(&offset.to_le_bytes());
            f.bytes[a + 12..a + 16].copy_from_slice(&len.to_le_bytes());
            if cfg_type == CFG_NOTIFY {
                f.bytes[a + 16..a + 20].copy_from_slice(&mult.to_le_bytes());
            }
        }
        f
    }

    /// QEMU's modern virtio-pci function: BAR1 (4 KiB, MSI-X table) and BAR4 (16 KiB, 64-bit).
    fn pdev() -> PciDevice {
        let bar = |index: u8, addr: u64, size: u64, kind: Space| Bar {
            index,
            cpu_addr: PhysAddr::new(addr),
            pci_addr: addr,
            size,
            kind,
            prefetchable: kind == Space::Mem64,
        };
        PciDevice {
            domain: 0,
            bdf: Bdf::new(0, 1, 0).unwrap(),
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x010000,
            revision: 1,
            header_type: 0,
            bars: [
                Some(bar(0, 0x3eff_1000, 0x40, Space::Io)),
                Some(bar(1, 0x1000_0000, 0x1000, Space::Mem32)),
                None,
                None,
                Some(bar(4, 0x80_0000_0000, 0x4000, Space::Mem64)),
                None,
            ],
            irq_pin: None,
            intx: None,
        }
    }

    /// A layout like QEMU's: MSI-X first, then vendor capabilities for common configuration,
    /// ISR, device configuration, notify (multiplier 4) and PCI configuration access, all
    /// structures in BAR4.
    fn qemu_caps() -> Vec<VCap> {
        vec![
            (0x84, CFG_COMMON, 4, 0x0000, 0x1000, 16, 0),
            (0x74, CFG_ISR, 4, 0x1000, 0x1000, 16, 0),
            (0x64, CFG_DEVICE, 4, 0x2000, 0x1000, 16, 0),
            (0x50, CFG_NOTIFY, 4, 0x3000, 0x1000, 20, 4),
            (0xa4, 5, 0, 0, 0, 20, 0),
        ]
    }

    fn region(bar: u8, offset: u32, len: u32) -> Region {
        Region { bar, offset, len }
    }

    #[test]
    fn qemu_layout() {
        let f = function(&qemu_caps(), &[(0x98, 0x11)]);
        let caps = find(&f, &pdev()).unwrap();
        assert_eq!(
            caps,
            VirtioCaps {
                common: region(4, 0, 0x1000),
                notify: region(4, 0x3000, 0x1000),
                notify_multiplier: 4,
                isr: region(4, 0x1000, 0x1000),
                device: Some(region(4, 0x2000, 0x1000)),
            }
        );
    }

    #[test]
    fn the_first_usable_instance_wins_and_reserved_ones_are_ignored() {
        let caps = [
            // Reserved BAR number: ignored, so the next common capability is the first.
            (0xd0, CFG_COMMON, 6, 0, 0x1000, 16, 0),
            (0xc0, 0x7f, 4, 0, 0x1000, 16, 0),
            (0xb0, CFG_COMMON, 1, 0x100, 0x100, 16, 0),
            (0xa0, CFG_COMMON, 4, 0, 0x1000, 16, 0),
            // An unusable notify (BAR 2 unassigned) before a usable one.
            (0x8c, CFG_NOTIFY, 2, 0, 0x1000, 20, 4),
            (0x78, CFG_NOTIFY, 4, 0x3000, 0x1000, 20, 0),
            (0x68, CFG_ISR, 4, 0x1000, 1, 16, 0),
        ];
        let c = find(&function(&caps, &[]), &pdev()).unwrap();
        assert_eq!(c.common, region(1, 0x100, 0x100));
        assert_eq!((c.notify, c.notify_multiplier), (region(4, 0x3000, 0x1000), 0));
        assert_eq!(c.isr, region(4, 0x1000, 1));
        assert_eq!(c.device, None);
    }

    #[test]
    fn unusable_structures_are_reported_with_the_first_reason() {
        let bdf = Bdf::new(0, 1, 0).unwrap();
        let with = |replace: VCap| {
            let mut caps = qemu_caps();
            caps.retain(|c| c.1 != replace.1);
            caps.push(replace);
            find(&function(&caps, &[]), &pdev()).unwrap_err()
        };
        let bad = |e: VirtioError| match e {
            VirtioError::BadCapability { bdf: b, offset, structure, what } if b == bdf => (offset, structure, what),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(bad(with((0xe0, CFG_COMMON, 4, 0x3c00, 0x1000, 16, 0))), (0xe0, "common configuration", "structure extends beyond its BAR"));
        assert_eq!(bad(with((0xe0, CFG_COMMON, 4, 0, 0x37, 16, 0))), (0xe0, "common configuration", "structure too short"));
        assert_eq!(bad(with((0xe0, CFG_NOTIFY, 4, 0x3000, 0x1000, 16, 0))), (0xe0, "notify", "capability too short"));
        assert_eq!(bad(with((0xe0, CFG_ISR, 0, 0, 1, 16, 0))), (0xe0, "ISR", "in an I/O BAR"));
        assert_eq!(bad(with((0xe0, CFG_DEVICE, 3, 0, 8, 16, 0))), (0xe0, "device configuration", "its BAR is not assigned"));
        // An offset near 4 GiB does not overflow the check.
        assert_eq!(bad(with((0xe0, CFG_ISR, 4, u32::MAX, 1, 16, 0))).2, "structure extends beyond its BAR");
        let e = with((0xe0, CFG_NOTIFY, 4, 0x3000, 0x1000, 16, 0));
        assert_eq!(e.to_string(), "pci 00:01.0: virtio notify capability at 0xe0: capability too short");
    }

    #[test]
    fn missing_structures_and_broken_lists() {
        let mut caps = qemu_caps();
        caps.retain(|c| c.1 != CFG_ISR);
        let e = find(&function(&caps, &[]), &pdev()).unwrap_err();
        assert!(matches!(e, VirtioError::MissingCapability { structure: "ISR", .. }), "{e:?}");
        assert_eq!(e.to_string(), "pci 00:01.0: no virtio ISR capability (a legacy-only device?)");

        // No capability list at all (a legacy function without the modern capabilities).
        let mut f = function(&[], &[]);
        f.bytes[6] = 0;
        let e = find(&f, &pdev()).unwrap_err();
        assert!(matches!(e, VirtioError::MissingCapability { structure: "common configuration", .. }), "{e:?}");

        // A list that loops back on itself is an error, not a hang.
        let mut f = function(&qemu_caps(), &[]);
        f.bytes[0xa5] = 0x84;
        let e = find(&f, &pdev()).unwrap_err();
        assert!(matches!(e, VirtioError::Pci(PciError::CapabilityLoop { offset: 0x84, .. })), "{e:?}");
    }
}
