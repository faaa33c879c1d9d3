//! virtio-blk over virtio-pci (virtio 1.2, 5.2): reads, writes and flushes of 512-byte sectors on
//! one request queue, one request at a time.
//!
//! A request is a chain of three buffers, each a streaming DMA mapping in its direction: the
//! 16-byte header (`le32 type, le32 reserved, le64 sector`, device-readable), the data
//! (device-writable for a read, device-readable for a write; absent for a flush) and the status
//! byte (device-writable). The header and the status byte each own a cache line of a small
//! buffer of the driver's, so that neither shares a line with the caller's data or with each
//! other (a non-coherent device's status write must not be lost to, or clobber, a neighbour's
//! line). The status byte is set to 0xff before each request, so a device that completes without
//! writing it is caught.
//!
//! Transfers larger than [`MAX_REQUEST_BYTES`] are split into several requests, so that every
//! mapping fits a bounce buffer when the DMA layer bounces (Linux's virtio-blk sizes its requests
//! by `dma_max_mapping_size` for the same reason).

use super::VirtioError;

/// virtio device type of a block device.
pub const DEVICE_TYPE: u16 = 2;
/// The modern-only PCI device ID (0x1040 + 2).
pub const DEVICE_ID: u16 = super::MODERN_DEVICE_BASE + DEVICE_TYPE;
/// The transitional PCI device ID (a function that also has the legacy interface).
pub const TRANSITIONAL_DEVICE_ID: u16 = 0x1001;
/// The unit of the protocol, whatever the disk's own block size.
pub const SECTOR_SIZE: usize = 512;
/// The largest transfer of one request: the largest bounce-buffer mapping.
pub const MAX_REQUEST_BYTES: usize = crate::dma::swiotlb::MAX_MAPPING_SIZE as usize;

/// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
/// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What the driver puts in the status byte before a request: not a status the device may
/// write, so a completion without one is caught.
pub const STATUS_UNWRITTEN: u8 = 0xff;

/// The device is read-only.
pub const F_RO: u64 = 1 << 5;
/// The device has a volatile write cache that VIRTIO_BLK_T_FLUSH writes back.
pub const F_FLUSH: u64 = 1 << 9;
/// The device-specific features the driver accepts.
pub const DRIVER_FEATURES: u64 = F_RO | F_FLUSH;

/// Whether `vendor:device` is a virtio-blk PCI function with the modern interface (modern-only,
/// or transitional, which has it too).
pub fn is_virtio_blk(vendor: u16, device: u16) -> bool {
    vendor == super::VENDOR && (device == DEVICE_ID || device == TRANSITIONAL_DEVICE_ID)
}

/// The request header for `kind` at `sector`.
pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// The outcome of a request at `sector` whose status byte reads `status`.
pub fn status_result(status: u8, sector: u64) -> Result<(), VirtioError> {
    match status {
        S_OK => Ok(()),
        S_IOERR => Err(VirtioError::IoError { sector }),
        S_UNSUPP => Err(VirtioError::Unsupported { sector }),
        _ => Err(VirtioError::BadStatus { sector, status }),
    }
}

/// Checks a transfer of `len` bytes at `sector` on a disk of `capacity` sectors: a non-zero
/// whole number of sectors, all of them on the disk.
pub fn check_range(capacity: u64, sector: u64, len: usize) -> Result<(), VirtioError> {
    if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
        return Err(VirtioError::BadLength { len });
    }
    let count = (len / SECTOR_SIZE) as u64;
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(VirtioError::OutOfRange { sector, count, capacity }),
    }
}

#[cfg(target_os = "none")]
pub use kernel::{VirtioBlk, REQUEST_TIMEOUT_MS};

#[cfg(target_os = "none")]
mod kernel {
    use alloc::vec;
    use alloc::vec::Vec;

    use super::*;
    use crate::dma::Device;
    use crate::drivers::pci::PciDevice;
    use crate::drivers::virtio_pci::{Features, Mapped, VirtioPci, Virtqueue};

    /// Descriptors asked for: one request (three buffers) at a time needs no more.
    const QUEUE_SIZE: u16 = 8;
    const CHAIN_LEN: u16 = 3;
    /// How long one request may take by default (generous for QEMU under TCG on a loaded host).
    pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
    /// Alignment and size of the header's and the status byte's lines: the largest cache line
    /// writeback granule Linux expects on Arm (`ARCH_DMA_MINALIGN` on arm64), or the CPU's line
    /// if larger.
    const MIN_DMA_ALIGN: usize = 128;
    /// `capacity` in the device configuration.
    const CONFIG_CAPACITY: u32 = 0;

    /// The header and status buffers: each in its own cache line of `buf`.
    struct RequestLines {
        buf: Vec<u8>,
        header: usize,
        line: usize,
    }

    impl RequestLines {
        fn new() -> RequestLines {
            let line = crate::arch::cache::line_size().max(MIN_DMA_ALIGN);
            // Three lines: wherever the allocation starts, two whole lines follow the first
            // line boundary in it. The vector is never resized, so the lines never move.
            let buf = vec![0u8; 3 * line];
            let header = (line - buf.as_ptr() as usize % line) % line;
            RequestLines { buf, header, line }
        }

        /// The header's and the status byte's buffers.
        fn split(&mut self) -> (&mut [u8], &mut [u8]) {
            let (h, s) = self.buf[self.header..].split_at_mut(self.line);
            (&mut h[..16], &mut s[..1])
        }

        fn status(&self) -> u8 {
            self.buf[self.header + self.line]
        }
    }

    /// The data part of a request.
    enum Data<'a> {
        None,
        In(&'a mut [u8]),
        Out(&'a [u8]),
    }

    /// A virtio-blk PCI function, initialised (DRIVER_OK) with its request queue.
    pub struct VirtioBlk {
        // Declared first, so dropped first: the transport's drop resets the device, which then
        // no longer accesses the queue's memory freed right after.
        transport: VirtioPci,
        queue: Virtqueue,
        capacity: u64,
        lines: RequestLines,
        timeout_ms: u64,
    }

    impl VirtioBlk {
        /// Initialises the virtio-blk function `pdev`: features (VERSION_1, ACCESS_PLATFORM when
        /// offered, RO and FLUSH when offered), request queue 0, DRIVER_OK, capacity.
        pub fn probe(pdev: &PciDevice) -> Result<VirtioBlk, VirtioError> {
            if !is_virtio_blk(pdev.vendor, pdev.device) {
                return Err(VirtioError::WrongDevice { bdf: pdev.bdf, vendor: pdev.vendor, device: pdev.device });
            }
            let transport = VirtioPci::new(pdev, DRIVER_FEATURES)?;
            let queue = transport.setup_queue(0, QUEUE_SIZE, CHAIN_LEN)?;
            let ready = transport.driver_ok().and_then(|()| transport.read_config_u64(CONFIG_CAPACITY));
            match ready {
                Ok(capacity) => {
                    Ok(VirtioBlk { transport, queue, capacity, lines: RequestLines::new(), timeout_ms: REQUEST_TIMEOUT_MS })
                }
                Err(e) => {
                    // The device must let go of the queue before its memory is freed.
                    if let Err(r) = transport.reset() {
                        crate::println!("virtio-pci {}: reset after a failed probe: {r}", pdev.bdf);
                    }
                    drop(queue);
                    Err(e)
                }
            }
        }

        /// How long a request may take before the device is reset and the request fails
        /// ([`VirtioError::Timeout`]); [`REQUEST_TIMEOUT_MS`] unless set here.
        pub fn set_request_timeout_ms(&mut self, ms: u64) {
            self.timeout_ms = ms;
        }

        /// Has the request queue call `observer` around each wait for the device (see
        /// [`Virtqueue::set_wait_observer`](crate::drivers::virtio_pci::Virtqueue::set_wait_observer)).
        pub fn set_wait_observer(&mut self, observer: Option<fn(bool)>) {
            self.queue.set_wait_observer(observer);
        }

        /// Disk size in 512-byte sectors.
        pub fn capacity(&self) -> u64 {
            self.capacity
        }

        /// Whether the device is read-only (writes are refused).
        pub fn read_only(&self) -> bool {
            self.transport.features().accepted & F_RO != 0
        }

        pub fn features(&self) -> Features {
            self.transport.features()
        }

        /// The DMA device the requests are mapped for.
        pub fn dma_device(&self) -> &'static Device {
            self.transport.dma_device()
        }

        pub fn transport(&self) -> &VirtioPci {
            &self.transport
        }

        /// Reads `buf.len()` bytes (whole sectors) from `sector` on. `buf` must lie in the
        /// kernel's linear map (heap, statics, stacks), as for
        /// [`Device::map_single`](crate::dma::Device::map_single).
        pub fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
            check_range(self.capacity, sector, buf.len())?;
            let mut at = sector;
            for chunk in buf.chunks_mut(MAX_REQUEST_BYTES) {
                let sectors = (chunk.len() / SECTOR_SIZE) as u64;
                self.request(T_IN, at, Data::In(chunk))?;
                at += sectors;
            }
            Ok(())
        }

        /// Writes `buf` (whole sectors) from `sector` on; refused on a read-only device. `buf`
        /// must lie in the kernel's linear map, as for [`VirtioBlk::read_sectors`].
        pub fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<(), VirtioError> {
            check_range(self.capacity, sector, buf.len())?;
            if self.read_only() {
                return Err(VirtioError::ReadOnly);
            }
            let mut at = sector;
            for chunk in buf.chunks(MAX_REQUEST_BYTES) {
                let sectors = (chunk.len() / SECTOR_SIZE) as u64;
                self.request(T_OUT, at, Data::Out(chunk))?;
                at += sectors;
            }
            Ok(())
        }

        /// Makes completed writes durable: a flush request if the device has a volatile write
        /// cache (VIRTIO_BLK_F_FLUSH), nothing otherwise (its writes are durable on completion).
        pub fn flush(&mut self) -> Result<(), VirtioError> {
            if self.transport.features().accepted & F_FLUSH == 0 {
                return Ok(());
            }
            self.request(T_FLUSH, 0, Data::None)
        }

        /// One request: maps its buffers, runs the chain, unmaps (whatever happened, after the
        /// queue has made sure the device is done with them), then checks the status byte.
        fn request(&mut self, kind: u32, sector: u64, data: Data<'_>) -> Result<(), VirtioError> {
            let dev = self.transport.dma_device();
            let (hdr_buf, status_buf) = self.lines.split();
            hdr_buf.copy_from_slice(&header(kind, sector));
            status_buf[0] = STATUS_UNWRITTEN;
            let hdr = Mapped::to_device(dev, hdr_buf)?;
            let data = match data {
                Data::None => None,
                Data::In(b) => Some(Mapped::from_device(dev, b)?),
                Data::Out(b) => Some(Mapped::to_device(dev, b)?),
            };
            let status = Mapped::from_device(dev, status_buf)?;
            let mut segs = [hdr.segment(); CHAIN_LEN as usize];
            let mut n = 1;
            if let Some(d) = &data {
                segs[n] = d.segment();
                n += 1;
            }
            segs[n] = status.segment();
            n += 1;
            let ran = self.queue.run(&segs[..n], self.timeout_ms);
            // Unmap everything even if a step fails; report the first failure.
            let unmapped = [Some(status), data, Some(hdr)]
                .into_iter()
                .flatten()
                .map(Mapped::unmap)
                .fold(Ok(()), Result::and);
            ran?;
            unmapped?;
            status_result(self.lines.status(), sector)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_by_the_specification() {
        assert_eq!(header(T_IN, 0), [0; 16]);
        assert_eq!(
            header(T_OUT, 0x0102_0304_0506_0708),
            [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]
        );
        assert_eq!(header(T_FLUSH, 0)[0], 4);
    }

    #[test]
    fn status_bytes() {
        assert!(status_result(S_OK, 3).is_ok());
        assert!(matches!(status_result(S_IOERR, 3), Err(VirtioError::IoError { sector: 3 })));
        assert!(matches!(status_result(S_UNSUPP, 3), Err(VirtioError::Unsupported { sector: 3 })));
        let e = status_result(STATUS_UNWRITTEN, 7).unwrap_err();
        assert!(matches!(e, VirtioError::BadStatus { sector: 7, status: 0xff }));
        assert_eq!(e.to_string(), "undefined status 0xff for the request at sector 7");
    }

    #[test]
    fn ranges() {
        assert!(check_range(4096, 0, 512).is_ok());
        assert!(check_range(4096, 4095, 512).is_ok());
        assert!(check_range(4096, 0, 4096 * 512).is_ok());
        assert!(matches!(check_range(4096, 4095, 1024), Err(VirtioError::OutOfRange { sector: 4095, count: 2, capacity: 4096 })));
        assert!(matches!(check_range(4096, u64::MAX, 512), Err(VirtioError::OutOfRange { .. })));
        assert!(matches!(check_range(4096, 0, 0), Err(VirtioError::BadLength { len: 0 })));
        assert!(matches!(check_range(4096, 0, 100), Err(VirtioError::BadLength { len: 100 })));
        assert_eq!(
            check_range(4096, 4095, 1024).unwrap_err().to_string(),
            "sectors 4095+2 are beyond the disk's 4096 sectors"
        );
    }

    #[test]
    fn device_ids() {
        assert!(is_virtio_blk(0x1af4, 0x1042));
        assert!(is_virtio_blk(0x1af4, 0x1001));
        assert!(!is_virtio_blk(0x1af4, 0x1044), "virtio-rng");
        assert!(!is_virtio_blk(0x1234, 0x1042));
        assert_eq!(MAX_REQUEST_BYTES, 256 << 10);
    }
}
