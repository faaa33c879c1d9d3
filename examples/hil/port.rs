//! The serial port: a terminal device (a USB serial adapter, or the pty QEMU gives `-serial pty`)
//! in raw mode at the chosen speed, read with a short poll interval so the caller can keep its
//! own time-outs.

use rustix::fs::{open, Mode, OFlags};
use rustix::termios::{tcflush, tcgetattr, tcsetattr, ControlModes, OptionalActions, QueueSelector, SpecialCodeIndex};
use std::fs::File;
use std::io::{self, Read, Write};

/// What one read gave.
pub enum Input {
    /// Bytes were appended to the buffer.
    Data,
    /// Nothing within the poll interval.
    Nothing,
    /// The other end is gone (a pty whose QEMU exited, an unplugged adapter).
    Closed,
}

pub struct Port {
    file: File,
}

impl Port {
    /// Open `path` raw at `baud` (8N1, no flow control, modem lines ignored), reads returning
    /// after at most 0.1 s. Errors say what failed, with the path.
    pub fn open(path: &str, baud: u32) -> Result<Port, String> {
        let fd = open(path, OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| format!("cannot open serial port {path}: {e}"))?;
        let mut t = tcgetattr(&fd).map_err(|e| format!("{path} is not a serial port (tcgetattr: {e})"))?;
        t.make_raw();
        t.control_modes |= ControlModes::CLOCAL | ControlModes::CREAD;
        t.control_modes -= ControlModes::CSTOPB | ControlModes::PARENB;
        t.set_speed(baud).map_err(|e| format!("{path}: cannot set {baud} baud: {e}"))?;
        // VMIN 0, VTIME 1: a read returns what has arrived, or nothing after 0.1 s.
        t.special_codes[SpecialCodeIndex::VMIN] = 0;
        t.special_codes[SpecialCodeIndex::VTIME] = 1;
        tcsetattr(&fd, OptionalActions::Now, &t).map_err(|e| format!("{path}: cannot configure the port: {e}"))?;
        Ok(Port { file: File::from(fd) })
    }

    /// Drop whatever the port has buffered (output of a previous boot).
    pub fn discard_input(&self) {
        let _ = tcflush(&self.file, QueueSelector::IFlush);
    }

    /// Read what has arrived onto the end of `buf`.
    pub fn read_into(&mut self, buf: &mut Vec<u8>) -> io::Result<Input> {
        let mut chunk = [0u8; 4096];
        match self.file.read(&mut chunk) {
            Ok(0) => Ok(Input::Nothing),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(Input::Data)
            }
            // Linux reports a pty whose master closed (or a vanished USB adapter) as EIO.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => Ok(Input::Closed),
            Err(e) if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock => Ok(Input::Nothing),
            Err(e) => Err(e),
        }
    }

    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.file.flush()
    }
}
