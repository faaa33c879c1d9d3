//! The VideoCore firmware's mailbox ("brcm,bcm2835-mbox"), property channel 8: only the query the
//! DMA engine driver needs, "get DMA channels" (tag 0x60001), which says which channels the
//! firmware leaves to the ARM.
//!
//! Protocol (raspberrypi/firmware wiki, "Mailbox property interface"): the ARM writes the bus
//! address of a 16-byte aligned message, or-ed with the channel number, to mailbox 1 once it is
//! not full, then reads mailbox 0 until the answer for that channel comes back; the firmware has
//! rewritten the message in place. The VideoCore sees RAM through its bus aliases: the message
//! goes by its 0xC000_0000 alias (uncached for the VideoCore, what `/soc dma-ranges` gives on the
//! BCM2836/7/2711), and the CPU cleans it from its caches before and invalidates after.

use crate::arch;
use crate::kernel::boot_info;
use crate::mm::kmap;
use core::sync::atomic::{compiler_fence, Ordering};
use spin::{Mutex, Once};

const MBOX0_READ: usize = 0x00;
const MBOX0_STATUS: usize = 0x18;
const MBOX1_WRITE: usize = 0x20;
const MBOX1_STATUS: usize = 0x38;
const STATUS_FULL: u32 = 1 << 31;
const STATUS_EMPTY: u32 = 1 << 30;
const CHANNEL_PROPERTY: u32 = 8;
const TAG_GET_DMA_CHANNELS: u32 = 0x0006_0001;
const REQUEST: u32 = 0;
const RESPONSE_OK: u32 = 0x8000_0000;
/// The tag's response flag (bit 31 of its request/response word).
const TAG_RESPONSE: u32 = 1 << 31;
/// The VideoCore's uncached alias of ARM RAM.
const VC_RAM_ALIAS: u64 = 0xC000_0000;
/// Give up on the firmware after this long.
const TIMEOUT_NS: u64 = 100_000_000;

/// A property message: a header, one tag with a 4-byte value, the end tag; padded to a cache line
/// multiple so that maintenance covers nothing else.
#[repr(C, align(64))]
struct Message([u32; 16]);

static MESSAGE: Mutex<Message> = Mutex::new(Message([0; 16]));
static CHANNELS: Once<Option<u32>> = Once::new();

/// The DMA channel mask the firmware grants the ARM (bit n = channel n), asked once and
/// remembered; `None` when the DT has no mailbox or the firmware does not answer.
pub fn dma_channels() -> Option<u32> {
    *CHANNELS.call_once(query_dma_channels)
}

fn elapsed_ns(start: u64) -> u64 {
    let freq = u128::from(arch::counter::frequency().max(1));
    (u128::from(arch::counter::read().wrapping_sub(start)) * 1_000_000_000 / freq) as u64
}

fn query_dma_channels() -> Option<u32> {
    let dt = &boot_info().dt;
    let node = dt.find_compatible("brcm,bcm2835-mbox").next()?;
    let reg = dt.reg0(&node).ok()?;
    let base = kmap::ioremap(reg.base().0, reg.size()).ok()?;
    let read = |off: usize| {
        // SAFETY: a 32-bit register of the mailbox block, just mapped as device memory.
        unsafe { core::ptr::read_volatile((base + off) as *const u32) }
    };
    let write = |off: usize, v: u32| {
        // SAFETY: as in `read`; only this driver writes the mailbox.
        unsafe { core::ptr::write_volatile((base + off) as *mut u32, v) }
    };

    let mut msg = MESSAGE.lock();
    let words = &mut msg.0;
    let len = 7;
    words.fill(0);
    words[..len].copy_from_slice(&[(len * 4) as u32, REQUEST, TAG_GET_DMA_CHANNELS, 4, 0, 0, 0]);
    let va = words.as_ptr() as usize;
    // RAM is identity-mapped: the address is the physical one.
    let bus = u32::try_from(VC_RAM_ALIAS | va as u64).ok().filter(|_| (va as u64) < VC_RAM_ALIAS)?;
    compiler_fence(Ordering::SeqCst);
    arch::cache::clean_invalidate(va, core::mem::size_of::<Message>());

    let start = arch::counter::read();
    while read(MBOX1_STATUS) & STATUS_FULL != 0 {
        if elapsed_ns(start) > TIMEOUT_NS {
            return None;
        }
    }
    write(MBOX1_WRITE, bus | CHANNEL_PROPERTY);
    loop {
        if elapsed_ns(start) > TIMEOUT_NS {
            return None;
        }
        if read(MBOX0_STATUS) & STATUS_EMPTY != 0 {
            continue;
        }
        if read(MBOX0_READ) == bus | CHANNEL_PROPERTY {
            break;
        }
    }
    arch::cache::invalidate(va, core::mem::size_of::<Message>());
    compiler_fence(Ordering::SeqCst);
    // SAFETY: `words` is this lock's buffer; the volatile reads keep the compiler from using values
    // it wrote before the firmware rewrote the memory.
    let (code, tag_code, mask) = unsafe {
        (core::ptr::read_volatile(&words[1]), core::ptr::read_volatile(&words[4]), core::ptr::read_volatile(&words[5]))
    };
    (code == RESPONSE_OK && tag_code & TAG_RESPONSE != 0).then_some(mask)
}
