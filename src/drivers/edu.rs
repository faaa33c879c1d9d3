//! QEMU's `edu` teaching device (PCI 1234:11e8): its DMA engine copies between RAM (a bus
//! address) and a 4 KiB internal buffer at device address [`BUF_BASE`]. Used to prove the DMA API
//! against a real bus master: registers per hw/misc/edu.c.
//!
//! The engine starts when the command register is written and runs for 100 ms of virtual time;
//! completion is polled (command bit 0 clears). QEMU kills the whole machine on a transfer that
//! is empty or reaches the end of the buffer, so [`Edu::transfer`] refuses those before touching
//! the device. The bus address is truncated by QEMU to the device's `dma_mask` property (28 bits
//! unless `-device edu,dma_mask=...`), which the driver cannot read back: the bootarg
//! `edu.dma_mask=<hex>` tells it (default the hardware's 28 bits), and the DMA mask it sets on its
//! device is that value.

use core::fmt;

use crate::dma::busmap::DmaAddr;
use crate::dma::Device;
use crate::drivers::pci::ecam;
use crate::mm::kmap;

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x11e8;
/// Device address of the internal buffer.
pub const BUF_BASE: u64 = 0x40000;
/// Usable bytes of the internal buffer: a transfer ending at 0x41000 aborts QEMU.
pub const BUF_LEN: u64 = 4095;
/// The hardware's default DMA mask (`dma_mask` property of QEMU's model).
pub const DEFAULT_DMA_MASK: u64 = (1 << 28) - 1;

const REG_ID: usize = 0x00;
const REG_SRC: usize = 0x80;
const REG_DST: usize = 0x88;
const REG_CNT: usize = 0x90;
const REG_CMD: usize = 0x98;
const CMD_START: u32 = 1;
const CMD_TO_RAM: u32 = 2;
/// Polling gives up after this long (the engine takes 100 ms).
const TIMEOUT_NS: u64 = 2_000_000_000;

#[derive(Debug)]
pub enum EduError {
    NotFound,
    Pci(&'static ecam::EcamError),
    NoBar,
    Map(kmap::KmapError),
    BadId(u32),
    Dt(crate::dt::DtError),
    /// A transfer that is empty or leaves the internal buffer.
    BadTransfer { offset: u64, len: u64 },
    /// A bus address above 4 GiB on a CPU without 64-bit MMIO writes.
    AddressTooWide(DmaAddr),
    Timeout,
}

impl fmt::Display for EduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EduError::NotFound => f.write_str("no edu device (1234:11e8) on the PCI bus"),
            EduError::Pci(e) => write!(f, "PCI: {e}"),
            EduError::NoBar => f.write_str("edu has no BAR0"),
            EduError::Map(e) => write!(f, "mapping BAR0: {e:?}"),
            EduError::BadId(id) => write!(f, "unexpected identification register {id:#010x}"),
            EduError::Dt(e) => write!(f, "host bridge node: {e}"),
            EduError::BadTransfer { offset, len } => {
                write!(f, "transfer of {len} bytes at buffer offset {offset:#x} leaves 1..={BUF_LEN} bytes of the buffer")
            }
            EduError::AddressTooWide(a) => write!(f, "bus address {a} needs a 64-bit register write"),
            EduError::Timeout => f.write_str("the DMA engine did not finish in 2 s"),
        }
    }
}

/// One edu function: its registers and the DMA device it masters as.
pub struct Edu {
    regs: usize,
    pub dev: Device,
}

/// Whether the device reads RAM (`ToDevice`) or writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EduDir {
    RamToEdu,
    EduToRam,
}

impl Edu {
    /// The first edu function on the PCI bus, with a [`Device`] that inherits the host bridge's
    /// bus map and coherence (`dma.noncoherent` overrides it) and the default masks; the caller
    /// sets the mask it knows the device has.
    pub fn probe() -> Result<Edu, EduError> {
        Self::probe_nth(0)
    }

    /// As [`Edu::probe`], for the `n`th edu function (0-based, in bus order): QEMU runs may add
    /// several, e.g. with different `dma_mask`s.
    pub fn probe_nth(n: usize) -> Result<Edu, EduError> {
        let bus = ecam::bus().map_err(EduError::Pci)?;
        let pdev = bus.devices.iter().filter(|d| d.vendor == VENDOR && d.device == DEVICE).nth(n).ok_or(EduError::NotFound)?;
        let bar = pdev.bar(0).ok_or(EduError::NoBar)?;
        let regs = kmap::ioremap(bar.cpu_addr.as_u64(), bar.size).map_err(EduError::Map)?;
        let dev = ecam::dma_device(pdev).map_err(EduError::Dt)?;
        let edu = Edu { regs, dev };
        match edu.read(REG_ID) {
            id if id & 0xff == 0xed => Ok(edu),
            id => Err(EduError::BadId(id)),
        }
    }

    fn read(&self, reg: usize) -> u32 {
        // SAFETY: a 4-byte register of BAR0, mapped as device memory by `probe`.
        unsafe { core::ptr::read_volatile((self.regs + reg) as *const u32) }
    }

    fn write(&self, reg: usize, v: u32) {
        // SAFETY: as in `read`; the driver owns the device.
        unsafe { core::ptr::write_volatile((self.regs + reg) as *mut u32, v) }
    }

    /// A 64-bit DMA register: a 4-byte write zero-extends, which covers every 32-bit address.
    fn write_addr(&self, reg: usize, v: u64) -> Result<(), EduError> {
        if let Ok(v32) = u32::try_from(v) {
            self.write(reg, v32);
            return Ok(());
        }
        #[cfg(target_pointer_width = "64")]
        {
            // SAFETY: as in `read`; from offset 0x80 the device takes 8-byte accesses.
            unsafe { core::ptr::write_volatile((self.regs + reg) as *mut u64, v) };
            Ok(())
        }
        #[cfg(not(target_pointer_width = "64"))]
        Err(EduError::AddressTooWide(DmaAddr(v)))
    }

    /// Copies `len` bytes between bus address `ram` and the internal buffer at `offset`, and waits
    /// for the engine. `ram` must be a live mapping of the device in the matching direction.
    pub fn transfer(&self, dir: EduDir, ram: DmaAddr, offset: u64, len: u64) -> Result<(), EduError> {
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > BUF_LEN) {
            return Err(EduError::BadTransfer { offset, len });
        }
        let (src, dst, cmd) = match dir {
            EduDir::RamToEdu => (ram.as_u64(), BUF_BASE + offset, CMD_START),
            EduDir::EduToRam => (BUF_BASE + offset, ram.as_u64(), CMD_START | CMD_TO_RAM),
        };
        self.write_addr(REG_SRC, src)?;
        self.write_addr(REG_DST, dst)?;
        self.write_addr(REG_CNT, len)?;
        self.write(REG_CMD, cmd);
        let freq = crate::arch::counter::frequency().max(1);
        let start = crate::arch::counter::read();
        while self.read(REG_CMD) & CMD_START != 0 {
            let ns = (crate::arch::counter::read().wrapping_sub(start) as u128 * 1_000_000_000 / freq as u128) as u64;
            if ns > TIMEOUT_NS {
                return Err(EduError::Timeout);
            }
            core::hint::spin_loop();
        }
        Ok(())
    }
}

/// The mask the edu device was given on the QEMU command line, from `edu.dma_mask=<hex>`.
pub fn configured_mask() -> u64 {
    crate::kernel::boot_info()
        .bootargs
        .get("edu.dma_mask")
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(DEFAULT_DMA_MASK)
}
