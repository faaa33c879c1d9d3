//! The driver side of a split virtqueue (virtio 1.2, 2.7), over memory it is given: the kernel
//! gives it coherent DMA memory, the host tests a buffer they play the device on.
//!
//! Layout for a queue of `size` descriptors (a power of two), as separate areas of one buffer:
//!
//! ```text
//! 0              descriptor table  size x { le64 addr, le32 len, le16 flags, le16 next }  (16-aligned)
//! 16 * size      available ring    le16 flags, le16 idx, le16 ring[size], le16 used_event (2-aligned)
//! used           used ring         le16 flags, le16 idx, { le32 id, le32 len }[size], le16 avail_event
//!                                  (4-aligned)
//! ```
//!
//! One chain is in flight at a time (the drivers here wait for each request), always built from
//! descriptor 0 on, so there is no free list to corrupt. The device's side of the rings is
//! untrusted: [`SplitQueue::poll`] checks that the used ring returns exactly the chain that was
//! submitted, with no more bytes written than the chain has device-writable bytes.
//!
//! Ordering (2.7.13): descriptors and the ring entry are written before the available index, and
//! the index before the driver reads the used ring's flags and notifies; the used index is read
//! before the used element it announces. Each of these is a full barrier here (a DSB in the
//! kernel), which also orders the normal-memory ring writes before the device-memory notify
//! write that follows `push`.

use core::fmt;
use core::ptr::NonNull;

/// The descriptor continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// The device writes the buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = 2;
/// In the available ring's flags: the driver polls and needs no interrupt.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// In the used ring's flags: the device needs no notification.
pub const USED_F_NO_NOTIFY: u16 = 1;
/// The largest split virtqueue.
pub const MAX_SIZE: u16 = 32768;

const DESC_BYTES: usize = 16;

/// Where the areas of a queue of `size` descriptors lie in its buffer, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub size: u16,
    /// Offset of the available ring (the descriptor table is at 0).
    pub avail: usize,
    /// Offset of the used ring.
    pub used: usize,
    /// Bytes of the whole buffer.
    pub bytes: usize,
}

impl RingLayout {
    /// `None` unless `size` is a power of two of at most [`MAX_SIZE`].
    pub fn new(size: u16) -> Option<RingLayout> {
        if !size.is_power_of_two() || size > MAX_SIZE {
            return None;
        }
        let n = usize::from(size);
        let avail = DESC_BYTES * n;
        let avail_end = avail + 6 + 2 * n;
        let used = (avail_end + 3) & !3;
        Some(RingLayout { size, avail, used, bytes: used + 6 + 8 * n })
    }
}

/// One buffer of a chain: `len` bytes at device address `addr`, read or written by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

/// A chain the queue refused, or a used ring that does not match what was submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// A chain of no buffers.
    EmptyChain,
    /// More buffers than the queue has descriptors.
    ChainTooLong { segments: usize, size: u16 },
    /// A device-readable buffer after a device-writable one (the specification forbids it).
    ReadableAfterWritable { index: usize },
    /// A chain is already in flight.
    Busy,
    /// The device moved the used index by `advanced` while `in_flight` chains were out.
    UnexpectedUsed { advanced: u16, in_flight: u16 },
    /// The used element names chain `id`, not the one submitted (`expected`).
    WrongId { id: u32, expected: u16 },
    /// The device claims `len` bytes written into a chain with `writable` device-writable bytes.
    BadLength { len: u32, writable: u64 },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::EmptyChain => f.write_str("a chain of no buffers"),
            QueueError::ChainTooLong { segments, size } => {
                write!(f, "a chain of {segments} buffers in a queue of {size} descriptors")
            }
            QueueError::ReadableAfterWritable { index } => {
                write!(f, "buffer {index} is device-readable but follows a device-writable one")
            }
            QueueError::Busy => f.write_str("a chain is already in flight"),
            QueueError::UnexpectedUsed { advanced, in_flight } => {
                write!(f, "the device returned {advanced} chains with {in_flight} in flight")
            }
            QueueError::WrongId { id, expected } => {
                write!(f, "the device returned chain {id}, chain {expected} is in flight")
            }
            QueueError::BadLength { len, writable } => {
                write!(f, "the device claims {len} bytes written into {writable} writable bytes")
            }
        }
    }
}

#[derive(Clone, Copy)]
struct InFlight {
    head: u16,
    writable: u64,
}

/// The driver's state of one split virtqueue in a buffer it does not own.
pub struct SplitQueue {
    base: NonNull<u8>,
    layout: RingLayout,
    /// The available index the driver publishes next.
    next_avail: u16,
    /// The used index up to which the driver has consumed the used ring.
    last_used: u16,
    in_flight: Option<InFlight>,
}

/// A full memory barrier: a DSB in the kernel (the device may be a non-coherent observer, and
/// a notify to device memory follows), a sequentially consistent fence on the host.
#[inline(always)]
fn barrier() {
    #[cfg(target_os = "none")]
    crate::arch::cache::dsb();
    #[cfg(not(target_os = "none"))]
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

impl SplitQueue {
    /// Takes over the rings in `base .. base + layout.bytes` and tells the device that the driver
    /// polls (VIRTQ_AVAIL_F_NO_INTERRUPT).
    ///
    /// # Safety
    /// `base` is 16-byte aligned, points to `layout.bytes` zeroed bytes that stay valid for reads
    /// and writes for the queue's lifetime, and nothing but this queue and the device accesses
    /// them meanwhile.
    pub unsafe fn new(base: NonNull<u8>, layout: RingLayout) -> SplitQueue {
        let q = SplitQueue { base, layout, next_avail: 0, last_used: 0, in_flight: None };
        q.write16(layout.avail, AVAIL_F_NO_INTERRUPT);
        q
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Whether a chain was pushed and not yet returned by [`SplitQueue::poll`].
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Publishes the chain `segs` (device-readable buffers first) to the device. Returns whether
    /// the device wants a notification (the used ring's flags do not say VIRTQ_USED_F_NO_NOTIFY);
    /// the caller then writes the notify register.
    pub fn push(&mut self, segs: &[Segment]) -> Result<bool, QueueError> {
        if self.in_flight.is_some() {
            return Err(QueueError::Busy);
        }
        if segs.is_empty() {
            return Err(QueueError::EmptyChain);
        }
        if segs.len() > usize::from(self.layout.size) {
            return Err(QueueError::ChainTooLong { segments: segs.len(), size: self.layout.size });
        }
        if let Some(index) = segs.windows(2).position(|w| w[0].device_writes && !w[1].device_writes) {
            return Err(QueueError::ReadableAfterWritable { index: index + 1 });
        }
        let mut writable = 0u64;
        for (i, s) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let mut flags = if last { 0 } else { DESC_F_NEXT };
            if s.device_writes {
                flags |= DESC_F_WRITE;
                writable += u64::from(s.len);
            }
            // `i + 1` < size <= 32768 when not last: it fits the 16-bit `next`.
            let next = if last { 0 } else { (i + 1) as u16 };
            let d = DESC_BYTES * i;
            self.write64(d, s.addr);
            self.write32(d + 8, s.len);
            self.write16(d + 12, flags);
            self.write16(d + 14, next);
        }
        let head = 0u16;
        let slot = usize::from(self.next_avail % self.layout.size);
        self.write16(self.layout.avail + 4 + 2 * slot, head);
        // The device must see the chain and the ring entry before the index that publishes them.
        barrier();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.write16(self.layout.avail + 2, self.next_avail);
        // The index before the used ring's flags are read and before the notify.
        barrier();
        self.in_flight = Some(InFlight { head, writable });
        Ok(self.read16(self.layout.used) & USED_F_NO_NOTIFY == 0)
    }

    /// The chain in flight, if the device has returned it: `Ok(bytes written by the device)`, or
    /// an error if the used ring does not match what was submitted (the queue is then out of
    /// step with the device, which must be reset). `None` while the device is still working, or
    /// when nothing is in flight and the device returned nothing.
    pub fn poll(&mut self) -> Option<Result<u32, QueueError>> {
        let used_idx = self.read16(self.layout.used + 2);
        let advanced = used_idx.wrapping_sub(self.last_used);
        if advanced == 0 {
            return None;
        }
        // The index before the element it announces.
        barrier();
        let in_flight = self.in_flight.take();
        let Some(f) = in_flight.filter(|_| advanced == 1) else {
            self.last_used = used_idx;
            return Some(Err(QueueError::UnexpectedUsed { advanced, in_flight: u16::from(in_flight.is_some()) }));
        };
        let elem = self.layout.used + 4 + 8 * usize::from(self.last_used % self.layout.size);
        let (id, len) = (self.read32(elem), self.read32(elem + 4));
        self.last_used = used_idx;
        if id != u32::from(f.head) {
            return Some(Err(QueueError::WrongId { id, expected: f.head }));
        }
        if u64::from(len) > f.writable {
            return Some(Err(QueueError::BadLength { len, writable: f.writable }));
        }
        Some(Ok(len))
    }

    // The accessors take offsets computed from `layout` by the code above: inside the buffer and
    // aligned to the access size (the buffer is 16-aligned, the areas are aligned as the layout
    // says). Volatile, because the device reads and writes the same memory behind the compiler's
    // back; little-endian, as virtio 1.x rings are.

    fn write16(&self, off: usize, v: u16) {
        // SAFETY: `off + 2 <= layout.bytes`, 2-aligned (see above); the buffer is valid for
        // writes for the queue's lifetime (`new`'s contract).
        unsafe { core::ptr::write_volatile(self.base.as_ptr().add(off).cast::<u16>(), v.to_le()) }
    }

    fn write32(&self, off: usize, v: u32) {
        // SAFETY: as in `write16`, 4-aligned.
        unsafe { core::ptr::write_volatile(self.base.as_ptr().add(off).cast::<u32>(), v.to_le()) }
    }

    fn write64(&self, off: usize, v: u64) {
        // SAFETY: as in `write16`, 8-aligned (descriptors are 16 bytes from a 16-aligned base).
        unsafe { core::ptr::write_volatile(self.base.as_ptr().add(off).cast::<u64>(), v.to_le()) }
    }

    fn read16(&self, off: usize) -> u16 {
        // SAFETY: as in `write16`, for reads.
        u16::from_le(unsafe { core::ptr::read_volatile(self.base.as_ptr().add(off).cast::<u16>()) })
    }

    fn read32(&self, off: usize) -> u32 {
        // SAFETY: as in `write32`, for reads.
        u32::from_le(unsafe { core::ptr::read_volatile(self.base.as_ptr().add(off).cast::<u32>()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MEM_BYTES: usize = 4096;

    #[repr(C, align(16))]
    struct Page([u8; MEM_BYTES]);

    /// Ring memory for the tests, 16-aligned, reached only through one raw pointer that the queue
    /// and the device model share (as the CPU and a device share memory).
    struct Mem(NonNull<u8>);

    impl Mem {
        fn new() -> Mem {
            let raw = Box::into_raw(Box::new(Page([0; MEM_BYTES])));
            Mem(NonNull::new(raw.cast::<u8>()).unwrap())
        }

        fn get(&self, off: usize) -> u8 {
            assert!(off < MEM_BYTES);
            // SAFETY: inside the live allocation made by `new`; single-threaded test.
            unsafe { self.0.as_ptr().add(off).read_volatile() }
        }

        fn set(&self, off: usize, v: u8) {
            assert!(off < MEM_BYTES);
            // SAFETY: as in `get`.
            unsafe { self.0.as_ptr().add(off).write_volatile(v) }
        }
    }

    impl Drop for Mem {
        fn drop(&mut self) {
            // SAFETY: the pointer came from `Box::into_raw` of a `Page` in `new`, freed only here.
            drop(unsafe { Box::from_raw(self.0.as_ptr().cast::<Page>()) });
        }
    }

    /// The device's side, written from the specification independently of the driver code:
    /// reads the rings byte by byte, follows a chain, and returns it.
    struct Device<'m> {
        mem: &'m Mem,
        layout: RingLayout,
        last_avail: u16,
        used_idx: u16,
    }

    impl Device<'_> {
        fn bytes<const N: usize>(&self, off: usize) -> [u8; N] {
            core::array::from_fn(|i| self.mem.get(off + i))
        }

        fn u16_at(&self, off: usize) -> u16 {
            u16::from_le_bytes(self.bytes(off))
        }

        fn put(&mut self, off: usize, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                self.mem.set(off + i, *b);
            }
        }

        /// The next chain the driver published, with its head, if any.
        fn take(&mut self) -> Option<(u16, Vec<Segment>)> {
            let avail = self.layout.avail;
            if self.u16_at(avail + 2) == self.last_avail {
                return None;
            }
            let n = usize::from(self.layout.size);
            let head = self.u16_at(avail + 4 + 2 * (usize::from(self.last_avail) % n));
            self.last_avail = self.last_avail.wrapping_add(1);
            let mut segs = Vec::new();
            let mut d = usize::from(head);
            loop {
                assert!(d < n && segs.len() < n, "chain leaves the table or loops");
                let o = 16 * d;
                let addr = u64::from_le_bytes(self.bytes(o));
                let len = u32::from_le_bytes(self.bytes(o + 8));
                let flags = self.u16_at(o + 12);
                assert_eq!(flags & !(DESC_F_NEXT | DESC_F_WRITE), 0, "unexpected flags {flags:#x}");
                segs.push(Segment { addr, len, device_writes: flags & DESC_F_WRITE != 0 });
                if flags & DESC_F_NEXT == 0 {
                    break;
                }
                d = usize::from(self.u16_at(o + 14));
            }
            Some((head, segs))
        }

        /// Returns chain `id` with `len` bytes written, advancing the used index by `advance`.
        fn give_back(&mut self, id: u32, len: u32, advance: u16) {
            let n = usize::from(self.layout.size);
            let e = self.layout.used + 4 + 8 * (usize::from(self.used_idx) % n);
            self.put(e, &id.to_le_bytes());
            self.put(e + 4, &len.to_le_bytes());
            self.used_idx = self.used_idx.wrapping_add(advance);
            let i = self.used_idx.to_le_bytes();
            self.put(self.layout.used + 2, &i);
        }
    }

    fn seg(addr: u64, len: u32, device_writes: bool) -> Segment {
        Segment { addr, len, device_writes }
    }

    fn setup(mem: &Mem, size: u16) -> (SplitQueue, RingLayout) {
        let layout = RingLayout::new(size).unwrap();
        assert!(layout.bytes <= MEM_BYTES);
        // SAFETY: `Mem` is 16-aligned, zeroed and large enough; it outlives the queue in every
        // test, and the device model accesses it only between the queue's calls.
        let q = unsafe { SplitQueue::new(mem.0, layout) };
        (q, layout)
    }

    fn device(mem: &Mem, layout: RingLayout, last_avail: u16, used_idx: u16) -> Device<'_> {
        Device { mem, layout, last_avail, used_idx }
    }

    #[test]
    fn layouts() {
        assert_eq!(RingLayout::new(16), Some(RingLayout { size: 16, avail: 256, used: 296, bytes: 430 }));
        // 6 + 2 * 1 = 8 bytes of available ring after 16 of descriptors: used at 24.
        assert_eq!(RingLayout::new(1), Some(RingLayout { size: 1, avail: 16, used: 24, bytes: 38 }));
        assert_eq!(RingLayout::new(32768).map(|l| l.bytes), Some(524288 + 65542 + 2 + 6 + 262144));
        assert_eq!(RingLayout::new(0), None);
        assert_eq!(RingLayout::new(24), None);
        assert_eq!(RingLayout::new(65535), None);
    }

    #[test]
    fn a_request_round_trip_and_the_flags_the_device_sees() {
        let mem = Mem::new();
        let (mut q, layout) = setup(&mem, 16);
        let chain = [seg(0x1000, 16, false), seg(0x8000_0000_2000, 4096, true), seg(0x3000, 1, true)];
        assert_eq!(q.push(&chain), Ok(true));
        assert!(q.in_flight());
        assert_eq!(q.poll(), None, "nothing returned yet");
        let mut dev = device(&mem, layout, 0, 0);
        assert_eq!(dev.u16_at(layout.avail), AVAIL_F_NO_INTERRUPT);
        let (head, segs) = dev.take().unwrap();
        assert_eq!(segs, chain);
        assert_eq!(dev.take(), None);
        dev.give_back(u32::from(head), 4097, 1);
        assert_eq!(q.poll(), Some(Ok(4097)));
        assert!(!q.in_flight());
        assert_eq!(q.poll(), None);
    }

    #[test]
    fn no_notify_is_respected() {
        let mem = Mem::new();
        let (mut q, layout) = setup(&mem, 4);
        device(&mem, layout, 0, 0).put(layout.used, &USED_F_NO_NOTIFY.to_le_bytes());
        assert_eq!(q.push(&[seg(1, 1, true)]), Ok(false));
    }

    #[test]
    fn refused_chains_touch_nothing() {
        let mem = Mem::new();
        let (mut q, layout) = setup(&mem, 2);
        assert_eq!(q.push(&[]), Err(QueueError::EmptyChain));
        let three = [seg(1, 1, false), seg(2, 1, false), seg(3, 1, true)];
        assert_eq!(q.push(&three), Err(QueueError::ChainTooLong { segments: 3, size: 2 }));
        assert_eq!(q.push(&[seg(1, 1, true), seg(2, 1, false)]), Err(QueueError::ReadableAfterWritable { index: 1 }));
        assert!(!q.in_flight());
        assert_eq!(device(&mem, layout, 0, 0).take(), None, "a refused chain was published");
        assert_eq!(q.push(&[seg(1, 1, false)]), Ok(true));
        assert_eq!(q.push(&[seg(1, 1, false)]), Err(QueueError::Busy));
    }

    #[test]
    fn a_misbehaving_device_is_an_error_not_a_panic() {
        let mem = Mem::new();
        let (mut q, layout) = setup(&mem, 4);
        // Returns a chain while none is in flight.
        device(&mem, layout, 0, 0).give_back(0, 0, 1);
        assert_eq!(q.poll(), Some(Err(QueueError::UnexpectedUsed { advanced: 1, in_flight: 0 })));
        // Returns two chains for one.
        q.push(&[seg(1, 8, true)]).unwrap();
        device(&mem, layout, 0, 1).give_back(0, 8, 2);
        assert_eq!(q.poll(), Some(Err(QueueError::UnexpectedUsed { advanced: 2, in_flight: 1 })));
        // Names a chain that was never submitted.
        q.push(&[seg(1, 8, true)]).unwrap();
        device(&mem, layout, 1, 3).give_back(3, 8, 1);
        assert_eq!(q.poll(), Some(Err(QueueError::WrongId { id: 3, expected: 0 })));
        // Claims more bytes than the chain can take.
        q.push(&[seg(1, 16, false), seg(2, 8, true)]).unwrap();
        device(&mem, layout, 2, 4).give_back(0, 9, 1);
        assert_eq!(q.poll(), Some(Err(QueueError::BadLength { len: 9, writable: 8 })));
        assert_eq!(
            QueueError::BadLength { len: 9, writable: 8 }.to_string(),
            "the device claims 9 bytes written into 8 writable bytes"
        );
    }

    proptest! {
        /// Any sequence of chains, from any starting index (the 16-bit wrap included): the device
        /// model sees each valid chain exactly as submitted, and the driver gets back the length
        /// the device reported; a chain longer than the queue is refused.
        #[test]
        fn chains_arrive_as_submitted(
            size_log in 0u32..4,
            start in any::<u16>(),
            chains in prop::collection::vec(
                (prop::collection::vec((any::<u64>(), any::<u32>()), 1..=8), 0usize..=8, any::<u32>()),
                1..40,
            ),
        ) {
            let size = 1u16 << size_log;
            let mem = Mem::new();
            let (mut q, layout) = setup(&mem, size);
            // Both indices at `start`, as if `start` requests had already been completed.
            q.next_avail = start;
            q.last_used = start;
            {
                let mut dev = device(&mem, layout, start, start);
                dev.put(layout.avail + 2, &start.to_le_bytes());
                dev.put(layout.used + 2, &start.to_le_bytes());
            }
            let mut idx = start;
            for (bufs, readable, written) in chains {
                let readable = readable.min(bufs.len());
                let chain: Vec<Segment> =
                    bufs.iter().enumerate().map(|(i, &(a, l))| seg(a, l, i >= readable)).collect();
                let r = q.push(&chain);
                if chain.len() > usize::from(size) {
                    prop_assert_eq!(r, Err(QueueError::ChainTooLong { segments: chain.len(), size }));
                    continue;
                }
                prop_assert_eq!(r, Ok(true));
                let writable: u64 = chain.iter().filter(|s| s.device_writes).map(|s| u64::from(s.len)).sum();
                let len = if writable == 0 { 0 } else { (u64::from(written) % (writable + 1)) as u32 };
                let mut dev = device(&mem, layout, idx, idx);
                let (head, segs) = dev.take().unwrap();
                prop_assert_eq!(&segs, &chain);
                prop_assert_eq!(dev.take(), None);
                dev.give_back(u32::from(head), len, 1);
                prop_assert_eq!(q.poll(), Some(Ok(len)));
                idx = idx.wrapping_add(1);
            }
        }
    }
}
