//! The kernel console: one output device chosen from /chosen/stdout-path, behind a lock so lines
//! from several CPUs do not interleave. Before the device tree names a console there is none, except
//! the optional early UART (`DMAKERN_EARLY_UART` at build time, see the README).

use core::fmt::{self, Write};
use spin::Mutex;

/// An output device. Implementations poll; they must be usable with interrupts masked.
pub trait Console: Sync {
    fn write_bytes(&self, bytes: &[u8]);
    /// Waits (boundedly) until everything written has left the device: before a power-off or
    /// reset that would cut the last line short.
    fn flush(&self) {}
}

static CONSOLE: Mutex<Option<&'static dyn Console>> = Mutex::new(None);

/// Make `c` the console from now on.
pub fn set(c: &'static dyn Console) {
    *CONSOLE.lock() = Some(c);
}

pub fn is_set() -> bool {
    CONSOLE.lock().is_some()
}

/// Flushes the console, if there is one, without waiting for its lock for long (see
/// [`emergency_print`]): called on the way to power-off.
pub fn flush() {
    for _ in 0..1_000_000 {
        if let Some(guard) = CONSOLE.try_lock() {
            if let Some(c) = *guard {
                c.flush();
            }
            return;
        }
        core::hint::spin_loop();
    }
}

struct Writer<'a>(&'a dyn Console);

impl Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.split_inclusive('\n') {
            match chunk.strip_suffix('\n') {
                Some(line) => {
                    self.0.write_bytes(line.as_bytes());
                    self.0.write_bytes(b"\r\n");
                }
                None => self.0.write_bytes(chunk.as_bytes()),
            }
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let guard = CONSOLE.lock();
    if let Some(c) = *guard {
        let _ = Writer(c).write_fmt(args);
    }
}

/// Print from a path that may have interrupted a holder of the console lock (a crash report):
/// takes the lock if it can, and writes anyway after a bounded wait rather than deadlocking.
pub fn emergency_print(args: fmt::Arguments) {
    for _ in 0..1_000_000 {
        if let Some(guard) = CONSOLE.try_lock() {
            if let Some(c) = *guard {
                let _ = Writer(c).write_fmt(args);
            }
            return;
        }
        core::hint::spin_loop();
    }
    // SAFETY: the holder is stuck (it is the code we interrupted, or a dead CPU); we only read the
    // console reference, which is never freed.
    unsafe { CONSOLE.force_unlock() };
    if let Some(c) = *CONSOLE.lock() {
        let _ = Writer(c).write_fmt(args);
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::console::_print(format_args!($($arg)*)));
}

#[macro_export]
macro_rules! println {
    () => ($crate::print!("\n"));
    ($($arg:tt)*) => ($crate::console::_print(format_args!("{}\n", format_args!($($arg)*))));
}
