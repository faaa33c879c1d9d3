//! The BCM2835 auxiliary ("mini") UART, "brcm,bcm2835-aux-uart": polled transmit for the console.
//! It is the UART on GPIO 14/15 of the Raspberry Pi 3 and 4 (the PL011 drives Bluetooth there), so
//! the downstream device trees' stdout-path names it. Registers from the BCM2835 ARM Peripherals
//! manual, section 2.2.
//!
//! The UART lives inside the AUX block, whose AUX_ENABLES register (bit 0: mini UART) gates its
//! registers; the block starts 0x40 below the UART's own registers (the DT's "brcm,bcm2835-aux" node
//! at 0x7e215000, the UART at 0x7e215040), so both are in the page the console maps.

use core::ptr::{read_volatile, write_volatile};

/// Offset of the UART's registers from the start of the AUX block.
pub const AUX_UART_OFFSET: usize = 0x40;

// Register offsets from the UART's base (the DT's `reg`).
const IO: usize = 0x00;
const IER: usize = 0x04;
const IIR: usize = 0x08;
const LCR: usize = 0x0c;
const MCR: usize = 0x10;
const LSR: usize = 0x14;
const CNTL: usize = 0x20;
const BAUD: usize = 0x28;
/// AUX_ENABLES, relative to the UART's base.
const AUX_ENABLES: isize = 0x04 - AUX_UART_OFFSET as isize;

const ENABLES_UART: u32 = 1 << 0;
/// LSR: the transmit FIFO can accept a byte.
const LSR_TX_EMPTY: u32 = 1 << 5;
/// LSR: the FIFO is empty and the transmitter idle.
const LSR_TX_IDLE: u32 = 1 << 6;
const CNTL_RX_TX: u32 = 0b11;
/// LCR: 8-bit words (the manual documents bit 0 only; both low bits must be set for 8 bits).
const LCR_8BIT: u32 = 0b11;
/// IIR: clear both FIFOs.
const IIR_CLEAR_FIFOS: u32 = 0b110;

/// Status polls before [`MiniUart::flush`] gives up (far longer than a full FIFO takes at 115200).
const FLUSH_SPINS: u32 = 10_000_000;

/// The clock the mini UART's divider counts when nothing better is known: the VPU ("core") clock,
/// which the firmware fixes at 250 MHz on the Pi 3 when `enable_uart=1` (the mini UART's rate
/// follows that clock). Only used when the firmware left the UART disabled.
pub const ASSUMED_CORE_CLOCK_HZ: u32 = 250_000_000;
/// The rate the firmware and every Pi serial console guide use.
pub const BAUD_RATE: u32 = 115_200;

/// BAUD register value for `rate` from `clock`: rate = clock / (8 * (BAUD + 1)).
pub const fn baud_divisor(clock: u32, rate: u32) -> u32 {
    let d = clock / (8 * rate);
    if d == 0 { 0 } else { d - 1 }
}

pub struct MiniUart {
    base: usize,
}

// SAFETY: every access is a single MMIO read or write through `&self`; the console lock serialises
// whole lines.
unsafe impl Sync for MiniUart {}
// SAFETY: as above; the address is MMIO, not thread-local data.
unsafe impl Send for MiniUart {}

impl MiniUart {
    /// # Safety
    /// `base` must be the mapped address of the mini UART's registers, with the AUX block's first
    /// [`AUX_UART_OFFSET`] bytes below it mapped too, used by nobody else.
    pub const unsafe fn new(base: usize) -> Self {
        MiniUart { base }
    }

    fn read(&self, off: isize) -> u32 {
        // SAFETY: `new`'s contract: the UART's registers and the AUX block below them are mapped.
        unsafe { read_volatile((self.base as isize + off) as *const u32) }
    }

    fn write(&self, off: isize, v: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.base as isize + off) as *mut u32, v) }
    }

    /// Makes the UART usable for output. If the firmware already enabled it (`enable_uart=1` on a
    /// real Pi: AUX_ENABLES bit 0 and the transmitter on), its set-up is kept as it is: the firmware
    /// knows the clock and printed through it. Otherwise the UART is enabled at [`BAUD_RATE`] 8N1
    /// with no interrupts, assuming [`ASSUMED_CORE_CLOCK_HZ`]; the GPIO pin functions are left as
    /// they are (QEMU has no pins; on hardware the firmware sets them with the UART). Returns whether
    /// the firmware's set-up was kept.
    pub fn init(&self) -> bool {
        let enables = self.read(AUX_ENABLES);
        if enables & ENABLES_UART != 0 && self.read(CNTL as isize) & 0b10 != 0 {
            return true;
        }
        self.write(AUX_ENABLES, enables | ENABLES_UART);
        self.write(CNTL as isize, 0);
        self.write(IER as isize, 0);
        self.write(LCR as isize, LCR_8BIT);
        self.write(MCR as isize, 0);
        self.write(IIR as isize, IIR_CLEAR_FIFOS);
        self.write(BAUD as isize, baud_divisor(ASSUMED_CORE_CLOCK_HZ, BAUD_RATE));
        self.write(CNTL as isize, CNTL_RX_TX);
        false
    }

    fn put(&self, b: u8) {
        while self.read(LSR as isize) & LSR_TX_EMPTY == 0 {
            core::hint::spin_loop();
        }
        self.write(IO as isize, u32::from(b));
    }
}

impl crate::console::Console for MiniUart {
    fn write_bytes(&self, bytes: &[u8]) {
        for &b in bytes {
            self.put(b);
        }
    }

    fn flush(&self) {
        // Bounded: a UART whose clock is off never goes idle, and power-off must still happen.
        for _ in 0..FLUSH_SPINS {
            if self.read(LSR as isize) & LSR_TX_IDLE != 0 {
                return;
            }
            core::hint::spin_loop();
        }
    }
}
