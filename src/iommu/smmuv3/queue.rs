//! Index arithmetic of the SMMU's circular queues (IHI 0070 section 3.5).
//!
//! A queue of 2^n entries is driven by two pointers, PROD and CONS. Each holds an entry index in
//! its low n bits and a wrap bit just above, which flips every time the index passes the end: equal
//! indices with equal wrap bits mean empty, equal indices with different wrap bits mean full. The
//! registers carry other flags above (CONS.ERR, PROD.OVFLG); [`QueueGeometry::pointer`] strips them.

/// The size of one queue: 2^`log2` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueGeometry {
    log2: u8,
}

impl QueueGeometry {
    /// `log2` must be at most 19, the largest queue the architecture defines (QUEUES up to 2^19
    /// entries); `None` otherwise.
    pub const fn new(log2: u8) -> Option<QueueGeometry> {
        if log2 <= 19 {
            Some(QueueGeometry { log2 })
        } else {
            None
        }
    }

    pub const fn log2(self) -> u8 {
        self.log2
    }

    /// Number of entries.
    pub const fn entries(self) -> u32 {
        1 << self.log2
    }

    /// The index and wrap bit of a register value, other flags removed.
    pub const fn pointer(self, reg: u32) -> u32 {
        reg & ((2 << self.log2) - 1)
    }

    /// The entry a pointer designates.
    pub const fn index(self, ptr: u32) -> u32 {
        ptr & (self.entries() - 1)
    }

    /// The pointer one entry further, wrapping (and flipping the wrap bit) at the end.
    pub const fn next(self, ptr: u32) -> u32 {
        self.pointer(ptr.wrapping_add(1))
    }

    /// Entries produced and not yet consumed.
    pub const fn used(self, prod: u32, cons: u32) -> u32 {
        self.pointer(prod.wrapping_sub(cons))
    }

    /// Entries the producer may still write before the queue is full.
    pub const fn free(self, prod: u32, cons: u32) -> u32 {
        self.entries().saturating_sub(self.used(prod, cons))
    }

    pub const fn is_empty(self, prod: u32, cons: u32) -> bool {
        self.pointer(prod) == self.pointer(cons)
    }

    pub const fn is_full(self, prod: u32, cons: u32) -> bool {
        self.used(prod, cons) == self.entries()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn four_entries_by_hand() {
        let q = QueueGeometry::new(2).unwrap();
        assert_eq!(q.entries(), 4);
        // Pointers are 3 bits: index [1:0], wrap bit 2.
        assert_eq!(q.pointer(0xff00_0007), 7);
        assert_eq!((q.next(0), q.next(3), q.next(7)), (1, 4, 0));
        assert_eq!((q.index(5), q.index(3)), (1, 3));
        // Empty, then three entries, then full (index 0 again with the wrap bit set).
        assert!(q.is_empty(0, 0) && !q.is_full(0, 0));
        assert_eq!((q.used(3, 0), q.free(3, 0)), (3, 1));
        assert!(q.is_full(4, 0) && !q.is_empty(4, 0));
        assert_eq!(q.free(4, 0), 0);
        // Across the wrap: CONS at 6 (index 2, wrap 1), PROD at 1 (index 1, wrap 0): 3 used.
        assert_eq!(q.used(1, 6), 3);
        assert!(q.is_full(2, 6));
        // CONS.ERR in bits [30:24] does not disturb the arithmetic.
        assert_eq!(q.used(5, 0x0100_0004), 1);
        assert!(q.is_empty(0x0100_0004, 4));
        assert_eq!(QueueGeometry::new(20), None);
    }

    proptest! {
        /// Against a model that counts entries: producing and consuming in any order keeps the
        /// pointers' view equal to the count, and entries land at consecutive indices modulo the
        /// size.
        #[test]
        fn model(log2 in 0u8..=6, ops in prop::collection::vec(any::<bool>(), 0..300)) {
            let q = QueueGeometry::new(log2).unwrap();
            let (mut prod, mut cons, mut count, mut produced) = (0u32, 0u32, 0u32, 0u64);
            for produce in ops {
                if produce && count < q.entries() {
                    prop_assert_eq!(u64::from(q.index(prod)), produced % u64::from(q.entries()));
                    prod = q.next(prod);
                    count += 1;
                    produced += 1;
                } else if !produce && count > 0 {
                    cons = q.next(cons);
                    count -= 1;
                }
                prop_assert_eq!(q.used(prod, cons), count);
                prop_assert_eq!(q.free(prod, cons), q.entries() - count);
                prop_assert_eq!(q.is_empty(prod, cons), count == 0);
                prop_assert_eq!(q.is_full(prod, cons), count == q.entries());
            }
        }
    }
}
