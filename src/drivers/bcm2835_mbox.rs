//! The VideoCore firmware's mailbox ("brcm,bcm2835-mbox"), property channel 8: what only the
//! firmware knows on a Raspberry Pi — its revision, the board revision, the RAM it leaves to the
//! ARM (downstream device trees carry `/memory reg = <0 0>` for the firmware to fill, so a loader
//! that does not fill it leaves the kernel asking here) and the DMA channels it leaves to the ARM.
//!
//! The kernel asks once, at boot, before the memory map exists ([`init`]), with one message holding
//! all four tags, and keeps the answers ([`info`], [`dma_channels`]).
//!
//! Protocol (Raspberry Pi firmware wiki, "Mailbox property interface"; Linux's bcm2835-mailbox and
//! raspberrypi firmware drivers): the ARM writes `bus address | channel` to mailbox 1 when its
//! status says not full, and reads the reply word, the same value, from mailbox 0 when its status
//! says not empty. The message is a 16-byte aligned buffer of little-endian words: total size,
//! request code 0, tags (id, value buffer size, request/response word, value buffer), end tag 0.
//! The firmware answers in place: code 0x80000000 on success, and each tag it knows gets bit 31 of
//! its request/response word set, with the response length in the low bits.
//!
//! The VideoCore reads the buffer through its own bus, not through the ARM's caches: the buffer is
//! cleaned to the point of coherency before the request and invalidated before the answer is read,
//! and its address is the VC bus address from the mailbox's `dma-ranges` (the uncached 0xC0000000
//! alias of RAM on BCM2836/7 and BCM2711).

use core::fmt;

use crate::dma::busmap::{BusMap, DmaAddr};
use crate::dt::{DeviceTree, DtError, Node};
use crate::mm::addr::PhysAddr;

pub const COMPATIBLE: &str = "brcm,bcm2835-mbox";
/// The ARM-to-VC property channel.
pub const CHANNEL_PROPERTY: u32 = 8;
/// Bytes of the register block.
pub const REGS_SIZE: u64 = 0x40;

/// Property tags this driver asks for.
pub mod tag {
    pub const FIRMWARE_REVISION: u32 = 0x0000_0001;
    pub const BOARD_REVISION: u32 = 0x0001_0002;
    /// Base and size of the RAM the firmware leaves to the ARM.
    pub const ARM_MEMORY: u32 = 0x0001_0005;
    /// Mask of the DMA channels the firmware leaves to the ARM.
    pub const DMA_CHANNELS: u32 = 0x0006_0001;
}

const REQUEST: u32 = 0;
const RESPONSE_OK: u32 = 0x8000_0000;
const TAG_RESPONSE: u32 = 1 << 31;

/// Words of the boot query: header (2), four tags (4 + 4 + 5 + 4 words), end tag.
pub const QUERY_WORDS: usize = 20;

/// What the firmware answered; a tag it did not answer is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FirmwareInfo {
    pub firmware_revision: Option<u32>,
    pub board_revision: Option<u32>,
    /// The ARM's RAM as (base, size), in ARM physical addresses.
    pub arm_memory: Option<(u32, u32)>,
    pub dma_channels: Option<u32>,
}

/// `revision 0x548e1, board revision 0xa02082, DMA channels granted 0x3c`, for the boot banner
/// (the memory is reported where it is used); a tag without an answer shows as such.
impl fmt::Display for FirmwareInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = |f: &mut fmt::Formatter<'_>, v: Option<u32>| match v {
            Some(v) => write!(f, "{v:#x}"),
            None => f.write_str("(no answer)"),
        };
        f.write_str("revision ")?;
        hex(f, self.firmware_revision)?;
        f.write_str(", board revision ")?;
        hex(f, self.board_revision)?;
        f.write_str(", DMA channels granted ")?;
        hex(f, self.dma_channels)
    }
}

/// Why the firmware could not be asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MboxError {
    /// The mailbox node is malformed (its `reg` or the `dma-ranges` above it).
    Dt(DtError),
    /// The registers could not be mapped.
    Unmappable { base: u64 },
    /// The message buffer has no VC bus address below 4 GiB (the mailbox carries 32 bits).
    NotBusAddressable { phys: u64 },
    /// Mailbox 1 stayed full: the firmware is not taking requests.
    SendTimeout,
    /// No reply on mailbox 0 within the time-out.
    ReplyTimeout,
    /// The firmware answered the message with a code other than success.
    Rejected { code: u32 },
}

impl From<DtError> for MboxError {
    fn from(e: DtError) -> Self {
        MboxError::Dt(e)
    }
}

impl fmt::Display for MboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MboxError::Dt(e) => write!(f, "device tree: {e}"),
            MboxError::Unmappable { base } => write!(f, "registers at {base:#x} cannot be mapped"),
            MboxError::NotBusAddressable { phys } => {
                write!(f, "message buffer at {phys:#x} has no 32-bit VC bus address")
            }
            MboxError::SendTimeout => f.write_str("mailbox stayed full: the firmware takes no requests"),
            MboxError::ReplyTimeout => f.write_str("no reply from the firmware within the time-out"),
            MboxError::Rejected { code } => write!(f, "the firmware rejected the request (code {code:#x})"),
        }
    }
}

/// The boot query: firmware revision, board revision, ARM memory, DMA channels.
#[rustfmt::skip]
pub fn query_message() -> [u32; QUERY_WORDS] {
    [
        (QUERY_WORDS * 4) as u32,
        REQUEST,
        tag::FIRMWARE_REVISION, 4, 0, 0,
        tag::BOARD_REVISION, 4, 0, 0,
        tag::ARM_MEMORY, 8, 0, 0, 0,
        tag::DMA_CHANNELS, 4, 0, 0,
        0,
    ]
}

/// Reads the firmware's answer to a property message. Each tag is found by walking the message
/// (never past its end, whatever the sizes in it say); a tag without the response bit, or with a
/// response shorter than its value, is left `None`.
pub fn parse_reply(words: &[u32]) -> Result<FirmwareInfo, MboxError> {
    let code = words.get(1).copied().unwrap_or(0);
    if code != RESPONSE_OK {
        return Err(MboxError::Rejected { code });
    }
    let mut info = FirmwareInfo::default();
    let mut i = 2;
    while let Some(&id) = words.get(i) {
        if id == 0 {
            break;
        }
        let (Some(&buf_bytes), Some(&status)) = (words.get(i + 1), words.get(i + 2)) else { break };
        let value_words = (buf_bytes as usize).div_ceil(4);
        let Some(value) = words.get(i + 3..).and_then(|rest| rest.get(..value_words)) else { break };
        let answered = status & TAG_RESPONSE != 0;
        let len = (status & !TAG_RESPONSE) as usize;
        let word = |n: usize| if answered && len >= (n + 1) * 4 { value.get(n).copied() } else { None };
        match id {
            tag::FIRMWARE_REVISION => info.firmware_revision = word(0),
            tag::BOARD_REVISION => info.board_revision = word(0),
            tag::ARM_MEMORY => info.arm_memory = word(0).zip(word(1)),
            tag::DMA_CHANNELS => info.dma_channels = word(0),
            _ => {}
        }
        i += 3 + value_words;
    }
    Ok(info)
}

/// The VC bus address of the message buffer at `phys`, through the `dma-ranges` above the mailbox
/// node. A tree without `dma-ranges` (the 2016 downstream Pi 2 tree) gives the identity: then the
/// uncached 0xC0000000 alias every BCM2836/7 and BCM2711 VideoCore decodes for the first GiB is
/// used, as the firmware's own trees say on those chips.
pub fn bus_address(mbox: &Node<'_>, phys: u64, len: u64) -> Result<u32, MboxError> {
    const UNCACHED_ALIAS: u64 = 0xc000_0000;
    let map = BusMap::from_dt(mbox)?;
    let bus = if map.is_identity() {
        (phys.checked_add(len).is_some_and(|end| end <= 1 << 30)).then_some(DmaAddr(phys | UNCACHED_ALIAS))
    } else {
        map.phys_to_bus(PhysAddr(phys), len)
    };
    bus.and_then(|b| u32::try_from(b.0).ok()).ok_or(MboxError::NotBusAddressable { phys })
}

/// The mailbox node, if the tree has one that is available.
pub fn find<'a>(dt: &DeviceTree<'a>) -> Option<Node<'a>> {
    dt.find_compatible(COMPATIBLE).next()
}

/// The answers of the boot query, once [`init`] got them.
static INFO: spin::Once<FirmwareInfo> = spin::Once::new();

/// What the firmware answered at boot; `None` without a mailbox or without an answer.
pub fn info() -> Option<FirmwareInfo> {
    INFO.get().copied()
}

/// The mask of the DMA channels the firmware leaves to the ARM (bit n: channel n); `None` when
/// there is no mailbox or the firmware did not answer that tag.
pub fn dma_channels() -> Option<u32> {
    info().and_then(|i| i.dma_channels)
}

#[cfg(target_os = "none")]
pub use hw::init;

#[cfg(target_os = "none")]
mod hw {
    use super::*;
    use crate::arch;
    use core::ptr::{read_volatile, write_volatile};

    // Register offsets: mailbox 0 (VC to ARM) read and status, mailbox 1 (ARM to VC) write and
    // status.
    const MBOX0_READ: usize = 0x00;
    const MBOX0_STATUS: usize = 0x18;
    const MBOX1_WRITE: usize = 0x20;
    const MBOX1_STATUS: usize = 0x38;
    const STATUS_FULL: u32 = 1 << 31;
    const STATUS_EMPTY: u32 = 1 << 30;
    /// The firmware answers property requests in microseconds to milliseconds (clock changes take
    /// longest); Linux's driver waits one second.
    const TIMEOUT_MS: u64 = 1000;
    /// Most stale words drained from mailbox 0 before a request.
    const MAX_STALE: usize = 64;

    /// The message buffer: whole cache lines of its own (64 bytes on every Pi core), so that the
    /// cache maintenance around the call touches nothing else.
    #[repr(C, align(64))]
    struct Buffer([u32; 32]);

    static BUFFER: spin::Mutex<Buffer> = spin::Mutex::new(Buffer([0; 32]));

    struct Regs(usize);

    impl Regs {
        fn read(&self, off: usize) -> u32 {
            // SAFETY: `init` mapped the mailbox's register block at this identity address.
            unsafe { read_volatile((self.0 + off) as *const u32) }
        }
        fn write(&self, off: usize, v: u32) {
            // SAFETY: as in `read`.
            unsafe { write_volatile((self.0 + off) as *mut u32, v) }
        }
    }

    /// Spins until `ready` or the time-out; false on time-out. The counter's frequency is whatever
    /// the firmware programmed (19.2 MHz or 54 MHz on a Pi, 62.5 MHz under QEMU).
    fn wait(mut ready: impl FnMut() -> bool) -> bool {
        let freq = arch::counter::frequency().max(1);
        let deadline = arch::counter::read().saturating_add(freq.saturating_mul(TIMEOUT_MS) / 1000);
        while !ready() {
            if arch::counter::read() > deadline {
                return false;
            }
            core::hint::spin_loop();
        }
        true
    }

    /// Finds the mailbox, maps its registers into the early tables, asks the firmware the boot
    /// query and keeps the answer for [`info`] and [`dma_channels`]. `Ok(None)` when the tree has
    /// no mailbox (QEMU virt). Called once by the boot path, after the console and before the
    /// memory map; the buffer is in the kernel image, which the early tables map.
    pub fn init(dt: &DeviceTree<'_>) -> Result<Option<FirmwareInfo>, MboxError> {
        let Some(node) = find(dt) else { return Ok(None) };
        let base = dt.reg0(&node)?.base().0;
        crate::mm::kmap::early_map_device(base, REGS_SIZE).map_err(|_| MboxError::Unmappable { base })?;
        let regs = Regs(base as usize);
        let mut buf = BUFFER.lock();
        let addr = buf.0.as_mut_ptr() as usize;
        let len = core::mem::size_of::<Buffer>();
        let bus = bus_address(&node, addr as u64, len as u64)?;
        let msg = query_message();
        for (i, w) in msg.iter().enumerate() {
            // SAFETY: `i` < QUERY_WORDS <= the buffer's 32 words; volatile so that the stores are
            // not deferred past the cache maintenance.
            unsafe { write_volatile(buf.0.as_mut_ptr().add(i), *w) };
        }
        // The VC reads memory, not the ARM's caches.
        arch::cache::clean_invalidate(addr, len);
        for _ in 0..MAX_STALE {
            if regs.read(MBOX0_STATUS) & STATUS_EMPTY != 0 {
                break;
            }
            regs.read(MBOX0_READ);
        }
        if !wait(|| regs.read(MBOX1_STATUS) & STATUS_FULL == 0) {
            return Err(MboxError::SendTimeout);
        }
        let word = bus | CHANNEL_PROPERTY;
        regs.write(MBOX1_WRITE, word);
        // Replies on other channels (none are expected at boot) are skipped.
        if !wait(|| regs.read(MBOX0_STATUS) & STATUS_EMPTY == 0 && regs.read(MBOX0_READ) == word) {
            return Err(MboxError::ReplyTimeout);
        }
        // Lines the CPU may have fetched speculatively while the VC wrote the answer are stale.
        arch::cache::invalidate(addr, len);
        let mut reply = [0u32; QUERY_WORDS];
        for (i, w) in reply.iter_mut().enumerate() {
            // SAFETY: as for the stores above.
            *w = unsafe { read_volatile(buf.0.as_ptr().add(i)) };
        }
        let info = parse_reply(&reply)?;
        Ok(Some(*INFO.call_once(|| info)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::fixtures::*;

    /// A reply as QEMU 10's raspi3b machine gives it (values read under QEMU: firmware 0x548e1,
    /// board 0xa02082, ARM memory 0 + 0x3c000000, DMA channels 0x3c).
    fn qemu_reply() -> [u32; QUERY_WORDS] {
        let mut r = query_message();
        r[1] = RESPONSE_OK;
        r[4] = TAG_RESPONSE | 4;
        r[5] = 0x548e1;
        r[8] = TAG_RESPONSE | 4;
        r[9] = 0xa0_2082;
        r[12] = TAG_RESPONSE | 8;
        r[13] = 0;
        r[14] = 0x3c00_0000;
        r[17] = TAG_RESPONSE | 4;
        r[18] = 0x3c;
        r
    }

    #[test]
    fn query_layout_is_the_firmware_format() {
        let m = query_message();
        assert_eq!(m[0] as usize, m.len() * 4);
        assert_eq!(m[0] % 4, 0);
        // Tag ids at the offsets the value sizes imply; end tag last.
        assert_eq!((m[2], m[6], m[10], m[15]), (1, 0x10002, 0x10005, 0x60001));
        assert_eq!((m[3], m[7], m[11], m[16]), (4, 4, 8, 4));
        assert_eq!(m[QUERY_WORDS - 1], 0);
    }

    #[test]
    fn reply_is_read_tag_by_tag() {
        let info = parse_reply(&qemu_reply()).unwrap();
        assert_eq!(
            info,
            FirmwareInfo {
                firmware_revision: Some(0x548e1),
                board_revision: Some(0xa0_2082),
                arm_memory: Some((0, 0x3c00_0000)),
                dma_channels: Some(0x3c),
            }
        );
    }

    #[test]
    fn banner_line() {
        let info = parse_reply(&qemu_reply()).unwrap();
        assert_eq!(info.to_string(), "revision 0x548e1, board revision 0xa02082, DMA channels granted 0x3c");
        let none = FirmwareInfo { board_revision: Some(0xb03115), ..FirmwareInfo::default() };
        assert_eq!(none.to_string(), "revision (no answer), board revision 0xb03115, DMA channels granted (no answer)");
    }

    #[test]
    fn unanswered_or_short_tags_are_none() {
        let mut r = qemu_reply();
        r[17] = 4; // DMA channels: no response bit.
        r[12] = TAG_RESPONSE | 4; // ARM memory: only one word answered.
        let info = parse_reply(&r).unwrap();
        assert_eq!(info.dma_channels, None);
        assert_eq!(info.arm_memory, None);
        assert_eq!(info.board_revision, Some(0xa0_2082));
    }

    #[test]
    fn rejected_and_malformed_replies() {
        let mut r = qemu_reply();
        r[1] = 0x8000_0001;
        assert_eq!(parse_reply(&r), Err(MboxError::Rejected { code: 0x8000_0001 }));
        assert_eq!(parse_reply(&query_message()), Err(MboxError::Rejected { code: 0 }));
        assert_eq!(parse_reply(&[]), Err(MboxError::Rejected { code: 0 }));
        // A value size running past the end stops the walk; earlier tags are kept.
        let mut r = qemu_reply();
        r[7] = 0xffff_fff0;
        let info = parse_reply(&r).unwrap();
        assert_eq!(info.firmware_revision, Some(0x548e1));
        assert_eq!((info.board_revision, info.dma_channels), (None, None));
        // No end tag: the walk ends with the slice.
        let info = parse_reply(&qemu_reply()[..QUERY_WORDS - 1]).unwrap();
        assert_eq!(info.dma_channels, Some(0x3c));
    }

    #[test]
    fn buffer_bus_address_uses_the_uncached_alias() {
        // Pi 3 and Pi 4 downstream: /soc dma-ranges map RAM at 0 to bus 0xc0000000.
        for blob in [RPI3B_DOWNSTREAM, RPI4B_DOWNSTREAM] {
            let dt = DeviceTree::from_bytes(blob).unwrap();
            let mbox = find(&dt).unwrap();
            assert_eq!(dt.reg0(&mbox).unwrap().base().0 & 0xfff, 0x880);
            assert_eq!(bus_address(&mbox, 0x8_1040, 128), Ok(0xc008_1040));
            // Past the 1 GiB window: not addressable.
            assert_eq!(bus_address(&mbox, 0x4000_0000, 128), Err(MboxError::NotBusAddressable { phys: 0x4000_0000 }));
        }
        // The 2016 Pi 2 tree has no dma-ranges: the alias is used anyway for the first GiB.
        let dt = DeviceTree::from_bytes(RPI2B_DOWNSTREAM_2016).unwrap();
        let mbox = find(&dt).unwrap();
        assert_eq!(bus_address(&mbox, 0x1_0040, 128), Ok(0xc001_0040));
        assert!(bus_address(&mbox, 0x3fff_ffc0, 128).is_err());
        // QEMU virt has no mailbox.
        assert!(find(&DeviceTree::from_bytes(QEMU_VIRT_A53_128M).unwrap()).is_none());
    }
}
