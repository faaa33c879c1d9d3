//! dmakern-chainload: a serial chain loader for hardware-in-the-loop runs on Raspberry Pi boards.
//!
//! The SD card carries this loader as `kernel8.img` (aarch64) or `kernel7.img` (armv7); the host
//! runner (`cargo run --release --example hil -- --chainload IMAGE ...`) sends the kernel over the
//! console UART on every run, so a new build needs no card swap. The loader:
//!
//! 1. finds the console from the firmware's device tree (`/chosen/stdout-path`, an alias resolved,
//!    `reg` translated through the parents' `ranges`; a PL011 or the BCM2835 mini UART, left at the
//!    firmware's settings) and announces itself;
//! 2. asks for the kernel and receives it as the protocol in [`protocol`] defines (length, CRC32,
//!    bytes; NAK and ask again on a bad or stalled frame, give up after a few failures);
//! 3. receives it straight into its final place: the first 2 MiB-aligned address above the loader
//!    whose footprint (the arm64 header's `image_size` or the zImage end word when the kernel has
//!    one, else its length)
//!    stays clear of the device tree and inside `/memory` when that is filled in; dmakern is
//!    position-independent and relocates itself there;
//! 4. cleans the kernel's range to the point of coherency, invalidates the instruction cache and
//!    enters the kernel with the firmware's DTB pointer in x0 (x1..x3 = 0) on aarch64, or in r2
//!    with r0 = 0 and r1 = the firmware's machine type on armv7; MMU off, at the exception level
//!    (mode) the firmware gave.
//!
//! Without a usable device tree the loader has no console to report on and parks the CPU.
//! Build: `tests/hil/chainload/build.sh OUTDIR` (`OUTDIR/chainload8.img` and `chainload7.img`).
#![no_std]
#![no_main]

mod dt;
// The host half (frame encoding, whole-buffer CRC) is used by the runner, which includes this file.
#[allow(dead_code)]
mod protocol;
mod uart;

use dt::{Fdt, UartKind};
use protocol::{Crc32, MagicScanner};
use uart::Uart;

#[cfg(target_arch = "aarch64")]
core::arch::global_asm!(include_str!("aarch64.s"), options(raw));
#[cfg(target_arch = "arm")]
core::arch::global_asm!(include_str!("armv7.s"), options(raw));

extern "C" {
    /// Clean `[start, start + len)` to the PoC, invalidate the I-cache and enter `entry` as the
    /// architecture's boot protocol says: x0 = `dtb` (aarch64; `machine` unused), or r0 = 0,
    /// r1 = `machine`, r2 = `dtb` (armv7). In src/aarch64.s and src/armv7.s.
    fn boot_kernel(dtb: usize, entry: usize, start: usize, len: usize, machine: usize) -> !;
}

#[cfg(target_arch = "aarch64")]
mod arch {
    pub const NAME: &str = "aarch64";

    /// The generic timer's count.
    pub fn ticks() -> u64 {
        let t: u64;
        // SAFETY: reading CNTPCT_EL0 has no side effect; the firmware enables it for EL2 and EL1.
        unsafe { core::arch::asm!("isb", "mrs {}, cntpct_el0", out(reg) t, options(nomem, nostack)) };
        t
    }

    /// The generic timer's frequency in Hz, as the firmware programmed CNTFRQ.
    pub fn frequency() -> u64 {
        let f: u64;
        // SAFETY: reading CNTFRQ_EL0 has no side effect.
        unsafe { core::arch::asm!("mrs {}, cntfrq_el0", out(reg) f, options(nomem, nostack)) };
        f
    }

    pub fn park() -> ! {
        loop {
            // SAFETY: waiting for an event has no effect on memory.
            unsafe { core::arch::asm!("wfe", options(nomem, nostack)) };
        }
    }
}

#[cfg(target_arch = "arm")]
mod arch {
    pub const NAME: &str = "armv7";

    /// The generic timer's physical count (CNTPCT).
    pub fn ticks() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: reading CNTPCT has no side effect; the firmware leaves it readable from PL1.
        unsafe { core::arch::asm!("isb", "mrrc p15, 0, {}, {}, c14", out(reg) lo, out(reg) hi, options(nomem, nostack)) };
        u64::from(hi) << 32 | u64::from(lo)
    }

    /// The generic timer's frequency in Hz (CNTFRQ).
    pub fn frequency() -> u64 {
        let f: u32;
        // SAFETY: reading CNTFRQ has no side effect.
        unsafe { core::arch::asm!("mrc p15, 0, {}, c14, c0, 0", out(reg) f, options(nomem, nostack)) };
        f.into()
    }

    pub fn park() -> ! {
        loop {
            // SAFETY: waiting for an event has no effect on memory.
            unsafe { core::arch::asm!("wfe", options(nomem, nostack)) };
        }
    }
}

/// Kernels are placed at 2 MiB-aligned addresses (the arm64 boot protocol's requirement).
const KERNEL_ALIGN: u64 = 2 << 20;
/// The first bytes of a kernel, enough for its header: the arm64 Image header (`text_offset` at
/// 8, `image_size` at 16, magic "ARM\x64" at 56) or the zImage words (magic 0x016f2818 at 0x24,
/// start and end at 0x28 and 0x2c; dmakern's end counts its bss).
const HEAD_LEN: usize = 64;

/// A deadline on the generic timer.
struct Clock {
    ticks_per_ms: u64,
    /// The pause between polls of an empty UART (`POLL_US`).
    ticks_per_poll: u64,
}

/// Microseconds between polls of an empty UART.
const POLL_US: u64 = 20;

impl Clock {
    fn new() -> Self {
        // A firmware that left CNTFRQ at 0 still gets time-outs (at the Pi's 19.2 MHz).
        let f = match arch::frequency() {
            0 => 19_200_000,
            f => f,
        };
        Clock { ticks_per_ms: (f / 1000).max(1), ticks_per_poll: (f / 1_000_000 * POLL_US).max(1) }
    }

    fn deadline(&self, ms: u64) -> u64 {
        arch::ticks().saturating_add(ms.saturating_mul(self.ticks_per_ms))
    }
}

/// Where the received kernel goes.
struct Placement {
    /// Where the first byte is written.
    load: u64,
    /// The kernel's entry (= `load`: dmakern's header branches from byte 0).
    entry: u64,
    /// Bytes from `load` the kernel may use (file and bss).
    footprint: u64,
}

/// What one request produced.
enum Outcome {
    /// Nothing arrived in time: ask again.
    Silence,
    /// A frame started and was bad.
    Failed(&'static [u8]),
    Loaded(Placement),
}

struct Loader<'a> {
    uart: &'a Uart,
    clock: Clock,
    /// The loader's own range and the DTB's, which the kernel must not overwrite.
    keep_out: [(u64, u64); 2],
    /// Usable RAM `[start, end)` when the DT says (else anything above the loader is trusted).
    ram: Option<(u64, u64)>,
}

impl Loader<'_> {
    /// The next byte, or `None` once `deadline` passed.
    fn byte_before(&self, deadline: u64) -> Option<u8> {
        loop {
            if let Some(b) = self.uart.try_read() {
                return Some(b);
            }
            // Between polls of an empty UART, wait on the timer rather than the device: under
            // QEMU every device access takes the emulator's global lock, which the thread that
            // feeds the UART needs too. `POLL_US` is below a byte time at any usual baud rate
            // (87 us at 115200), and the FIFO holds several bytes besides.
            let now = arch::ticks();
            if now >= deadline {
                return None;
            }
            let until = now.saturating_add(self.clock.ticks_per_poll);
            while arch::ticks() < until {}
        }
    }

    /// The next byte within `ms` of now.
    fn byte_within(&self, ms: u64) -> Option<u8> {
        self.byte_before(self.clock.deadline(ms))
    }

    /// Discard input until the line has been silent for `protocol::QUIET_MS`.
    fn wait_quiet(&self) {
        while self.byte_within(protocol::QUIET_MS).is_some() {}
    }

    fn line(&self, token: &[u8], extra: &[u8]) {
        self.uart.write(b"\r\n");
        self.uart.write(token);
        self.uart.write(extra);
        self.uart.write(b"\r\n");
        self.uart.flush();
    }

    /// Choose where a kernel of `len` bytes whose first bytes are `head` goes.
    fn place(&self, len: u32, head: &[u8]) -> Option<Placement> {
        let mut text_offset = 0u64;
        let mut footprint = u64::from(len);
        let word = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let dword = |at: usize| u64::from(word(at)) | u64::from(word(at + 4)) << 32;
        if head.len() == HEAD_LEN && &head[56..60] == b"ARM\x64" {
            text_offset = dword(8);
            if text_offset >= KERNEL_ALIGN {
                return None;
            }
            footprint = footprint.max(dword(16));
        } else if head.len() == HEAD_LEN && word(0x24) == 0x016f_2818 {
            footprint = footprint.max(u64::from(word(0x2c).saturating_sub(word(0x28))));
        }
        let footprint = footprint.checked_add(text_offset)?;
        let mut base = self.keep_out[0].1.checked_add(KERNEL_ALIGN - 1)? & !(KERNEL_ALIGN - 1);
        loop {
            let end = base.checked_add(footprint)?;
            if let Some((lo, hi)) = self.ram {
                if base < lo || end > hi {
                    return None;
                }
            }
            if end > usize::MAX as u64 {
                return None;
            }
            match self.keep_out.iter().find(|&&(s, e)| base < e && s < end) {
                None => return Some(Placement { load: base + text_offset, entry: base + text_offset, footprint: footprint - text_offset }),
                Some(&(_, e)) => base = e.checked_add(KERNEL_ALIGN - 1)? & !(KERNEL_ALIGN - 1),
            }
        }
    }

    /// One request: wait for a frame and receive it into place.
    fn receive(&self) -> Outcome {
        let mut magic = MagicScanner::default();
        loop {
            match self.byte_within(protocol::REQUEST_INTERVAL_MS) {
                None => return Outcome::Silence,
                Some(b) if magic.push(b) => break,
                Some(_) => {}
            }
        }
        let mut hdr = [0u8; 8];
        for b in hdr.iter_mut() {
            match self.byte_within(protocol::BYTE_TIMEOUT_MS) {
                Some(v) => *b = v,
                None => return Outcome::Failed(b"timeout in header"),
            }
        }
        let (len, want_crc) = protocol::decode_length_crc(&hdr);
        if len == 0 || len > protocol::MAX_PAYLOAD {
            return Outcome::Failed(b"bad length");
        }
        let mut crc = Crc32::new();
        let mut head = [0u8; HEAD_LEN];
        let head_len = (len as usize).min(HEAD_LEN);
        for b in head[..head_len].iter_mut() {
            match self.byte_within(protocol::BYTE_TIMEOUT_MS) {
                Some(v) => *b = v,
                None => return Outcome::Failed(b"timeout in data"),
            }
            crc.update(*b);
        }
        let Some(p) = self.place(len, &head[..head_len]) else { return Outcome::Failed(b"kernel does not fit in RAM") };
        let dst = p.load as usize as *mut u8;
        // SAFETY: `place` chose [load, load + footprint) inside RAM (when the DT says where RAM is)
        // and clear of the loader and the DTB; footprint >= len. The MMU is off: physical = virtual.
        unsafe { core::ptr::copy_nonoverlapping(head.as_ptr(), dst, head_len) };
        for i in head_len..len as usize {
            let Some(b) = self.byte_within(protocol::BYTE_TIMEOUT_MS) else { return Outcome::Failed(b"timeout in data") };
            crc.update(b);
            // SAFETY: i < len <= footprint, as above.
            unsafe { dst.add(i).write_volatile(b) };
        }
        if crc.finish() != want_crc {
            return Outcome::Failed(b"CRC mismatch");
        }
        Outcome::Loaded(p)
    }
}

#[no_mangle]
extern "C" fn loader_main(dtb: usize, loader_start: usize, loader_end: usize, machine: usize) -> ! {
    if dtb == 0 || !dtb.is_multiple_of(4) {
        arch::park();
    }
    // SAFETY: the boot protocol hands over the DTB address (non-null, aligned: checked); only its
    // header is read before its size is known, and the firmware's blob stays put while we run.
    let header = unsafe { core::slice::from_raw_parts(dtb as *const u8, 8) };
    let size = (u32::from_be_bytes([header[4], header[5], header[6], header[7]]).min(dt::MAX_TOTALSIZE) as usize).max(8);
    // SAFETY: as above, with the size the header claims (capped); `Fdt::new` checks the rest.
    let blob = unsafe { core::slice::from_raw_parts(dtb as *const u8, size) };
    let Ok(fdt) = Fdt::new(blob) else { arch::park() };
    let Ok((kind, base)) = fdt.stdout_uart() else { arch::park() };
    let Ok(base) = usize::try_from(base) else { arch::park() };
    // SAFETY: the device tree names this UART as the console; the loader is alone on the machine.
    let uart = unsafe { Uart::new(kind, base) };

    let dtb_range = (dtb as u64, dtb as u64 + u64::from(fdt.total_size()));
    let loader = Loader {
        uart: &uart,
        clock: Clock::new(),
        keep_out: [(loader_start as u64, loader_end as u64), dtb_range],
        ram: fdt.memory().map(|(b, s)| (b, b.saturating_add(s))),
    };
    uart.write(b"\r\ndmakern-chainload ");
    uart.write(env!("CARGO_PKG_VERSION").as_bytes());
    uart.write(b" (");
    uart.write(arch::NAME.as_bytes());
    uart.write(b"): console ");
    uart.write(match kind {
        UartKind::Pl011 => b"pl011",
        UartKind::MiniUart => b"mini-uart",
    });
    uart.write(b" at ");
    uart.write_hex(base as u64);
    uart.write(b", loader at ");
    uart.write_hex(loader_start as u64);
    uart.write(b", DTB at ");
    uart.write_hex(dtb as u64);
    uart.write(b" (");
    uart.write_dec(fdt.total_size().into());
    uart.write(b" bytes)");
    match loader.ram {
        Some((lo, hi)) => {
            uart.write(b", RAM ");
            uart.write_hex(lo);
            uart.write(b"-");
            uart.write_hex(hi);
        }
        None => uart.write(b", RAM size not in the DT"),
    }
    uart.write(b"\r\n");

    let mut failures = 0;
    loop {
        loader.wait_quiet();
        loader.line(protocol::REQUEST, b"");
        match loader.receive() {
            Outcome::Silence => {}
            Outcome::Failed(why) => {
                failures += 1;
                loader.wait_quiet();
                let mut msg = [0u8; 64];
                msg[0] = b' ';
                let n = why.len().min(msg.len() - 1);
                msg[1..=n].copy_from_slice(&why[..n]);
                loader.line(protocol::NAK, &msg[..=n]);
                if failures >= protocol::MAX_FAILED_TRANSFERS {
                    loader.line(protocol::GAVE_UP, b" (too many failed transfers; power-cycle to retry)");
                    arch::park();
                }
            }
            Outcome::Loaded(p) => {
                uart.write(b"\r\n");
                uart.write(protocol::ACK);
                uart.write(b" kernel at ");
                uart.write_hex(p.load);
                uart.write(b"\r\n");
                uart.flush();
                // SAFETY: the kernel was received whole (CRC checked) into the range `place`
                // chose; the DTB is untouched. Nothing of the loader is used after the jump.
                unsafe { boot_kernel(dtb, p.entry as usize, p.load as usize, p.footprint as usize, machine) }
            }
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    arch::park()
}
