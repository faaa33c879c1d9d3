//! The serial chain-load protocol, shared word for word by the loader (this crate, on the board) and
//! the host side (`examples/hil`, `--chainload IMAGE`), which includes this file by path. It uses
//! `core` only, so it builds for the bare-metal loader and is unit-tested on the host.
//!
//! One transfer, over the console UART (8N1, the speed the firmware set, 115200 on a Pi):
//!
//! ```text
//! loader                                   host
//!   "dmakern-chainload:REQ"        ->      (waits for it, echoing everything before it)
//!                                  <-    MAGIC "DMKL", length u32 LE, CRC32 u32 LE, length bytes
//!   "dmakern-chainload:ACK ..."    ->      (then reads the kernel's console as usual)
//!   or "dmakern-chainload:NAK why"         (host waits for the next REQ and sends again)
//! ```
//!
//! The loader's messages are ASCII lines (`\r\n` before and after), so they read well on a
//! terminal; a token may be followed by text up to the end of its line.
//!
//! Loader side: it sends REQ again every [`REQUEST_INTERVAL_MS`] while the line stays silent (the
//! host may start after the board). Bytes before [`MAGIC`] are skipped (terminal noise, echo). Once
//! a frame has started, a gap of [`BYTE_TIMEOUT_MS`] ends it with a NAK; so does a length of 0 or
//! above the loader's limit, or a CRC mismatch. Before each NAK and REQ the loader waits for the
//! line to be silent for [`QUIET_MS`], so the rest of a bad frame is not mistaken for the next one.
//! After [`MAX_FAILED_TRANSFERS`] failed frames in a row it stops and says so (power-cycle to
//! retry). On ACK it jumps to the kernel at once, so the kernel's console output follows the ACK.
//!
//! Host side: it sends a frame only in answer to a REQ, so the loader is listening and not
//! transmitting, and waits at most [`BYTE_TIMEOUT_MS`] (plus a margin) for ACK or NAK. On NAK, or
//! on a new REQ instead of an answer (the frame was lost), it sends the frame again in answer to
//! the next REQ, at most [`MAX_FAILED_TRANSFERS`] + 1 frames in all.
//!
//! The CRC is CRC-32/ISO-HDLC (zlib, Ethernet; reflected polynomial 0xEDB88320, initial value and
//! final XOR 0xFFFFFFFF) over the payload bytes only.

/// What the loader sends to ask for a kernel.
pub const REQUEST: &[u8] = b"dmakern-chainload:REQ";
/// What the loader sends after a good frame, just before it jumps.
pub const ACK: &[u8] = b"dmakern-chainload:ACK";
/// What the loader sends after a bad frame, followed by ` <reason>`.
pub const NAK: &[u8] = b"dmakern-chainload:NAK";
/// What the loader sends when it gives up.
pub const GAVE_UP: &[u8] = b"dmakern-chainload:GAVE-UP";
/// The first bytes of a frame.
pub const MAGIC: [u8; 4] = *b"DMKL";
/// Size of the frame header: magic, length, CRC32.
pub const HEADER_LEN: usize = 12;

/// The loader repeats REQ after this long without receiving anything.
pub const REQUEST_INTERVAL_MS: u64 = 2000;
/// Inside a frame, the loader gives up on it after this long without a byte.
pub const BYTE_TIMEOUT_MS: u64 = 2000;
/// Silence the loader waits for before a NAK or a REQ, to drain the rest of a bad frame.
pub const QUIET_MS: u64 = 200;
/// Failed frames in a row after which the loader gives up.
pub const MAX_FAILED_TRANSFERS: u32 = 5;
/// The largest payload the protocol allows (the loader may lower it to what fits in RAM).
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// The frame header for `payload`: magic, length and CRC32, each u32 little-endian.
/// `None` if the payload is empty or longer than [`MAX_PAYLOAD`].
pub fn header_for(payload: &[u8]) -> Option<[u8; HEADER_LEN]> {
    let len = u32::try_from(payload.len()).ok().filter(|&l| l > 0 && l <= MAX_PAYLOAD)?;
    Some(encode_header(len, crc32(payload)))
}

/// The frame header for a payload of `len` bytes with CRC `crc`.
pub fn encode_header(len: u32, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// `(length, crc)` from the 8 bytes after the magic.
pub fn decode_length_crc(b: &[u8; 8]) -> (u32, u32) {
    (u32::from_le_bytes([b[0], b[1], b[2], b[3]]), u32::from_le_bytes([b[4], b[5], b[6], b[7]]))
}

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// A running CRC-32 (see the module doc for the variant).
#[derive(Clone, Copy)]
pub struct Crc32(u32);

impl Crc32 {
    pub const fn new() -> Self {
        Crc32(0xffff_ffff)
    }

    pub fn update(&mut self, byte: u8) {
        self.0 = CRC_TABLE[((self.0 ^ byte as u32) & 0xff) as usize] ^ (self.0 >> 8);
    }

    pub fn finish(self) -> u32 {
        !self.0
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

/// The CRC-32 of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = Crc32::new();
    for &b in data {
        c.update(b);
    }
    c.finish()
}

/// Finds [`MAGIC`] in a byte stream one byte at a time, skipping anything before it.
#[derive(Default)]
pub struct MagicScanner {
    matched: usize,
}

impl MagicScanner {
    /// Feed one byte; true once the whole magic has been seen (then the scanner starts over).
    pub fn push(&mut self, b: u8) -> bool {
        if b == MAGIC[self.matched] {
            self.matched += 1;
        } else {
            // No proper prefix of "DMKL" is also a suffix of another, so a mismatch can only
            // restart the match at this byte.
            self.matched = usize::from(b == MAGIC[0]);
        }
        if self.matched == MAGIC.len() {
            self.matched = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_vectors() {
        // Check values of CRC-32/ISO-HDLC (the "check" of the CRC catalogue, zlib's crc32()).
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"a"), 0xe8b7_be43);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414f_a339);
        assert_eq!(crc32(&[0u8; 32]), 0x190a_55ad);
        assert_eq!(crc32(&[0xffu8; 32]), 0xff6c_ab0b);
    }

    #[test]
    fn header_layout() {
        let h = header_for(b"123456789").unwrap();
        assert_eq!(&h, b"DMKL\x09\x00\x00\x00\x26\x39\xf4\xcb");
        let mut rest = [0u8; 8];
        rest.copy_from_slice(&h[4..]);
        assert_eq!(decode_length_crc(&rest), (9, 0xcbf4_3926));
        assert_eq!(header_for(b""), None);
    }

    #[test]
    fn magic_found_after_noise_and_false_starts() {
        let stream = b"\r\nxxDMDMKDMKL";
        let mut s = MagicScanner::default();
        let hits: Vec<usize> = stream.iter().enumerate().filter(|(_, &b)| s.push(b)).map(|(i, _)| i).collect();
        assert_eq!(hits, vec![stream.len() - 1]);
        let mut s = MagicScanner::default();
        assert!(!b"DMK".iter().any(|&b| s.push(b)));
        assert!(s.push(b'L'));
        assert!(!b"DMKX".iter().any(|&b| s.push(b)), "a broken magic must not match");
    }
}
