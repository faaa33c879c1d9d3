//! The engine itself: probing the DT node, claiming channels, running chains of control blocks.

use super::{encode, usable_channels, DmaEngineError, Step, CB_BYTES, CB_WORDS, CHANNELS, LITE_CHANNELS, MAX_STEPS};
use crate::arch;
use crate::dma::api::DmaAttrs;
use crate::dma::{Device, GfpFlags};
use crate::irq::{self, Irq, IrqError};
use crate::kernel::boot_info;
use crate::mm::kmap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Per-channel registers, 0x100 apart.
const CHANNEL_STRIDE: usize = 0x100;
const REG_CS: usize = 0x00;
const REG_CONBLK_AD: usize = 0x04;
const REG_DEBUG: usize = 0x20;
/// The global enable register (one bit per channel), past the channel blocks the DT's `reg`
/// covers; only [`Bcm2835Dma::set_channel_enabled`] touches it.
const REG_ENABLE: u64 = 0xff0;

// Control and status (CS) bits.
const CS_ACTIVE: u32 = 1 << 0;
const CS_END: u32 = 1 << 1;
const CS_INT: u32 = 1 << 2;
const CS_WAITING_FOR_WRITES: u32 = 1 << 6;
const CS_ERROR: u32 = 1 << 8;
const CS_WAIT_FOR_WRITES: u32 = 1 << 28;
const CS_RESET: u32 = 1 << 31;
// DEBUG: the three error flags (write 1 to clear) and the lite flag.
const DEBUG_ERRORS: u32 = 0x7;
const DEBUG_LITE: u32 = 1 << 28;

/// How long [`Channel::run`] waits by default.
pub const DEFAULT_TIMEOUT_NS: u64 = 1_000_000_000;

/// The mapped registers of the probed engine, for the interrupt handler (0: none).
static REGS: AtomicUsize = AtomicUsize::new(0);
/// Channels whose end-of-chain interrupt the handler has seen (cleared when a transfer starts).
static COMPLETED: AtomicU32 = AtomicU32::new(0);
/// Interrupts the handler has serviced since boot, by channel bit (for tests: the handler ran).
static HANDLED: AtomicU32 = AtomicU32::new(0);
/// Channels claimed by a live [`Channel`].
static BUSY: AtomicU32 = AtomicU32::new(0);

fn reg_read(base: usize, channel: u32, reg: usize) -> u32 {
    // SAFETY: `base` is the engine's register block mapped by `probe`, `channel` < 15 and `reg` a
    // register of its 0x100-byte block.
    unsafe { core::ptr::read_volatile((base + channel as usize * CHANNEL_STRIDE + reg) as *const u32) }
}

fn reg_write(base: usize, channel: u32, reg: usize, v: u32) {
    // SAFETY: as in `reg_read`; the channel belongs to the caller (claimed, or its interrupt).
    unsafe { core::ptr::write_volatile((base + channel as usize * CHANNEL_STRIDE + reg) as *mut u32, v) }
}

/// The interrupt handler of one line: `ctx` is the mask of the channels on it. Clears CS.INT of
/// each that raised it and records the completion.
fn on_interrupt(ctx: usize) {
    let base = REGS.load(Ordering::Acquire);
    if base == 0 {
        return;
    }
    for ch in (0..CHANNELS).filter(|c| ctx & (1 << c) != 0) {
        if reg_read(base, ch, REG_CS) & CS_INT != 0 {
            // Writing INT clears it; ACTIVE (0 here) stays clear: the chain has ended, only the
            // last block raises the interrupt.
            reg_write(base, ch, REG_CS, CS_INT);
            COMPLETED.fetch_or(1 << ch, Ordering::AcqRel);
            HANDLED.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// How a transfer's end is noticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The channel's interrupt if it has one, else polling.
    Auto,
    /// The channel's interrupt (an error if it has none).
    Interrupt,
    /// Polling CS, even when an interrupt is wired.
    Poll,
}

/// The engine, probed from the DT: its registers, the DMA device its control blocks and
/// buffers belong to, the usable channels and their interrupt lines.
pub struct Bcm2835Dma {
    regs: usize,
    enable_reg: usize,
    /// The device every bus address of a transfer must come from.
    pub dev: Device,
    dt_mask: u32,
    granted: Option<u32>,
    usable: u32,
    lines: [Result<Irq, IrqError>; CHANNELS as usize],
    /// Distinct lines with a registered handler, with the channel mask given as context.
    registered: Vec<(Irq, usize)>,
}

impl Bcm2835Dma {
    /// The first available "brcm,bcm2835-dma" node: its registers mapped, its channels worked
    /// out, a handler registered on each interrupt line of a usable channel. Only one engine
    /// may be probed at a time (its interrupt handler finds it through a static): drop it first.
    pub fn probe() -> Result<Bcm2835Dma, DmaEngineError> {
        let dt = &boot_info().dt;
        let node = dt.find_compatible("brcm,bcm2835-dma").next().ok_or(DmaEngineError::NotFound)?;
        let reg = dt.reg0(&node).map_err(DmaEngineError::Dt)?;
        let base = reg.base().0;
        let regs = kmap::ioremap(base, reg.size()).map_err(|_| DmaEngineError::Map { base })?;
        let enable_reg = kmap::ioremap(base + REG_ENABLE, 4).map_err(|_| DmaEngineError::Map { base: base + REG_ENABLE })?;
        let prop = node
            .property("brcm,dma-channel-mask")
            .ok_or(crate::dt::DtError::NotFound { what: "brcm,dma-channel-mask of", name: crate::dt::Name::new(node.name()) })
            .map_err(DmaEngineError::Dt)?;
        let dt_mask = prop.as_u32().map_err(DmaEngineError::Dt)?;
        let granted = crate::drivers::bcm2835_mbox::dma_channels();
        let usable = usable_channels(dt_mask, granted);
        let dev = Device::from_dt(dt, &node).map_err(DmaEngineError::Dt)?;

        // Lines by name ("dmaN", as the binding and Linux have it), by index without names.
        let by_names = node.has_property("interrupt-names");
        let lines = core::array::from_fn(|ch| {
            if usable & (1 << ch) == 0 {
                return Err(IrqError::NoSuchIndex { node: crate::dt::Name::new(node.name()), index: ch });
            }
            if by_names {
                let mut buf = [0u8; 8];
                irq::request_by_name(dt, &node, format_channel(&mut buf, ch as u32))
            } else {
                irq::request(dt, &node, ch)
            }
        });
        REGS.store(regs, Ordering::Release);
        let mut engine = Bcm2835Dma { regs, enable_reg, dev, dt_mask, granted, usable, lines, registered: Vec::new() };
        engine.register_handlers();
        Ok(engine)
    }

    /// One handler per distinct line, told which usable channels share it. A line whose
    /// registration fails leaves its channels polled (the error is kept for
    /// [`Bcm2835Dma::interrupt_of`]).
    fn register_handlers(&mut self) {
        for ch in 0..CHANNELS as usize {
            let Ok(line) = self.lines[ch] else { continue };
            if self.registered.iter().any(|(l, _)| *l == line) {
                continue;
            }
            let mask = (0..CHANNELS as usize).filter(|&c| self.lines[c] == Ok(line)).fold(0usize, |m, c| m | 1 << c);
            match irq::register(line, on_interrupt, mask) {
                Ok(()) => self.registered.push((line, mask)),
                Err(e) => {
                    for c in (0..CHANNELS as usize).filter(|&c| mask & (1 << c) != 0) {
                        self.lines[c] = Err(e);
                    }
                }
            }
        }
    }

    /// The interrupt line of `channel`, or why it has none (completion is then polled).
    pub fn interrupt_of(&self, channel: u32) -> Result<Irq, IrqError> {
        self.lines.get(channel as usize).copied().unwrap_or(Err(IrqError::NoSuchIndex { node: crate::dt::Name::new("dma"), index: channel as usize }))
    }

    /// The channels this driver may use (see [`usable_channels`]).
    pub fn usable(&self) -> u32 {
        self.usable
    }

    /// The DT's mask and the firmware's grant (`None`: no mailbox).
    pub fn masks(&self) -> (u32, Option<u32>) {
        (self.dt_mask, self.granted)
    }

    /// Claims the lowest usable channel that is free (and, with `full`, not a lite one).
    pub fn claim(&self, full: bool) -> Result<Channel<'_>, DmaEngineError> {
        let wanted = if full { self.usable & !LITE_CHANNELS } else { self.usable };
        loop {
            let busy = BUSY.load(Ordering::Acquire);
            let free = wanted & !busy;
            if free == 0 {
                return Err(DmaEngineError::NoChannel { dt_mask: self.dt_mask, granted: self.granted, busy });
            }
            let ch = free.trailing_zeros();
            if BUSY.compare_exchange(busy, busy | 1 << ch, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Ok(Channel { engine: self, index: ch });
            }
        }
    }

    /// Sets `channel`'s bit in the engine's global ENABLE register (at offset 0xff0, reset value
    /// all ones): a disabled channel does not run. For tests of the time-out path.
    pub fn set_channel_enabled(&self, channel: u32, on: bool) {
        if channel >= CHANNELS {
            return;
        }
        // SAFETY: the ENABLE register of the probed engine, mapped by `probe`.
        unsafe {
            let p = self.enable_reg as *mut u32;
            let v = core::ptr::read_volatile(p);
            core::ptr::write_volatile(p, if on { v | 1 << channel } else { v & !(1 << channel) });
        }
    }

    /// How many times the interrupt handler has serviced a channel since boot.
    pub fn interrupts_handled() -> u32 {
        HANDLED.load(Ordering::Acquire)
    }
}

/// "dma<n>" into `buf`.
fn format_channel(buf: &mut [u8; 8], n: u32) -> &str {
    buf[..3].copy_from_slice(b"dma");
    let len = if n >= 10 {
        buf[3] = b'0' + (n / 10 % 10) as u8;
        buf[4] = b'0' + (n % 10) as u8;
        5
    } else {
        buf[3] = b'0' + n as u8;
        4
    };
    core::str::from_utf8(&buf[..len]).unwrap_or("dma")
}

impl Drop for Bcm2835Dma {
    fn drop(&mut self) {
        for (line, mask) in self.registered.drain(..) {
            if let Err(e) = irq::unregister(line, on_interrupt, mask) {
                crate::println!("bcm2835-dma: removing the handler of {line}: {e}");
            }
        }
        REGS.store(0, Ordering::Release);
    }
}

/// A claimed channel; released on drop.
pub struct Channel<'e> {
    engine: &'e Bcm2835Dma,
    index: u32,
}

impl Drop for Channel<'_> {
    fn drop(&mut self) {
        BUSY.fetch_and(!(1 << self.index), Ordering::AcqRel);
    }
}

/// What a finished transfer used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finished {
    /// Whether the end came by interrupt (else by polling).
    pub by_interrupt: bool,
}

fn elapsed_ns(start: u64) -> u64 {
    let freq = u128::from(arch::counter::frequency().max(1));
    (u128::from(arch::counter::read().wrapping_sub(start)) * 1_000_000_000 / freq).min(u128::from(u64::MAX)) as u64
}

impl Channel<'_> {
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether this is a lite channel (by number, or as its DEBUG register says).
    pub fn is_lite(&self) -> bool {
        LITE_CHANNELS & (1 << self.index) != 0 || self.read(REG_DEBUG) & DEBUG_LITE != 0
    }

    fn read(&self, reg: usize) -> u32 {
        reg_read(self.engine.regs, self.index, reg)
    }

    fn write(&self, reg: usize, v: u32) {
        reg_write(self.engine.regs, self.index, reg, v)
    }

    /// Stops the channel and puts it back to its reset state: pause (ACTIVE cleared), let
    /// outstanding writes drain (bounded), then RESET.
    fn reset(&self) {
        self.write(REG_CS, 0);
        let start = arch::counter::read();
        while self.read(REG_CS) & CS_WAITING_FOR_WRITES != 0 && elapsed_ns(start) < 1_000_000 {
            core::hint::spin_loop();
        }
        self.write(REG_CS, CS_RESET);
        self.clear_errors();
    }

    /// Clears DEBUG's error flags by writing back the ones set (write 1 to clear; QEMU's model
    /// stores what is written, so writing flags that are not set would set them there).
    fn clear_errors(&self) {
        let errors = self.read(REG_DEBUG) & DEBUG_ERRORS;
        if errors != 0 {
            self.write(REG_DEBUG, errors);
        }
    }

    /// [`Channel::run_with_timeout`] with [`DEFAULT_TIMEOUT_NS`].
    pub fn run(&self, steps: &[Step], how: Completion) -> Result<Finished, DmaEngineError> {
        self.run_with_timeout(steps, how, DEFAULT_TIMEOUT_NS)
    }

    /// Runs `steps` as one chain of control blocks and waits for its end. Every address must be
    /// a bus address of a live mapping of [`Bcm2835Dma::dev`] in the right direction, synced for
    /// the device; the caller syncs or unmaps for the CPU afterwards. Nothing is started if a step
    /// is refused. After `timeout_ns` the channel is aborted and reset and
    /// [`DmaEngineError::Timeout`] returned.
    pub fn run_with_timeout(&self, steps: &[Step], how: Completion, timeout_ns: u64) -> Result<Finished, DmaEngineError> {
        if steps.is_empty() || steps.len() > MAX_STEPS {
            return Err(DmaEngineError::StepCount(steps.len()));
        }
        let by_interrupt = match (how, self.engine.interrupt_of(self.index)) {
            (Completion::Poll, _) | (Completion::Auto, Err(_)) => false,
            (Completion::Interrupt, Err(why)) => return Err(DmaEngineError::NoInterrupt { channel: self.index, why }),
            (_, Ok(_)) => true,
        };
        let lite = self.is_lite();
        let dev = &self.engine.dev;
        let bytes = (steps.len() * CB_BYTES) as u64;
        let mut cbs = dev.alloc_coherent(bytes, GfpFlags::KERNEL, DmaAttrs::NONE)?;
        let base = cbs.dma_addr();
        let first = u32::try_from(base.as_u64())
            .ok()
            .filter(|_| base.as_u64().checked_add(bytes).is_some_and(|e| e <= 1 << 32))
            .ok_or(DmaEngineError::AddressTooWide(base))?;
        if first % CB_BYTES as u32 != 0 {
            return Err(DmaEngineError::MisalignedControlBlock(base));
        }
        let mut words = [[0u32; CB_WORDS]; MAX_STEPS];
        for (i, step) in steps.iter().enumerate() {
            let last = i + 1 == steps.len();
            let next = if last { 0 } else { first + ((i + 1) * CB_BYTES) as u32 };
            words[i] = encode(step, next, last && by_interrupt, lite, self.index)?;
        }
        let phys = cbs.phys();
        let cpu = cbs.as_mut_slice().ok_or(crate::dma::api::DmaError::NotCpuAddressable { phys, size: bytes })?;
        for (i, cb) in words[..steps.len()].iter().enumerate() {
            for (j, w) in cb.iter().enumerate() {
                let at = (i * CB_WORDS + j) * 4;
                cpu[at..at + 4].copy_from_slice(&w.to_le_bytes());
            }
        }

        if self.read(REG_CS) & CS_ACTIVE != 0 {
            self.reset();
        }
        let bit = 1u32 << self.index;
        COMPLETED.fetch_and(!bit, Ordering::AcqRel);
        self.write(REG_CS, CS_END | CS_INT);
        self.clear_errors();
        self.write(REG_CONBLK_AD, first);
        // The control blocks (coherent memory) must be visible to the engine before it starts.
        arch::cache::dsb();
        self.write(REG_CS, CS_ACTIVE | CS_WAIT_FOR_WRITES);

        let start = arch::counter::read();
        let done = if by_interrupt {
            irq::wait_until(timeout_ns, || COMPLETED.load(Ordering::Acquire) & bit != 0)
        } else {
            loop {
                let cs = self.read(REG_CS);
                if cs & CS_ERROR != 0 || (cs & CS_ACTIVE == 0 && self.read(REG_CONBLK_AD) == 0) {
                    break true;
                }
                if elapsed_ns(start) > timeout_ns {
                    break false;
                }
                core::hint::spin_loop();
            }
        };
        let (cs, conblk, debug) = (self.read(REG_CS), self.read(REG_CONBLK_AD), self.read(REG_DEBUG));
        let result = if !done {
            self.reset();
            Err(DmaEngineError::Timeout { channel: self.index, ns: elapsed_ns(start), cs, conblk })
        } else if cs & CS_ERROR != 0 || debug & DEBUG_ERRORS != 0 {
            self.reset();
            Err(DmaEngineError::Engine { channel: self.index, cs, debug })
        } else {
            self.write(REG_CS, CS_END);
            Ok(Finished { by_interrupt })
        };
        // The engine has stopped either way: the control blocks may go.
        cbs.free()?;
        result
    }
}
