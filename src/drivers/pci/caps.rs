//! The capability list of a function (PCI Local Bus 3.0, section 6.7): a chain of (id, next)
//! headers starting at the pointer in config offset 0x34, present when status bit 4 is set.
//!
//! The list comes from the device, so the walk trusts nothing: a pointer into the 64-byte
//! standard header, or one that comes back to an offset already visited, ends the walk with an
//! error instead of looping or misreading the header as a capability.

use super::{Bdf, ConfigSpace, PciError, REG_CAP_PTR, REG_COMMAND, STATUS_CAP_LIST};

/// Message Signalled Interrupts.
pub const CAP_MSI: u8 = 0x05;
/// Vendor-specific (virtio-pci's regions are described by these).
pub const CAP_VENDOR: u8 = 0x09;
/// PCI Express.
pub const CAP_PCIE: u8 = 0x10;
/// MSI-X.
pub const CAP_MSIX: u8 = 0x11;

/// Capabilities live after the standard header.
const FIRST_CAP_OFFSET: u8 = 0x40;

/// One capability: its ID and the config offset of its header (the body follows at `offset + 2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub id: u8,
    pub offset: u8,
}

/// Iterator over a function's capabilities, in list order. Yields at most one error, then ends.
pub struct Capabilities<'c, C: ConfigSpace + ?Sized> {
    cfg: &'c C,
    bdf: Bdf,
    /// The next pointer to follow (0 = end), and the config offset it was read from.
    next: u8,
    read_at: u8,
    /// Visited offsets, one bit per dword (offsets are dword-aligned and below 256).
    seen: u64,
    done: bool,
}

/// The capabilities of the type-0 function `bdf` (none if its status register says it has no
/// list).
pub fn capabilities<C: ConfigSpace + ?Sized>(cfg: &C, bdf: Bdf) -> Capabilities<'_, C> {
    let status = (cfg.read32(bdf, REG_COMMAND) >> 16) as u16;
    let next = if status & STATUS_CAP_LIST != 0 {
        cfg.read32(bdf, REG_CAP_PTR) as u8
    } else {
        0
    };
    Capabilities {
        cfg,
        bdf,
        next,
        read_at: REG_CAP_PTR as u8,
        seen: 0,
        done: false,
    }
}

/// The offset of the first capability `id` of `bdf`, if it has one.
pub fn find_capability<C: ConfigSpace + ?Sized>(
    cfg: &C,
    bdf: Bdf,
    id: u8,
) -> Result<Option<u8>, PciError> {
    for cap in capabilities(cfg, bdf) {
        let cap = cap?;
        if cap.id == id {
            return Ok(Some(cap.offset));
        }
    }
    Ok(None)
}

impl<C: ConfigSpace + ?Sized> Iterator for Capabilities<'_, C> {
    type Item = Result<Capability, PciError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        // The two low bits of a capability pointer are reserved: software must mask them.
        let offset = self.next & !0x3;
        if offset == 0 {
            self.done = true;
            return None;
        }
        if offset < FIRST_CAP_OFFSET {
            self.done = true;
            return Some(Err(PciError::CapabilityPointer {
                bdf: self.bdf,
                at: self.read_at,
                pointer: self.next,
            }));
        }
        let bit = 1u64 << (offset / 4);
        if self.seen & bit != 0 {
            self.done = true;
            return Some(Err(PciError::CapabilityLoop {
                bdf: self.bdf,
                offset,
            }));
        }
        self.seen |= bit;
        let header = self.cfg.read32(self.bdf, u16::from(offset));
        self.next = (header >> 8) as u8;
        self.read_at = offset + 1;
        Some(Ok(Capability {
            id: header as u8,
            offset,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{qemu_like, FakeConfig};
    use super::*;
    use alloc::vec::Vec;

    fn bdf(d: u8) -> Bdf {
        Bdf::new(0, d, 0).unwrap()
    }

    fn list(cfg: &FakeConfig, b: Bdf) -> Vec<Result<(u8, u8), PciError>> {
        capabilities(cfg, b)
            .map(|c| c.map(|c| (c.id, c.offset)))
            .collect()
    }

    /// A virtio capability's (cfg_type, bar, offset, length), read from config space directly.
    fn virtio_region(cfg: &FakeConfig, b: Bdf, cap: u8) -> (u8, u8, u32, u32) {
        let dw0 = cfg.read32(b, u16::from(cap));
        let dw1 = cfg.read32(b, u16::from(cap) + 4);
        (
            (dw0 >> 24) as u8,
            dw1 as u8,
            cfg.read32(b, u16::from(cap) + 8),
            cfg.read32(b, u16::from(cap) + 12),
        )
    }

    #[test]
    fn virtio_and_msix_capabilities() {
        let cfg = qemu_like();
        let virtio = bdf(1);
        assert_eq!(
            list(&cfg, virtio),
            [
                Ok((CAP_MSIX, 0x98)),
                Ok((CAP_VENDOR, 0x84)),
                Ok((CAP_VENDOR, 0x70)),
                Ok((CAP_VENDOR, 0x60)),
                Ok((CAP_VENDOR, 0x50)),
                Ok((CAP_VENDOR, 0x40)),
            ]
        );
        assert_eq!(find_capability(&cfg, virtio, CAP_MSIX), Ok(Some(0x98)));
        assert_eq!(find_capability(&cfg, virtio, CAP_VENDOR), Ok(Some(0x84)));
        assert_eq!(find_capability(&cfg, virtio, CAP_MSI), Ok(None));
        // The vendor capabilities are virtio's: common (1), ISR (3), device (4), notify (2)
        // in BAR4, and the PCI-config access window (5).
        let mut regions: Vec<_> = capabilities(&cfg, virtio)
            .map(Result::unwrap)
            .filter(|c| c.id == CAP_VENDOR)
            .map(|c| virtio_region(&cfg, virtio, c.offset))
            .collect();
        regions.sort();
        assert_eq!(
            regions,
            [
                (1, 4, 0x0000, 0x1000),
                (2, 4, 0x3000, 0x1000),
                (3, 4, 0x1000, 0x1000),
                (4, 4, 0x2000, 0x1000),
                (5, 0, 0, 0),
            ]
        );
        // edu: MSI only.
        assert_eq!(list(&cfg, bdf(2)), [Ok((CAP_MSI, 0x40))]);
        assert_eq!(find_capability(&cfg, bdf(2), CAP_MSIX), Ok(None));
        // Functions without a list (status bit 4 clear).
        assert_eq!(list(&cfg, bdf(0)), []);
        assert_eq!(list(&cfg, bdf(31)), []);
    }

    #[test]
    fn a_loop_ends_with_an_error() {
        let mut cfg = FakeConfig::new();
        cfg.add(bdf(1), 0x1234, 0x5678, 0, 0)
            .cap(0x40, CAP_MSI, &[0, 0])
            .cap(0x50, CAP_VENDOR, &[4])
            .cap(0x60, CAP_MSIX, &[0, 0]);
        // 0x60's next pointer back to 0x50, with the reserved low bits set for good measure.
        cfg.poke8(bdf(1), 0x61, 0x53);
        let got = list(&cfg, bdf(1));
        assert_eq!(
            got,
            [
                Ok((CAP_MSI, 0x40)),
                Ok((CAP_VENDOR, 0x50)),
                Ok((CAP_MSIX, 0x60)),
                Err(PciError::CapabilityLoop {
                    bdf: bdf(1),
                    offset: 0x50
                }),
            ]
        );
        assert_eq!(
            format!("{}", got[3].unwrap_err()),
            "pci 00:01.0: capability list loops back to offset 0x50"
        );
        assert_eq!(
            find_capability(&cfg, bdf(1), CAP_PCIE),
            Err(PciError::CapabilityLoop {
                bdf: bdf(1),
                offset: 0x50
            })
        );
        // A capability pointing at itself.
        cfg.poke8(bdf(1), 0x41, 0x40);
        assert_eq!(list(&cfg, bdf(1)).len(), 2);
    }

    #[test]
    fn a_pointer_into_the_header_is_an_error() {
        let mut cfg = FakeConfig::new();
        cfg.add(bdf(1), 0x1234, 0x5678, 0, 0)
            .cap(0x40, CAP_MSI, &[0, 0]);
        cfg.poke8(bdf(1), 0x41, 0x10);
        assert_eq!(
            list(&cfg, bdf(1)),
            [
                Ok((CAP_MSI, 0x40)),
                Err(PciError::CapabilityPointer {
                    bdf: bdf(1),
                    at: 0x41,
                    pointer: 0x10
                })
            ]
        );
        assert_eq!(
            format!(
                "{}",
                PciError::CapabilityPointer {
                    bdf: bdf(1),
                    at: 0x41,
                    pointer: 0x10
                }
            ),
            "pci 00:01.0: capability pointer 0x10 (read at 0x41) points into the header"
        );
    }
}
