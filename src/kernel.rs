//! The boot path and the main job: from the boot assembly's hand-off to power-off.

use crate::arch;
use crate::bootargs::Bootargs;
use crate::dt::DeviceTree;
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::mm::kmap::{self, EarlyRange, ImageLayout};
use crate::mm::memmap::{HumanSize, MemoryMap, ReservationKind};
use crate::{drivers, ktest, println};
use core::fmt;
use spin::{Mutex, Once};

/// Exit statuses of the kernel (the QEMU process status under semihosting).
pub mod exit_code {
    pub const SUCCESS: u32 = 0;
    /// At least one test case failed.
    pub const TESTS_FAILED: u32 = 1;
    /// The boot could not go on: no or a malformed device tree, an unusable memory map, bad bootargs.
    pub const BOOT_ERROR: u32 = 2;
    /// A Rust panic.
    pub const PANIC: u32 = 3;
    /// An unexpected exception (abort, undefined instruction, ...).
    pub const EXCEPTION: u32 = 4;
}

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static __text_end: u8;
    static __rodata_end: u8;
}

/// The kernel image's physical range `[start, end)`, bss included.
pub fn image_range() -> (usize, usize) {
    (core::ptr::addr_of!(__image_start) as usize, core::ptr::addr_of!(__image_end) as usize)
}

/// Ends of the text and read-only sections, for the final mapping's permissions.
pub fn section_ends() -> (usize, usize) {
    (core::ptr::addr_of!(__text_end) as usize, core::ptr::addr_of!(__rodata_end) as usize)
}

/// Power off with `code`: semihosting when a host answers (QEMU), else PSCI SYSTEM_OFF, else the
/// BCM2835 power manager's halt (Raspberry Pi), else park. Without semihosting the status cannot
/// leave the machine, so it is printed first for whoever reads the console (a HIL runner).
pub fn exit(code: u32) -> ! {
    arch::semihosting::exit(code);
    crate::console::emergency_print(format_args!("dmakern: exit status {code}\n"));
    crate::console::flush();
    crate::drivers::psci::system_off();
    crate::drivers::bcm2835_pm::power_off();
    arch::cpu::wait_forever()
}

/// Report a fatal boot error and stop.
pub fn boot_error(args: fmt::Arguments) -> ! {
    crate::console::emergency_print(format_args!("dmakern: boot error: {args}\n"));
    exit(exit_code::BOOT_ERROR)
}

pub fn unexpected_exception(report: &dyn fmt::Display) -> ! {
    crate::console::emergency_print(format_args!("{report}"));
    if let Some((suite, n, case)) = crate::ktest::current_case() {
        crate::console::emergency_print(format_args!("    not ok {n} {case}\n# crashed in {suite}.{case}\nBail out! exception\n"));
    }
    exit(exit_code::EXCEPTION)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::console::emergency_print(format_args!("dmakern: panic: {info}\n"));
    if let Some((suite, n, case)) = crate::ktest::current_case() {
        crate::console::emergency_print(format_args!("    not ok {n} {case}\n# panicked in {suite}.{case}\nBail out! panic\n"));
    }
    exit(exit_code::PANIC)
}

/// Bootargs this kernel understands; others are reported and ignored.
pub const KNOWN_BOOTARGS: &[&str] = &["ktest.filter", "crash", "cma", "cma.report", "bench", "swiotlb", "dma.noncoherent", "edu.dma_mask", "dma.remap", "coherent_pool", "dma_debug", "stress", "iommu.strict", "iommu.passthrough"];

/// The kernel heap's size: bookkeeping only (DMA buffers never come from it).
const HEAP_SIZE: u64 = 4 << 20;

/// What the boot path found, for the rest of the kernel and the tests.
pub struct BootInfo {
    pub dt: DeviceTree<'static>,
    pub bootargs: Bootargs<'static>,
    pub memmap: Mutex<MemoryMap>,
    pub image: ImageLayout,
    pub entry_level: usize,
    /// The console's driver name and register address.
    pub console: Option<(&'static str, u64)>,
}

static BOOT: Once<BootInfo> = Once::new();

/// The boot information; available to everything that runs after the boot path (tests, drivers).
pub fn boot_info() -> &'static BootInfo {
    BOOT.get().expect("boot_info() before the boot path finished")
}

fn image_layout() -> ImageLayout {
    let (start, end) = image_range();
    let (text_end, rodata_end) = section_ends();
    ImageLayout { start: start as u64, text_end: text_end as u64, rodata_end: rodata_end as u64, end: end as u64 }
}

/// Size of the DTB at `ptr` if its header looks like one, read with the MMU off (aligned word
/// loads only); `None` if it does not, and `DeviceTree::from_ptr` then says why.
fn probe_dtb(ptr: usize) -> Option<u64> {
    if ptr == 0 || ptr % 8 != 0 {
        return None;
    }
    // SAFETY: a non-null, aligned pointer the boot loader passed as the DTB; reading its first two
    // words is what every boot protocol allows.
    let (magic, size) = unsafe { (core::ptr::read_volatile(ptr as *const u32), core::ptr::read_volatile((ptr + 4) as *const u32)) };
    // An implausible size is left to the parser to report: mapping it could not even succeed.
    let size = u32::from_be(size);
    (u32::from_be(magic) == 0xd00d_feed && size <= crate::dt::MAX_TOTALSIZE).then_some(size as u64)
}

/// The early UART given at build time (`DMAKERN_EARLY_UART=0x...`), for messages before the device
/// tree names a console.
const EARLY_UART: Option<u64> = match option_env!("DMAKERN_EARLY_UART") {
    Some(s) => Some(parse_hex(s)),
    None => None,
};

const fn parse_hex(s: &str) -> u64 {
    let b = s.as_bytes();
    let mut i = if b.len() > 2 && b[0] == b'0' && (b[1] == b'x' || b[1] == b'X') { 2 } else { 0 };
    let mut v: u64 = 0;
    while i < b.len() {
        let d = match b[i] {
            c @ b'0'..=b'9' => c - b'0',
            c @ b'a'..=b'f' => c - b'a' + 10,
            c @ b'A'..=b'F' => c - b'A' + 10,
            _ => panic!("DMAKERN_EARLY_UART must be a hexadecimal address"),
        };
        v = v * 16 + d as u64;
        i += 1;
    }
    v
}

/// The UARTs the console can be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Uart {
    /// "arm,pl011" (also "arm,pl011-axi", which lists it too).
    Pl011,
    /// "brcm,bcm2835-aux-uart", the Raspberry Pi's mini UART.
    MiniUart,
}

impl Uart {
    fn name(self) -> &'static str {
        match self {
            Uart::Pl011 => "pl011",
            Uart::MiniUart => "bcm2835 mini UART",
        }
    }

    /// The device range to map for it: the mini UART's enable bit is in the AUX block below it.
    fn mapping(self, base: u64) -> Option<(u64, u64)> {
        match self {
            Uart::Pl011 => Some((base, PAGE_SIZE)),
            Uart::MiniUart => {
                let aux = drivers::bcm2835_aux_uart::AUX_UART_OFFSET as u64;
                Some((base.checked_sub(aux)?, 2 * aux))
            }
        }
    }
}

static CONSOLE_PL011: Once<drivers::pl011::Pl011> = Once::new();
static CONSOLE_MINI_UART: Once<drivers::bcm2835_aux_uart::MiniUart> = Once::new();

/// Makes the UART at `base` (mapped by the caller) the console. For the mini UART, returns whether
/// the firmware's set-up was kept (see `MiniUart::init`).
fn start_console(kind: Uart, base: u64) -> bool {
    match kind {
        Uart::Pl011 => {
            // SAFETY: `base` is a PL011 register block named by the DT (or the build), mapped as
            // device memory by the caller, and used only by the console from now on.
            let uart = CONSOLE_PL011.call_once(|| unsafe { drivers::pl011::Pl011::new(base as usize) });
            uart.init();
            crate::console::set(uart);
            false
        }
        Uart::MiniUart => {
            // SAFETY: as above, for the mini UART; the caller mapped the AUX block below it too.
            let uart = CONSOLE_MINI_UART.call_once(|| unsafe { drivers::bcm2835_aux_uart::MiniUart::new(base as usize) });
            let kept = uart.init();
            crate::console::set(uart);
            kept
        }
    }
}

/// The console from /chosen/stdout-path: which UART and its register address.
fn find_console(dt: &DeviceTree<'static>) -> Result<Option<(Uart, u64)>, crate::dt::DtError> {
    let Some(stdout) = dt.stdout_path()? else { return Ok(None) };
    let kind = if stdout.node.is_compatible("arm,pl011") || stdout.node.is_compatible("arm,pl011-axi") {
        Uart::Pl011
    } else if stdout.node.is_compatible("brcm,bcm2835-aux-uart") {
        Uart::MiniUart
    } else {
        return Ok(None);
    };
    let reg = dt.reg0(&stdout.node)?;
    Ok(Some((kind, reg.base().0)))
}

/// Maps the BCM2835 power manager, if the tree has one, for `exit`'s power-off; its address.
fn find_power_manager(dt: &DeviceTree<'static>) -> Option<u64> {
    // One walk for all the compatibles: a walk of a large tree is tens of thousands of instructions.
    let node = dt.nodes().find(|n| drivers::bcm2835_pm::COMPATIBLES.iter().any(|c| n.is_compatible(c)))?;
    let base = dt.reg0(&node).ok()?.base().0;
    kmap::early_map_device(base, drivers::bcm2835_pm::REGS_SIZE).ok()?;
    drivers::bcm2835_pm::set_base(base as usize);
    Some(base)
}

/// RAM from the firmware's mailbox when the device tree describes none (downstream Raspberry Pi
/// trees leave `/memory reg = <0 0>` for the firmware to fill); says so when it is used. A memory
/// node that does not parse counts as describing RAM, so that the memory map reports it.
fn firmware_ram(dt: &DeviceTree<'_>, fw: Option<&drivers::bcm2835_mbox::FirmwareInfo>) -> Option<crate::mm::memmap::Region> {
    // The firmware's answer first: without a mailbox (QEMU virt) there is nothing to walk for.
    let (base, size) = fw?.arm_memory?;
    if dt.memory().any(|r| r.map_or(true, |r| !r.is_empty())) {
        return None;
    }
    let ram = crate::mm::memmap::Region::new(PhysAddr(u64::from(base)), u64::from(size)).filter(|r| !r.is_empty())?;
    println!("memory: the device tree describes no RAM; the firmware's mailbox gives {ram} ({})", HumanSize(ram.size()));
    Some(ram)
}

/// Name of the CPU from MIDR (implementer Arm only; others by number).
fn cpu_name(midr: u64) -> &'static str {
    if (midr >> 24) & 0xff != 0x41 {
        return "non-Arm CPU";
    }
    match (midr >> 4) & 0xfff {
        0xc07 => "Cortex-A7",
        0xc0f => "Cortex-A15",
        0xd03 => "Cortex-A53",
        0xd04 => "Cortex-A35",
        0xd05 => "Cortex-A55",
        0xd07 => "Cortex-A57",
        0xd08 => "Cortex-A72",
        0xd0b => "Cortex-A76",
        0xd0c => "Neoverse-N1",
        0xd40 => "Neoverse-V1",
        0xd49 => "Neoverse-N2",
        0xd4f => "Neoverse-V2",
        _ => "Arm CPU",
    }
}

#[no_mangle]
extern "C" fn dmakern_start_primary(dtb: usize, _load_base: usize, entry_level: usize) -> ! {
    arch::cpu::set_index(0);
    let image = image_layout();
    let dtb_size = probe_dtb(dtb);
    if dtb_size.is_none() {
        // Not a DTB: no console can be found. Say why on the early UART if there is one; reading
        // the header again here is safe with the MMU off.
        // SAFETY: as in `probe_dtb`.
        let err = unsafe { DeviceTree::from_ptr(dtb as *const u8) }.err();
        if let Some(uart) = EARLY_UART {
            start_console(Uart::Pl011, uart);
        }
        match err {
            Some(e) => boot_error(format_args!("device tree from the boot loader at {dtb:#x}: {e}")),
            None => boot_error(format_args!("device tree from the boot loader at {dtb:#x} is unreadable")),
        }
    }
    let mut early = [
        EarlyRange { base: image.start, size: image.end - image.start, device: false },
        EarlyRange { base: dtb as u64, size: dtb_size.unwrap_or(0), device: false },
        EarlyRange { base: EARLY_UART.unwrap_or(0), size: PAGE_SIZE, device: true },
    ];
    let nearly = if EARLY_UART.is_some() { 3 } else { 2 };
    // SAFETY: first thing on the boot CPU, MMU off; the ranges cover the image (code, stack, data)
    // and the DTB.
    if let Err(e) = unsafe { kmap::early_enable(&mut early[..nearly], &image) } {
        boot_error(format_args!("early page tables: {e}"));
    }
    if let Some(uart) = EARLY_UART {
        start_console(Uart::Pl011, uart);
    }

    // SAFETY: the pointer passed the header probe and the whole blob is mapped; the memory map
    // reserves it for good.
    let dt = match unsafe { DeviceTree::from_ptr(dtb as *const u8) } {
        Ok(dt) => dt,
        Err(e) => boot_error(format_args!("device tree at {dtb:#x}: {e}")),
    };
    if let Err(e) = dt.root_cells() {
        boot_error(format_args!("device tree at {dtb:#x}: {e}"));
    }
    let console = match find_console(&dt) {
        Ok(c) => c,
        Err(e) => boot_error(format_args!("/chosen/stdout-path: {e}")),
    };
    let mut firmware_uart_setup = false;
    if let Some((kind, base)) = console {
        let Some((map_base, map_size)) = kind.mapping(base) else {
            boot_error(format_args!("console at {base:#x}: not a {} register address", kind.name()));
        };
        if let Err(e) = kmap::early_map_device(map_base, map_size) {
            boot_error(format_args!("console at {base:#x}: {e}"));
        }
        if EARLY_UART != Some(base) {
            firmware_uart_setup = start_console(kind, base);
        }
    }
    let power_manager = find_power_manager(&dt);

    let model = dt.model().ok().flatten().unwrap_or("unknown board");
    let midr = arch::cpu::midr();
    let ncpus = dt.cpu_count().unwrap_or(0);
    println!();
    println!("dmakern {} ({}) on {model}", env!("CARGO_PKG_VERSION"), arch::NAME);
    println!(
        "cpu: {} (MIDR {midr:#010x}), {ncpus} CPU(s) in the DT; entered at {}, running at {}",
        cpu_name(midr),
        arch::cpu::exception_level_name(entry_level),
        arch::cpu::running_level_name()
    );
    println!(
        "loaded at {:#x} ({} image, {} with bss); device tree at {dtb:#x} ({} bytes)",
        image.start,
        HumanSize(image_file_size() as u64),
        HumanSize(image.end - image.start),
        dt.totalsize()
    );
    match console {
        Some((Uart::MiniUart, base)) if firmware_uart_setup => {
            println!("console: {} at {base:#x} (/chosen/stdout-path; the firmware's set-up kept)", Uart::MiniUart.name())
        }
        Some((Uart::MiniUart, base)) => println!(
            "console: {} at {base:#x} (/chosen/stdout-path; enabled at {} baud assuming a {} MHz core clock)",
            Uart::MiniUart.name(),
            drivers::bcm2835_aux_uart::BAUD_RATE,
            drivers::bcm2835_aux_uart::ASSUMED_CORE_CLOCK_HZ / 1_000_000
        ),
        Some((kind, base)) => println!("console: {} at {base:#x} (/chosen/stdout-path)", kind.name()),
        None => println!("console: none usable in /chosen/stdout-path"),
    }
    if let Some(base) = power_manager {
        println!("power-off: bcm2835 power manager at {base:#x} (when neither semihosting nor PSCI answers)");
    }
    let firmware = match drivers::bcm2835_mbox::init(&dt) {
        Ok(info) => info,
        Err(e) => {
            println!("firmware: mailbox: {e}");
            None
        }
    };
    if let Some(fw) = firmware {
        println!("firmware: {fw} (mailbox)");
    }

    let cmdline = match dt.bootargs() {
        Ok(c) => c.unwrap_or(""),
        Err(e) => boot_error(format_args!("/chosen/bootargs: {e}")),
    };
    println!("bootargs: \"{cmdline}\"");
    let bootargs = match Bootargs::parse(cmdline) {
        Ok(b) => b,
        Err(e) => boot_error(format_args!("bootargs: {e}")),
    };
    for arg in bootargs.unknown(KNOWN_BOOTARGS) {
        println!("bootargs: unknown key `{}`, ignored", arg.key);
    }

    let firmware_ram = firmware_ram(&dt, firmware.as_ref());
    let mut memmap = match MemoryMap::from_dt_or_firmware(&dt, PhysAddr(image.start)..PhysAddr(image.end), firmware_ram) {
        Ok(m) => m,
        Err(e) => boot_error(format_args!("memory map: {e}")),
    };
    // SAFETY: once, after early_enable; `image` describes the running kernel.
    if let Err(e) = unsafe { kmap::build(&memmap, &image) } {
        boot_error(format_args!("kernel page tables: {e}"));
    }
    let heap = match memmap.alloc_early(HEAP_SIZE, PAGE_SIZE, cpu_addressable_limit(), ReservationKind::Heap, "kernel heap") {
        Ok(h) => h,
        Err(e) => boot_error(format_args!("kernel heap: {e}")),
    };
    // SAFETY: just reserved in the memory map for the heap alone, and mapped by the linear map.
    unsafe { crate::mm::heap::init(heap.0 as usize, HEAP_SIZE as usize) };

    // CMA areas first (recorded in the memory map), then the page allocator over what is left.
    crate::mm::cma::setup::init(&dt, &bootargs, &mut memmap);
    // The swiotlb bounce pools (platform and restricted) and `dma.noncoherent`, before the page
    // allocator.
    crate::dma::bounce::init(&dt, &bootargs, &mut memmap);
    match crate::mm::phys::init(&mut memmap) {
        Ok(summary) => println!("{summary}"),
        Err(e) => boot_error(format_args!("page allocator: {e}")),
    }
    memmap.seal();
    crate::dma::remap::init(&dt, &bootargs, &memmap, crate::dma::bounce::platform_dma_limit(&dt).0);
    crate::dma::debug::init(bootargs.get("dma_debug"));
    crate::dma::iommu::init(&bootargs);
    crate::iommu::smmuv3::init(&dt);

    println!("memory map:");
    let _ = memmap.write_to(&mut ConsoleWriter);
    if bootargs.has("cma.report") {
        crate::mm::cma::setup::print_report("");
    }
    // Interrupt controllers (every line off, IRQs masked at the CPU until a driver waits).
    crate::irq::init(&dt);

    match dt.psci() {
        Ok(Some(psci)) => {
            let method = match psci.method {
                crate::dt::PsciMethod::Hvc => "hvc",
                crate::dt::PsciMethod::Smc => "smc",
            };
            drivers::psci::init(method);
            match drivers::psci::version() {
                Some((maj, min)) => println!("psci: {maj}.{min} via {method}"),
                None => println!("psci: no answer via {method}"),
            }
        }
        Ok(None) => println!("psci: none in the DT"),
        Err(e) => println!("psci: ignored: {e}"),
    }
    crate::smp::start_secondaries(&dt);

    let console = console.map(|(kind, base)| (kind.name(), base));
    BOOT.call_once(|| BootInfo { dt, bootargs, memmap: Mutex::new(memmap), image, entry_level, console });
    let info = boot_info();

    if let Some(how) = info.bootargs.get("crash") {
        crash(how);
    }
    let filter = ktest::Filter::new(info.bootargs.get("ktest.filter"));
    let totals = ktest::run_all(&filter, || {
        let ticks = arch::counter::read();
        let freq = arch::counter::frequency().max(1);
        let ns = (ticks as u128 * 1_000_000_000 / freq as u128) as u64;
        println!("# boot: {ns} ns of virtual time from reset to this header (counter {ticks} at {freq} Hz; under --icount, instructions)");
        crate::bench::run_selected(info.bootargs.get("bench"));
    });
    println!("dmakern: {} passed, {} failed, {} skipped", totals.passed, totals.failed, totals.skipped);
    exit(if totals.failed == 0 { exit_code::SUCCESS } else { exit_code::TESTS_FAILED })
}

/// `crash=panic|abort|undef`: crash on purpose after boot, to check the crash reports (the QEMU
/// matrix asserts their text and exit status).
fn crash(how: &str) {
    println!("crash: as asked by the bootargs ({how})");
    match how {
        "panic" => panic!("deliberate panic (bootarg crash=panic)"),
        "abort" => {
            let addr = kmap::unmapped_address();
            // SAFETY: a deliberately faulting read of an unmapped address; the exception handler
            // reports it and ends the run.
            unsafe { core::ptr::read_volatile(addr as *const u32) };
        }
        "undef" => arch::cpu::undefined_instruction(),
        other => println!("crash: unknown kind `{other}` (panic, abort, undef); not crashing"),
    };
}

/// The end of what the CPU can address through the identity map: 4 GiB on armv7 (32-bit virtual
/// addresses), no limit on aarch64. Boot allocations the CPU touches stay below it.
pub fn cpu_addressable_limit() -> Option<u64> {
    (usize::MAX as u64).checked_add(1)
}

/// Bytes of the image file (up to the end of initialised data).
fn image_file_size() -> usize {
    extern "C" {
        static __data_end: u8;
    }
    core::ptr::addr_of!(__data_end) as usize - image_range().0
}

/// `core::fmt::Write` onto the console.
pub struct ConsoleWriter;

impl fmt::Write for ConsoleWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        crate::print!("{s}");
        Ok(())
    }
}

/// The boot memory map against the device tree it was built from, read again independently.
mod ktests {
    use super::boot_info;
    use crate::ktest::TestResult;
    use crate::mm::memmap::Region;
    use crate::{kassert, kassert_eq, ktry};
    use alloc::vec::Vec;

    /// Every region the DT, the loader and the linker say is taken: /memreserve/ entries,
    /// /reserved-memory regs, the DTB and the kernel image.
    fn taken() -> Result<Vec<(Region, &'static str)>, crate::dt::DtError> {
        let info = boot_info();
        let mut v = Vec::new();
        for r in info.dt.mem_reserve() {
            v.push((r?, "/memreserve/"));
        }
        for rm in info.dt.reserved_memory()? {
            let rm = rm?;
            if rm.is_available() {
                for r in rm.regs() {
                    v.push((r?, "/reserved-memory"));
                }
            }
        }
        v.extend(info.dt.phys_region().map(|r| (r, "dtb")));
        let img = info.image;
        v.extend(Region::new(crate::mm::addr::PhysAddr(img.start), img.end - img.start).map(|r| (r, "kernel")));
        Ok(v)
    }

    fn ram_matches_dt() -> TestResult {
        let info = boot_info();
        let mut total = 0u64;
        for r in info.dt.memory() {
            total += ktry!(r).size();
        }
        if total == 0 {
            // Downstream Raspberry Pi trees: the boot path took the RAM from the firmware.
            total = crate::drivers::bcm2835_mbox::info().and_then(|i| i.arm_memory).map_or(0, |m| u64::from(m.1));
        }
        kassert!(total > 0, "neither the DT nor the firmware describes RAM");
        kassert_eq!(info.memmap.lock().total_ram(), total);
        Ok(())
    }

    fn free_ranges_avoid_reservations() -> TestResult {
        let taken = ktry!(taken());
        kassert!(taken.len() >= 2, "expected at least the DTB and the kernel, got {taken:?}");
        let map = boot_info().memmap.lock();
        for free in map.free_ranges() {
            for (r, what) in &taken {
                kassert!(!free.overlaps(r), "free range {free} overlaps {what} {r}");
            }
        }
        Ok(())
    }

    fn free_ranges_inside_ram() -> TestResult {
        let map = boot_info().memmap.lock();
        let mut free_total = 0;
        for free in map.free_ranges() {
            kassert!(map.ram().iter().any(|bank| bank.contains(&free)), "free range {free} is not inside one RAM bank");
            free_total += free.size();
        }
        kassert_eq!(free_total, map.total_free());
        kassert!(free_total < map.total_ram(), "nothing reserved at all");
        Ok(())
    }

    crate::ktest_suite!("memmap", [ram_matches_dt, free_ranges_avoid_reservations, free_ranges_inside_ram]);
}
