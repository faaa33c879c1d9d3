//! ASID allocation for SMMU domains.
//!
//! Each domain has its own ASID because the SMMU tags its TLB entries with the ASID (QEMU's model
//! keys its IOTLB by ASID and address only, not by StreamID), so two domains sharing one would see
//! each other's translations. ASID 0 is never handed out: it stays free for a kernel-wide or
//! bypass context, as in Linux. Allocation rotates through the space so that a freed ASID is reused
//! as late as possible (its TLB entries are invalidated when it is freed in any case).

use alloc::collections::BTreeSet;

/// The ASIDs in use, out of 2^`bits`.
#[derive(Debug)]
pub struct AsidAllocator {
    limit: u32,
    used: BTreeSet<u16>,
    /// Where the next search starts.
    cursor: u32,
}

impl AsidAllocator {
    /// For an SMMU with `bits`-bit ASIDs (8 or 16; more is capped at 16).
    pub fn new(bits: u8) -> AsidAllocator {
        AsidAllocator { limit: 1 << bits.min(16), used: BTreeSet::new(), cursor: 1 }
    }

    /// A free ASID, or `None` when all 2^bits - 1 are in use.
    pub fn alloc(&mut self) -> Option<u16> {
        let usable = self.limit - 1;
        if self.used.len() as u32 >= usable {
            return None;
        }
        // The first free value from the cursor, wrapping once past the end (skipping 0).
        let from_cursor = (self.cursor..self.limit).chain(1..self.cursor);
        let asid = from_cursor.map(|a| a as u16).find(|a| !self.used.contains(a))?;
        self.used.insert(asid);
        self.cursor = if u32::from(asid) + 1 >= self.limit { 1 } else { u32::from(asid) + 1 };
        Some(asid)
    }

    /// Returns `asid`; false if it was not allocated.
    pub fn free(&mut self, asid: u16) -> bool {
        self.used.remove(&asid)
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_bits() {
        let mut a = AsidAllocator::new(8);
        let got: Vec<u16> = (0..255).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(got, (1..=255).collect::<Vec<u16>>());
        assert_eq!(a.alloc(), None);
        assert!(a.free(7));
        assert!(!a.free(7));
        assert!(!a.free(0));
        assert_eq!(a.alloc(), Some(7));
        assert_eq!(a.in_use(), 255);
    }

    #[test]
    fn rotates_before_reusing() {
        let mut a = AsidAllocator::new(16);
        assert_eq!((a.alloc(), a.alloc(), a.alloc()), (Some(1), Some(2), Some(3)));
        a.free(1);
        // 1 is free again but the search goes on from 4.
        assert_eq!(a.alloc(), Some(4));
        assert_eq!(a.in_use(), 3);
        // Capped at 16 bits.
        let mut big = AsidAllocator::new(20);
        assert_eq!(big.limit, 1 << 16);
        for _ in 0..0xfffe {
            big.alloc().unwrap();
        }
        assert_eq!(big.alloc(), Some(0xffff));
        assert_eq!(big.alloc(), None);
        big.free(0x8000);
        assert_eq!(big.alloc(), Some(0x8000));
    }
}
