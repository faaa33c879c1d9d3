//! Test-only: a configuration space held in memory, behaving as hardware does where the driver
//! depends on it: missing functions read as all-ones, read-only bits ignore writes (a per-dword
//! writable mask, as QEMU models it), BARs keep only their address bits above the size, status
//! error bits are write-one-to-clear, and nothing exists beyond the first 256 bytes.
//!
//! It also records whether a BAR was written with all-ones while the function was decoding,
//! which the sizing code must never do.

use alloc::collections::BTreeMap;

use super::{
    Bdf, ConfigSpace, Space, CAP_MSI, CAP_MSIX, CAP_VENDOR, REG_BAR0, REG_CAP_PTR, REG_CLASS,
    REG_COMMAND, REG_HEADER, REG_ID, REG_INTERRUPT, STATUS_CAP_LIST,
};

/// Dwords of the modelled (conventional) configuration space.
const DWORDS: usize = 64;
/// Command register bits a QEMU device lets software set.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Status bits that are write-one-to-clear (error reports), in the upper half of dword 1.
const STATUS_W1C: u32 = 0xf900 << 16;

pub struct FakeFunction {
    regs: [u32; DWORDS],
    wmask: [u32; DWORDS],
    /// Offset of the last capability added, to link the next one after it.
    last_cap: Option<u8>,
}

impl FakeFunction {
    fn set_byte(&mut self, off: u8, v: u8) {
        let (i, shift) = (usize::from(off / 4), u32::from(off % 4) * 8);
        self.regs[i] = self.regs[i] & !(0xff << shift) | u32::from(v) << shift;
    }

    /// Implements BAR `index` decoding `size` bytes (a power of two) of `kind`.
    pub fn bar(&mut self, index: u8, size: u64, kind: Space, prefetchable: bool) -> &mut Self {
        let i = usize::from(REG_BAR0 / 4 + u16::from(index));
        let address_bits = !(size - 1);
        let pref = if prefetchable { 1 << 3 } else { 0 };
        match kind {
            Space::Io => {
                self.regs[i] = 0x1;
                self.wmask[i] = address_bits as u32 & !0x3;
            }
            Space::Mem32 => {
                self.regs[i] = pref;
                self.wmask[i] = address_bits as u32 & !0xf;
            }
            Space::Mem64 => {
                self.regs[i] = 0b100 | pref;
                self.wmask[i] = address_bits as u32 & !0xf;
                self.regs[i + 1] = 0;
                self.wmask[i + 1] = (address_bits >> 32) as u32;
            }
        }
        self
    }

    /// An I/O BAR that decodes only 16 address bits: bits 31:16 read back as zeros.
    pub fn io_bar16(&mut self, index: u8, size: u64) -> &mut Self {
        self.bar(index, size, Space::Io, false);
        self.wmask[usize::from(REG_BAR0 / 4 + u16::from(index))] &= 0xffff;
        self
    }

    /// Sets the Interrupt Pin register (1 = INTA).
    pub fn pin(&mut self, pin: u8) -> &mut Self {
        self.set_byte(REG_INTERRUPT as u8 + 1, pin);
        self
    }

    /// Adds capability `id` at `offset` with `body` after its two header bytes, linked at the
    /// end of the list.
    pub fn cap(&mut self, offset: u8, id: u8, body: &[u8]) -> &mut Self {
        self.set_byte(offset, id);
        self.set_byte(offset + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + 2 + i as u8, *b);
        }
        match self.last_cap {
            None => self.set_byte(REG_CAP_PTR as u8, offset),
            Some(prev) => self.set_byte(prev + 1, offset),
        }
        self.last_cap = Some(offset);
        self.regs[1] |= u32::from(STATUS_CAP_LIST) << 16;
        self
    }

    /// Sets the Revision ID.
    pub fn revision(&mut self, rev: u8) -> &mut Self {
        self.set_byte(REG_CLASS as u8, rev);
        self
    }
}

#[derive(Default)]
pub struct FakeConfig {
    functions: BTreeMap<Bdf, FakeFunction>,
    sized_while_decoding: bool,
}

impl FakeConfig {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a function with no BARs, pin or capabilities; `class` is the 24-bit class code.
    pub fn add(
        &mut self,
        bdf: Bdf,
        vendor: u16,
        device: u16,
        class: u32,
        header_type: u8,
    ) -> &mut FakeFunction {
        let mut regs = [0; DWORDS];
        let mut wmask = [0; DWORDS];
        regs[usize::from(REG_ID / 4)] = u32::from(device) << 16 | u32::from(vendor);
        regs[usize::from(REG_CLASS / 4)] = class << 8;
        regs[usize::from(REG_HEADER / 4)] = u32::from(header_type) << 16;
        wmask[usize::from(REG_COMMAND / 4)] = COMMAND_WRITABLE;
        wmask[usize::from(REG_INTERRUPT / 4)] = 0xff;
        self.functions.entry(bdf).or_insert(FakeFunction {
            regs,
            wmask,
            last_cap: None,
        })
    }

    /// Writes a register directly, read-only bits included (to set up odd states).
    pub fn poke(&mut self, bdf: Bdf, off: u16, value: u32) {
        if let Some(f) = self.functions.get_mut(&bdf) {
            f.regs[usize::from(off / 4)] = value;
        }
    }

    /// Sets one byte directly (to break capability lists).
    pub fn poke8(&mut self, bdf: Bdf, off: u8, value: u8) {
        if let Some(f) = self.functions.get_mut(&bdf) {
            f.set_byte(off, value);
        }
    }

    /// Whether some BAR was written with all-ones while memory or I/O decoding was on.
    pub fn sized_while_decoding(&self) -> bool {
        self.sized_while_decoding
    }
}

impl ConfigSpace for FakeConfig {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        assert!(
            offset.is_multiple_of(4) && offset < 4096,
            "bad config offset {offset:#x}"
        );
        match self.functions.get(&bdf) {
            None => u32::MAX,
            Some(f) => f.regs.get(usize::from(offset / 4)).copied().unwrap_or(0),
        }
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        assert!(
            offset.is_multiple_of(4) && offset < 4096,
            "bad config offset {offset:#x}"
        );
        let Some(f) = self.functions.get_mut(&bdf) else {
            return;
        };
        let i = usize::from(offset / 4);
        if i >= DWORDS {
            return;
        }
        let is_bar = (REG_BAR0..REG_BAR0 + 24).contains(&offset);
        if is_bar && value == u32::MAX && f.regs[1] & 0x3 != 0 {
            self.sized_while_decoding = true;
        }
        let mut new = f.regs[i] & !f.wmask[i] | value & f.wmask[i];
        if offset == REG_COMMAND {
            new &= !(value & STATUS_W1C);
        }
        f.regs[i] = new;
    }
}

fn bdf(device: u8, function: u8) -> Bdf {
    Bdf::new(0, device, function).unwrap()
}

/// A virtio vendor-specific capability body: cap_len, cfg_type, bar, id, padding, offset,
/// length (virtio 1.2, section 4.1.4), plus the notify multiplier for cfg_type 2.
fn virtio_cap(cfg_type: u8, bar: u8, offset: u32, length: u32) -> alloc::vec::Vec<u8> {
    let len: u8 = if cfg_type == 2 { 20 } else { 16 };
    let mut body = alloc::vec![len, cfg_type, bar, 0, 0, 0];
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    if cfg_type == 2 {
        body.extend_from_slice(&4u32.to_le_bytes());
    }
    body
}

/// A bus like QEMU virt's with `-nic none -device virtio-rng-pci,disable-legacy=on -device edu
/// -device virtio-net-pci`, plus two made-up devices for the cases QEMU's do not cover:
///
/// | bdf     | id        | BARs                                                      | pin |
/// |---------|-----------|-----------------------------------------------------------|-----|
/// | 00:00.0 | 1b36:0008 | (host bridge)                                             | -   |
/// | 00:01.0 | 1af4:1044 | 1: mem32 4K (MSI-X), 4: mem64 pref 16K (virtio regions)   | A   |
/// | 00:02.0 | 1234:11e8 | 0: mem32 1M (edu)                                         | A   |
/// | 00:03.0 | 1af4:1000 | 0: io 32, 1: mem32 4K, 4: mem64 pref 16K (transitional)   | A   |
/// | 00:04.0 | abcd:0001 | 0: mem64 64K, 2: io 16 (16-bit decode), 5: mem32 pref 8K  | -   |
/// | 00:04.2 | abcd:0002 | 0: mem32 512K                                             | C   |
/// | 00:1f.0 | abcd:0003 | none                                                      | -   |
///
/// 00:04.0 is multi-function (functions 0 and 2). Capability lists: 00:01.0 MSI-X at 0x98, then
/// virtio pci-cfg 0x84, notify 0x70, device 0x60, ISR 0x50, common 0x40 (QEMU's order); 00:02.0
/// MSI at 0x40, and a detected-parity-error status bit that must survive.
pub fn qemu_like() -> FakeConfig {
    let mut cfg = FakeConfig::new();
    cfg.add(bdf(0, 0), 0x1b36, 0x0008, 0x060000, 0);
    cfg.add(bdf(1, 0), 0x1af4, 0x1044, 0x00ff00, 0)
        .revision(1)
        .bar(1, 4 << 10, Space::Mem32, false)
        .bar(4, 16 << 10, Space::Mem64, true)
        .pin(1)
        // Message control: 3 vectors; table in BAR1 at 0, PBA in BAR1 at 0x800.
        .cap(0x98, CAP_MSIX, &[2, 0, 1, 0, 0, 0, 0x01, 0x08, 0, 0])
        .cap(0x84, CAP_VENDOR, &virtio_cap(5, 0, 0, 0))
        .cap(0x70, CAP_VENDOR, &virtio_cap(2, 4, 0x3000, 0x1000))
        .cap(0x60, CAP_VENDOR, &virtio_cap(4, 4, 0x2000, 0x1000))
        .cap(0x50, CAP_VENDOR, &virtio_cap(3, 4, 0x1000, 0x1000))
        .cap(0x40, CAP_VENDOR, &virtio_cap(1, 4, 0x0000, 0x1000));
    cfg.add(bdf(2, 0), 0x1234, 0x11e8, 0x00ff00, 0)
        .revision(0x10)
        .bar(0, 1 << 20, Space::Mem32, false)
        .pin(1)
        // Message control: 64-bit address capable.
        .cap(0x40, CAP_MSI, &[0x80, 0]);
    let status = cfg.read32(bdf(2, 0), REG_COMMAND) | 0x8000 << 16;
    cfg.poke(bdf(2, 0), REG_COMMAND, status);
    cfg.add(bdf(3, 0), 0x1af4, 0x1000, 0x020000, 0)
        .bar(0, 32, Space::Io, false)
        .bar(1, 4 << 10, Space::Mem32, false)
        .bar(4, 16 << 10, Space::Mem64, true)
        .pin(1);
    cfg.add(bdf(4, 0), 0xabcd, 0x0001, 0x058000, 0x80)
        .bar(0, 64 << 10, Space::Mem64, false)
        .io_bar16(2, 16)
        .bar(5, 8 << 10, Space::Mem32, true);
    cfg.add(bdf(4, 2), 0xabcd, 0x0002, 0x058000, 0)
        .bar(0, 512 << 10, Space::Mem32, false)
        .pin(3);
    cfg.add(bdf(31, 0), 0xabcd, 0x0003, 0x088000, 0);
    cfg
}
