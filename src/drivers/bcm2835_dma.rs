//! The BCM2835 DMA engine ("brcm,bcm2835-dma": Pi 1-3 at 0x7e007000 bus / 0x3f007000 ARM, the
//! Pi 4's legacy channels at 0xfe007000): memory-to-memory copies described by chains of control
//! blocks. Registers and control-block format from BCM2835 ARM Peripherals, chapter 4.
//!
//! - Channels: those of `brcm,dma-channel-mask` that the firmware also grants through the
//!   mailbox ([`crate::drivers::bcm2835_mbox::dma_channels`]); without a mailbox, the DT's mask
//!   alone (what the firmware wrote there). Channel 15 (a separate block) is never used. Channels
//!   7-14 are "lite" (BCM2835 / BCM2711 datasheets; also flagged in their DEBUG register): at most
//!   65532 bytes per control block and no 2-D mode.
//! - Control blocks (8 words, 32-byte aligned) live in coherent memory from the DMA API
//!   ([`Device::alloc_coherent`]) of the DT node's device; data buffers are the caller's, mapped
//!   with the streaming API of [`Bcm2835Dma::dev`]. Every address the engine sees is a bus address
//!   of that device: its bus map comes from `/soc dma-ranges` (RAM at 0xC000_0000 on the BCM2836/7
//!   and BCM2711), and the engine takes 32-bit addresses only.
//! - One transfer is a chain of [`Step`]s (NEXTCONBK), each linear or 2-D (TI.TDMODE: YLENGTH + 1
//!   rows of XLENGTH bytes, a signed source and destination stride added after each row; the
//!   datasheet's "YLENGTH rows" is off by one, as QEMU's model has it since its 2019 fix, checked
//!   by its author on a Pi 3 B+), always
//!   incrementing both addresses, with TI.WAIT_RESP so that each write has landed before the next
//!   control block is fetched and before the channel reports the end.
//! - Completion: by interrupt when the channel's line (`interrupt-names` "dmaN"; channels 11-14
//!   share one on the BCM2835, 7+8 and 9+10 on the BCM2711) reached a running controller
//!   ([`crate::irq`]): only the last control block has TI.INTEN, the handler clears CS.INT (write 1
//!   to clear) and records the channel; else, or when asked, by polling CS.ACTIVE and the control
//!   block address. Both give up after a time-out, abort and reset the channel and return
//!   [`DmaEngineError::Timeout`].
//! - Lengths (linear, and a 2-D row) must be non-zero multiples of 4: the engine copies bytes, but
//!   QEMU's model moves 32-bit words and, given anything else, counts down past zero for about
//!   four billion iterations; the same refusal on a board keeps the two alike.
//!
//! Out of scope: the BCM2711's 40-bit "DMA4" channels ("brcm,bcm2711-dma", a different register
//! layout), peripheral (DREQ-paced) transfers, and channel 15.

use core::fmt;

use crate::dma::api::DmaError;
use crate::dma::busmap::DmaAddr;

/// Bytes (and 32-bit words) of a control block; its required alignment.
pub const CB_BYTES: usize = 32;
pub const CB_WORDS: usize = 8;
/// Channels of the main block (0-14); 15 is elsewhere and not used.
pub const CHANNELS: u32 = 15;
const CHANNEL_MASK: u32 = (1 << CHANNELS) - 1;
/// The lite channels (7-14) by number.
pub const LITE_CHANNELS: u32 = 0x7f80;
/// Longest linear block of a full channel (TXFR_LEN has 30 bits) and of a lite one (16 bits),
/// rounded down to a multiple of 4.
pub const MAX_LEN: u32 = (1 << 30) - 4;
pub const MAX_LEN_LITE: u32 = (1 << 16) - 4;
/// Most rows of a 2-D block (YLENGTH, 14 bits, holds rows - 1), longest row (XLENGTH 16 bits).
pub const MAX_ROWS: u16 = 1 << 14;
pub const MAX_ROW_LEN: u16 = u16::MAX - 3;
/// Most control blocks in one transfer (they share one coherent page).
pub const MAX_STEPS: usize = 4096 / CB_BYTES;

// Transfer information (TI) bits.
const TI_INTEN: u32 = 1 << 0;
const TI_TDMODE: u32 = 1 << 1;
const TI_WAIT_RESP: u32 = 1 << 3;
const TI_DEST_INC: u32 = 1 << 4;
const TI_SRC_INC: u32 = 1 << 8;

/// How much one control block moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `len` consecutive bytes.
    Linear { len: u32 },
    /// `rows` rows of `row_len` bytes; after each row the source address moves on by
    /// `src_stride` and the destination by `dst_stride` bytes (so a row pitch of P is a stride of
    /// P - row_len).
    Rect { row_len: u16, rows: u16, src_stride: i16, dst_stride: i16 },
}

impl Shape {
    /// Bytes moved.
    pub fn bytes(&self) -> u64 {
        match *self {
            Shape::Linear { len } => u64::from(len),
            Shape::Rect { row_len, rows, .. } => u64::from(row_len) * u64::from(rows),
        }
    }
}

/// One control block: copy `shape` from bus address `src` to bus address `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub src: DmaAddr,
    pub dst: DmaAddr,
    pub shape: Shape,
}

/// Why a transfer was refused or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaEngineError {
    /// No available "brcm,bcm2835-dma" node.
    NotFound,
    /// The node is malformed (reg, brcm,dma-channel-mask, dma-ranges).
    Dt(crate::dt::DtError),
    /// Its registers at `base` could not be mapped (no room in the kernel's page tables).
    Map { base: u64 },
    /// No channel is both in the DT mask and granted by the firmware (`granted` is `None` without
    /// a mailbox), or all of them are in use.
    NoChannel { dt_mask: u32, granted: Option<u32>, busy: u32 },
    /// A length the engine (or QEMU's model of it) cannot do.
    BadLength { len: u64, why: &'static str },
    /// 2-D mode asked of a lite channel.
    NoRectOnLite { channel: u32 },
    /// A bus address (or a block's end) beyond the engine's 32 bits.
    AddressTooWide(DmaAddr),
    /// A control block address that is not 32-byte aligned.
    MisalignedControlBlock(DmaAddr),
    /// No steps, or more than [`MAX_STEPS`].
    StepCount(usize),
    /// Interrupt completion asked on a channel whose line is not wired (the reason).
    NoInterrupt { channel: u32, why: crate::irq::IrqError },
    /// The channel did not finish in time; it was aborted and reset.
    Timeout { channel: u32, ns: u64, cs: u32, conblk: u32 },
    /// The channel reported an error (CS.ERROR, DEBUG's error bits).
    Engine { channel: u32, cs: u32, debug: u32 },
    /// The DMA API refused the control blocks' memory or a free.
    Dma(DmaError),
}

impl From<DmaError> for DmaEngineError {
    fn from(e: DmaError) -> Self {
        DmaEngineError::Dma(e)
    }
}

impl fmt::Display for DmaEngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaEngineError::NotFound => f.write_str("no brcm,bcm2835-dma controller in the device tree"),
            DmaEngineError::Dt(e) => write!(f, "DMA controller node: {e}"),
            DmaEngineError::Map { base } => write!(f, "the DMA controller's registers at {base:#x} could not be mapped"),
            DmaEngineError::NoChannel { dt_mask, granted, busy } => match granted {
                Some(g) => write!(f, "no free DMA channel: brcm,dma-channel-mask {dt_mask:#06x}, firmware grants {g:#06x}, in use {busy:#06x}"),
                None => write!(f, "no free DMA channel: brcm,dma-channel-mask {dt_mask:#06x} (no mailbox to ask the firmware), in use {busy:#06x}"),
            },
            DmaEngineError::BadLength { len, why } => write!(f, "DMA length {len}: {why}"),
            DmaEngineError::NoRectOnLite { channel } => write!(f, "channel {channel} is a lite channel, which has no 2-D mode"),
            DmaEngineError::AddressTooWide(a) => write!(f, "bus address {a} is beyond the DMA engine's 32 bits"),
            DmaEngineError::MisalignedControlBlock(a) => write!(f, "control block at {a} is not 32-byte aligned"),
            DmaEngineError::StepCount(n) => write!(f, "{n} control blocks in one transfer (1..={MAX_STEPS})"),
            DmaEngineError::NoInterrupt { channel, why } => write!(f, "channel {channel} has no usable interrupt: {why}"),
            DmaEngineError::Timeout { channel, ns, cs, conblk } => write!(
                f,
                "channel {channel} did not finish within {} ms (CS {cs:#010x}, control block {conblk:#010x}); it was aborted and reset",
                ns / 1_000_000
            ),
            DmaEngineError::Engine { channel, cs, debug } => write!(f, "channel {channel} reported an error (CS {cs:#010x}, DEBUG {debug:#010x})"),
            DmaEngineError::Dma(e) => write!(f, "DMA API: {e}"),
        }
    }
}

/// The channels the driver may use: the DT's mask, within the main block, and within what the
/// firmware grants when it says.
pub fn usable_channels(dt_mask: u32, granted: Option<u32>) -> u32 {
    dt_mask & CHANNEL_MASK & granted.unwrap_or(u32::MAX)
}

fn bus32(a: DmaAddr) -> Result<u32, DmaEngineError> {
    u32::try_from(a.as_u64()).map_err(|_| DmaEngineError::AddressTooWide(a))
}

fn check_len(len: u64, max: u32) -> Result<(), DmaEngineError> {
    let why = if len == 0 {
        "empty"
    } else if !len.is_multiple_of(4) {
        "not a multiple of 4 (QEMU's engine moves 32-bit words and would never finish)"
    } else if len > u64::from(max) {
        "longer than one control block of this channel can move"
    } else {
        return Ok(());
    };
    Err(DmaEngineError::BadLength { len, why })
}

/// Checks that every byte a block touches from bus address `start` lies within 32 bits: `len`
/// bytes per row, rows `pitch` bytes apart (`pitch` may be negative: rows then go down).
fn reach_within_32(start: DmaAddr, len: u64, rows: u64, pitch: i64) -> Result<(), DmaEngineError> {
    let travel = i128::from(pitch) * i128::from(rows.saturating_sub(1));
    let first = i128::from(start.as_u64());
    let (low, high) = (first + travel.min(0), first + travel.max(0) + i128::from(len));
    if low < 0 || high > 1 << 32 {
        return Err(DmaEngineError::AddressTooWide(start));
    }
    Ok(())
}

/// The control block for `step`, linked to `next` (0 ends the chain), raising the channel's
/// interrupt when done if `interrupt`; `lite` for a lite channel. Refuses what the engine cannot
/// do (see the module documentation).
pub fn encode(step: &Step, next: u32, interrupt: bool, lite: bool, channel: u32) -> Result<[u32; CB_WORDS], DmaEngineError> {
    let mut ti = TI_WAIT_RESP | TI_SRC_INC | TI_DEST_INC;
    if interrupt {
        ti |= TI_INTEN;
    }
    let (txfr_len, stride) = match step.shape {
        Shape::Linear { len } => {
            check_len(u64::from(len), if lite { MAX_LEN_LITE } else { MAX_LEN })?;
            (len, 0)
        }
        Shape::Rect { row_len, rows, src_stride, dst_stride } => {
            if lite {
                return Err(DmaEngineError::NoRectOnLite { channel });
            }
            check_len(u64::from(row_len), u32::from(MAX_ROW_LEN))?;
            if rows == 0 || rows > MAX_ROWS {
                return Err(DmaEngineError::BadLength { len: u64::from(rows), why: "2-D row count outside 1..=16384" });
            }
            ti |= TI_TDMODE;
            (u32::from(rows - 1) << 16 | u32::from(row_len), u32::from(dst_stride as u16) << 16 | u32::from(src_stride as u16))
        }
    };
    if !next.is_multiple_of(CB_BYTES as u32) {
        return Err(DmaEngineError::MisalignedControlBlock(DmaAddr(u64::from(next))));
    }
    match step.shape {
        Shape::Linear { len } => {
            reach_within_32(step.src, u64::from(len), 1, 0)?;
            reach_within_32(step.dst, u64::from(len), 1, 0)?;
        }
        Shape::Rect { row_len, rows, src_stride, dst_stride } => {
            let (len, rows) = (u64::from(row_len), u64::from(rows));
            reach_within_32(step.src, len, rows, i64::from(row_len) + i64::from(src_stride))?;
            reach_within_32(step.dst, len, rows, i64::from(row_len) + i64::from(dst_stride))?;
        }
    }
    Ok([ti, bus32(step.src)?, bus32(step.dst)?, txfr_len, stride, next, 0, 0])
}

#[cfg(target_os = "none")]
mod hw;
#[cfg(target_os = "none")]
pub use hw::*;
#[cfg(target_os = "none")]
mod ktests;

#[cfg(test)]
mod tests {
    use super::*;

    fn step(src: u64, dst: u64, shape: Shape) -> Step {
        Step { src: DmaAddr(src), dst: DmaAddr(dst), shape }
    }

    #[test]
    fn linear_block_encodes_per_datasheet() {
        let cb = encode(&step(0xc000_1000, 0xc000_2004, Shape::Linear { len: 4096 }), 0xc010_0020, false, false, 2).unwrap();
        // TI: WAIT_RESP (bit 3), DEST_INC (4), SRC_INC (8); no INTEN, no TDMODE.
        assert_eq!(cb, [0x0000_0118, 0xc000_1000, 0xc000_2004, 4096, 0, 0xc010_0020, 0, 0]);
        let last = encode(&step(0, 4, Shape::Linear { len: 4 }), 0, true, true, 9).unwrap();
        assert_eq!(last[0], 0x0000_0119, "INTEN on the last block");
        assert_eq!(last[5], 0, "end of chain");
    }

    #[test]
    fn rect_block_packs_lengths_and_signed_strides() {
        let s = Shape::Rect { row_len: 64, rows: 8, src_stride: 192, dst_stride: -64 };
        let cb = encode(&step(0x1000, 0x9000, s), 0, false, false, 0).unwrap();
        assert_eq!(cb[0], 0x0000_011a, "TDMODE set");
        assert_eq!(cb[3], 7 << 16 | 64, "YLENGTH (rows - 1) << 16 | XLENGTH");
        let tall = Shape::Rect { row_len: 4, rows: MAX_ROWS, src_stride: 0, dst_stride: 0 };
        assert_eq!(encode(&step(0x1000, 0x9000, tall), 0, false, false, 0).unwrap()[3], 0x3fff << 16 | 4);
        assert_eq!(cb[4], 0xffc0_00c0, "D_STRIDE (-64) << 16 | S_STRIDE (192)");
        assert_eq!(s.bytes(), 512);
    }

    #[test]
    fn lengths_the_engine_cannot_do_are_refused() {
        for len in [0, 1, 2, 3, 5, 4097, MAX_LEN + 4] {
            let r = encode(&step(0, 0x10000, Shape::Linear { len }), 0, false, false, 2);
            assert!(matches!(r, Err(DmaEngineError::BadLength { .. })), "{len}: {r:?}");
        }
        assert!(encode(&step(0, 0x10000, Shape::Linear { len: MAX_LEN }), 0, false, false, 2).is_ok());
        // Lite channels: 16-bit lengths, no 2-D.
        assert!(encode(&step(0, 0x10000, Shape::Linear { len: 65536 }), 0, false, true, 8).is_err());
        assert!(encode(&step(0, 0x10000, Shape::Linear { len: 65532 }), 0, false, true, 8).is_ok());
        let rect = Shape::Rect { row_len: 16, rows: 2, src_stride: 0, dst_stride: 0 };
        assert_eq!(encode(&step(0, 0x100, rect), 0, false, true, 8), Err(DmaEngineError::NoRectOnLite { channel: 8 }));
        for bad in [
            Shape::Rect { row_len: 6, rows: 2, src_stride: 0, dst_stride: 0 },
            Shape::Rect { row_len: 16, rows: 0, src_stride: 0, dst_stride: 0 },
            Shape::Rect { row_len: 16, rows: MAX_ROWS + 1, src_stride: 0, dst_stride: 0 },
        ] {
            assert!(matches!(encode(&step(0, 0x100, bad), 0, false, false, 0), Err(DmaEngineError::BadLength { .. })), "{bad:?}");
        }
    }

    #[test]
    fn addresses_must_fit_32_bits() {
        let wide = encode(&step(0x1_0000_0000, 0, Shape::Linear { len: 4 }), 0, false, false, 0);
        assert_eq!(wide, Err(DmaEngineError::AddressTooWide(DmaAddr(0x1_0000_0000))));
        // A block whose end passes 4 GiB.
        assert!(encode(&step(0, 0xffff_fffc, Shape::Linear { len: 8 }), 0, false, false, 0).is_err());
        assert!(encode(&step(0, 0xffff_fffc, Shape::Linear { len: 4 }), 0, false, false, 0).is_ok());
        // Rows going down below address 0.
        let down = Shape::Rect { row_len: 16, rows: 3, src_stride: -48, dst_stride: 0 };
        assert!(encode(&step(0x20, 0x1000, down), 0, false, false, 0).is_err());
        assert!(encode(&step(0x40, 0x1000, down), 0, false, false, 0).is_ok());
        // The next control block must be 32-byte aligned.
        assert_eq!(
            encode(&step(0, 4, Shape::Linear { len: 4 }), 0x1010, false, false, 0),
            Err(DmaEngineError::MisalignedControlBlock(DmaAddr(0x1010)))
        );
    }

    #[test]
    fn channels_are_the_intersection_of_dt_and_firmware() {
        // Pi 3 downstream DT and QEMU's firmware answer (rpi-qemu.md 2.2).
        assert_eq!(usable_channels(0x7f35, Some(0x3c)), 0x34);
        // No mailbox: the DT mask alone, channel 15 never.
        assert_eq!(usable_channels(0xffff, None), 0x7fff);
        assert_eq!(usable_channels(0x7f5, Some(0x3c)), 0x34, "Pi 4");
        assert_eq!(usable_channels(0x3, Some(0xc)), 0);
    }

    #[test]
    fn errors_read_well() {
        let e = DmaEngineError::Timeout { channel: 2, ns: 50_000_000, cs: 1, conblk: 0xc000_0020 };
        assert_eq!(e.to_string(), "channel 2 did not finish within 50 ms (CS 0x00000001, control block 0xc0000020); it was aborted and reset");
        let e = DmaEngineError::BadLength { len: 6, why: "x" };
        assert_eq!(e.to_string(), "DMA length 6: x");
    }
}
