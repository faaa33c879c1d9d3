//! Polled console UARTs: the PL011 and the BCM2835 mini UART, left as the firmware configured them
//! (baud rate, line format); the loader only moves bytes.

use crate::dt::UartKind;

// PL011 (Arm PrimeCell UART TRM): data register, flag register and its bits.
const PL011_DR: usize = 0x00;
const PL011_FR: usize = 0x18;
const PL011_FR_BUSY: u32 = 1 << 3;
const PL011_FR_RXFE: u32 = 1 << 4;
const PL011_FR_TXFF: u32 = 1 << 5;
const PL011_LCR_H: usize = 0x2c;
const PL011_LCR_H_FEN: u32 = 1 << 4;
const PL011_CR: usize = 0x30;
const PL011_CR_UARTEN: u32 = 1 << 0;

// Mini UART (BCM2835 ARM Peripherals 2.2), offsets from its own block (AUX base + 0x40).
const MU_IO: usize = 0x00;
const MU_LSR: usize = 0x14;
const MU_LSR_DATA_READY: u32 = 1 << 0;
const MU_LSR_TX_EMPTY: u32 = 1 << 5;
const MU_LSR_TX_IDLE: u32 = 1 << 6;
/// AUX_ENABLES, relative to the mini UART block: bit 0 gates the mini UART's registers (the Pi
/// firmware sets it with enable_uart=1; QEMU starts with it clear).
const MU_AUX_ENABLES: isize = 0x04 - 0x40;

pub struct Uart {
    base: usize,
    kind: UartKind,
}

impl Uart {
    /// # Safety
    /// `base` must be the physical address of a `kind` UART's registers, accessed with the MMU
    /// off (so physical = virtual), and nothing else may drive that UART.
    pub unsafe fn new(kind: UartKind, base: usize) -> Self {
        let u = Uart { base, kind };
        if kind == UartKind::Pl011 && u.reg(PL011_LCR_H) & PL011_LCR_H_FEN == 0 {
            // Turn the 16-byte FIFOs on (the Pi firmware does; QEMU starts without), in the order
            // the PL011 TRM asks for: transmitter idle, UART disabled, LCR_H, UART as it was.
            // With a one-byte receive register a loader busy storing bytes can lose input.
            let cr = u.reg(PL011_CR);
            while u.reg(PL011_FR) & PL011_FR_BUSY != 0 {}
            u.set(PL011_CR, cr & !PL011_CR_UARTEN);
            u.set(PL011_LCR_H, u.reg(PL011_LCR_H) | PL011_LCR_H_FEN);
            u.set(PL011_CR, cr);
        }
        if kind == UartKind::MiniUart {
            let en = base.wrapping_add_signed(MU_AUX_ENABLES);
            // SAFETY: AUX_ENABLES belongs to the same AUX block as the mini UART (fixed layout).
            unsafe { core::ptr::write_volatile(en as *mut u32, core::ptr::read_volatile(en as *const u32) | 1) };
        }
        u
    }

    fn reg(&self, off: usize) -> u32 {
        // SAFETY: `off` is a register of this UART (constructor contract).
        unsafe { core::ptr::read_volatile((self.base + off) as *const u32) }
    }

    fn set(&self, off: usize, v: u32) {
        // SAFETY: as in `reg`.
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u32, v) }
    }

    /// A received byte, if one is waiting.
    pub fn try_read(&self) -> Option<u8> {
        match self.kind {
            UartKind::Pl011 => (self.reg(PL011_FR) & PL011_FR_RXFE == 0).then(|| self.reg(PL011_DR) as u8),
            UartKind::MiniUart => (self.reg(MU_LSR) & MU_LSR_DATA_READY != 0).then(|| self.reg(MU_IO) as u8),
        }
    }

    pub fn write_byte(&self, b: u8) {
        match self.kind {
            UartKind::Pl011 => {
                while self.reg(PL011_FR) & PL011_FR_TXFF != 0 {}
                self.set(PL011_DR, b.into());
            }
            UartKind::MiniUart => {
                while self.reg(MU_LSR) & MU_LSR_TX_EMPTY == 0 {}
                self.set(MU_IO, b.into());
            }
        }
    }

    pub fn write(&self, s: &[u8]) {
        for &b in s {
            self.write_byte(b);
        }
    }

    /// `v` as 0x-prefixed hexadecimal without leading zeros.
    pub fn write_hex(&self, v: u64) {
        self.write(b"0x");
        let digits = (64 - v.leading_zeros()).div_ceil(4).max(1);
        for i in (0..digits).rev() {
            self.write_byte(b"0123456789abcdef"[((v >> (i * 4)) & 0xf) as usize]);
        }
    }

    /// `v` in decimal.
    pub fn write_dec(&self, mut v: u64) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.write(&buf[i..]);
    }

    /// Wait until everything written has left the transmitter.
    pub fn flush(&self) {
        match self.kind {
            UartKind::Pl011 => while self.reg(PL011_FR) & PL011_FR_BUSY != 0 {},
            UartKind::MiniUart => while self.reg(MU_LSR) & MU_LSR_TX_IDLE == 0 {},
        }
    }
}
