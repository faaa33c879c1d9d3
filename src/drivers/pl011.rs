//! Arm PrimeCell UART (PL011), "arm,pl011": polled transmit for the console.
//! Registers from the PL011 Technical Reference Manual (DDI 0183), section 3.

use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

register_bitfields! {u32,
    FR [
        /// Transmit FIFO full.
        TXFF OFFSET(5) NUMBITS(1) [],
        /// UART busy transmitting.
        BUSY OFFSET(3) NUMBITS(1) []
    ],
    LCR_H [
        WLEN OFFSET(5) NUMBITS(2) [EightBit = 0b11],
        FEN OFFSET(4) NUMBITS(1) []
    ],
    CR [
        RXE OFFSET(9) NUMBITS(1) [],
        TXE OFFSET(8) NUMBITS(1) [],
        UARTEN OFFSET(0) NUMBITS(1) []
    ],
    ICR [ ALL OFFSET(0) NUMBITS(11) [] ]
}

register_structs! {
    Registers {
        (0x00 => dr: ReadWrite<u32>),
        (0x04 => _reserved0),
        (0x18 => fr: ReadOnly<u32, FR::Register>),
        (0x1c => _reserved1),
        (0x2c => lcr_h: ReadWrite<u32, LCR_H::Register>),
        (0x30 => cr: ReadWrite<u32, CR::Register>),
        (0x34 => _reserved2),
        (0x44 => icr: WriteOnly<u32, ICR::Register>),
        (0x48 => @END),
    }
}

pub struct Pl011 {
    regs: *const Registers,
}

// SAFETY: the registers are only written through `&self` methods that each perform single MMIO
// accesses; the console lock serialises whole lines.
unsafe impl Sync for Pl011 {}
// SAFETY: as above; the pointer is to MMIO, not to thread-local data.
unsafe impl Send for Pl011 {}

impl Pl011 {
    /// # Safety
    /// `base` must be the mapped address of a PL011's register block, used by nobody else.
    pub const unsafe fn new(base: usize) -> Self {
        Pl011 { regs: base as *const Registers }
    }

    fn regs(&self) -> &Registers {
        // SAFETY: `new`'s contract: base points at the device's mapped registers.
        unsafe { &*self.regs }
    }

    /// Enable transmit and receive with 8-bit words and FIFOs. The baud-rate divisors are left as
    /// the firmware (or QEMU) set them: the UART clock is board-specific and the loader already
    /// printed through this UART at the configured rate.
    pub fn init(&self) {
        let r = self.regs();
        r.cr.set(0);
        r.icr.write(ICR::ALL::SET);
        r.lcr_h.write(LCR_H::WLEN::EightBit + LCR_H::FEN::SET);
        r.cr.write(CR::UARTEN::SET + CR::TXE::SET + CR::RXE::SET);
    }

    fn put(&self, b: u8) {
        let r = self.regs();
        while r.fr.is_set(FR::TXFF) {
            core::hint::spin_loop();
        }
        r.dr.set(b as u32);
    }

    /// Wait until everything written has left the transmitter (before powering off).
    pub fn flush(&self) {
        while self.regs().fr.is_set(FR::BUSY) {
            core::hint::spin_loop();
        }
    }
}

impl crate::console::Console for Pl011 {
    fn write_bytes(&self, bytes: &[u8]) {
        for &b in bytes {
            self.put(b);
        }
    }

    fn flush(&self) {
        Pl011::flush(self);
    }
}
