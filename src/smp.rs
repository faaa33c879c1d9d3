//! Secondary CPUs: brought up by the device tree's `enable-method`, numbered in DT order after the
//! boot CPU (index 0), each with its own stack and its index in a CPU register
//! (`arch::cpu::index`). Three methods:
//! - "psci": PSCI CPU_ON (QEMU virt, Pi 5), which passes the CPU its parameters' address;
//! - "spin-table" (arm64 Pi 3/4 firmware stub, QEMU raspi3b/4b): the CPU waits in WFE polling its
//!   `cpu-release-addr`; the boot CPU writes the entry's physical address there (64 bits), cleans
//!   it to the point of coherency and sends an event;
//! - "brcm,bcm2836-smp" (32-bit Pi 2/3/4 firmware stub, QEMU raspi2b): the CPU polls its BCM2836
//!   local mailbox 3; the boot CPU writes the entry's physical address to that mailbox's set
//!   register (the "brcm,bcm2836-l1-intc" block + 0x8c + 0x10 * core).
//!
//! The last two pass no argument, so those CPUs enter through `arch::cpu::secondary_trampoline`,
//! which loads the parameters' address the boot CPU left in `arch::cpu::TRAMPOLINE_PARAMS`; the
//! boot CPU releases them one at a time, and stops releasing after one does not come online (it
//! might still read the shared address later). As Linux does, arm64 reads each CPU node's
//! `enable-method`, 32-bit Arm the `/cpus` node's first (the Pi trees name "brcm,bcm2836-smp" there
//! and "spin-table" in the CPU nodes, for the two kinds of kernel). A started CPU joins the boot CPU's
//! translation regime (the final kernel tables) and waits for work: [`on_each_cpu`] runs a
//! function on every online CPU at once and waits for all of them, which is how the stress run
//! and the per-CPU benchmarks use them.
//!
//! Per-CPU data is indexed by [`cpu_index`] (at most [`MAX_CPUS`]), e.g. the IOVA allocator's
//! magazines. TLB maintenance of the kernel tables is broadcast (inner-shareable) on both
//! architectures already, so page-table changes need nothing more once several CPUs run.
//!
//! Lock order, for everything that takes more than one lock: the kernel tables (`mm::kmap`)
//! before the page allocator (`mm::phys`); the vmap window's allocator is never held while the
//! kernel tables are changed; dma-debug's tracker before its guard state, which takes the kernel
//! tables; an IOVA allocator's CPU cache before its depot before its tree; a CPU never holds a
//! lock across [`on_each_cpu`].

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::arch;
use crate::println;

/// CPUs the kernel can run (the boot assembly reserves a stack for each).
pub const MAX_CPUS: usize = 8;
/// Stack of each CPU (`BOOT_STACK_SIZE` in the boot assembly).
const STACK_SIZE: usize = 0x10000;

/// What a secondary CPU's entry code (`secondary_entry`) loads, at the physical address PSCI
/// passes it (or the trampoline finds in `arch::cpu::TRAMPOLINE_PARAMS`): the boot CPU's translation registers (`arch::mmu::secondary_regs`), its stack top
/// and its index. Read with the MMU and caches off, so it is cleaned to the point of coherency
/// before the CPU is started.
#[repr(C, align(64))]
struct BootParams {
    regs: [u64; 4],
    stack_top: u64,
    cpu: u64,
}

static mut BOOT_PARAMS: [BootParams; MAX_CPUS] = [const { BootParams { regs: [0; 4], stack_top: 0, cpu: 0 } }; MAX_CPUS];

/// Bit i set: CPU i runs and waits for work.
static ONLINE: AtomicU64 = AtomicU64::new(1);
/// The work every CPU runs: a `fn(usize)` as an address, 0 for none.
static WORK: AtomicUsize = AtomicUsize::new(0);
/// Incremented for each piece of work; a CPU runs work whose generation it has not seen yet.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// CPUs that finished the current work.
static DONE: AtomicUsize = AtomicUsize::new(0);

/// The calling CPU's index (0 = the boot CPU).
#[inline(always)]
pub fn cpu_index() -> usize {
    arch::cpu::index()
}

/// How many CPUs are online (the boot CPU included).
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire).count_ones() as usize
}

/// How a CPU is released.
#[derive(Clone, Copy, Debug)]
enum Method {
    Psci,
    /// Write the entry to this physical address (the CPU's `cpu-release-addr`).
    SpinTable(u64),
    /// Write the entry to this mapped register (the CPU's local mailbox 3 set register).
    Bcm2836Mailbox(usize),
}

impl Method {
    /// Whether the CPU gets no argument and enters through the trampoline.
    fn uses_trampoline(self) -> bool {
        !matches!(self, Method::Psci)
    }
}

/// Offset of core 0's local mailbox 3 set register in the BCM2836 local interrupt controller.
const BCM2836_MAILBOX3_SET0: u64 = 0x8c;
const BCM2836_L1_INTC: &str = "brcm,bcm2836-l1-intc";

/// The method for `cpu` from the device tree (see the module documentation for which node's
/// `enable-method` counts), or why it cannot be used.
fn method_of(dt: &crate::dt::DeviceTree<'_>, cpu: &crate::dt::Cpu<'_>) -> Result<Method, &'static str> {
    let cpus_node = dt.find_node("/cpus").and_then(|n| n.property("enable-method")).and_then(|p| p.as_str().ok());
    let name = if cfg!(target_arch = "arm") { cpus_node.or(cpu.enable_method) } else { cpu.enable_method };
    match name {
        Some("psci") => Ok(Method::Psci),
        Some("spin-table") => {
            let addr = cpu.release_addr.ok_or("spin-table without cpu-release-addr")?;
            let va = usize::try_from(addr).map_err(|_| "cpu-release-addr is out of reach")?;
            // The table is RAM the linear map covers (the firmware's page at 0, kept by /memreserve/).
            match crate::mm::kmap::translate(va as u64) {
                None => Err("cpu-release-addr is not mapped"),
                Some(t) if t.attr.is_device() => Err("cpu-release-addr is not RAM"),
                Some(_) if addr % 8 != 0 => Err("cpu-release-addr is not 8-byte aligned"),
                Some(_) => Ok(Method::SpinTable(addr)),
            }
        }
        Some("brcm,bcm2836-smp") => {
            let intc = dt.find_compatible(BCM2836_L1_INTC).next().ok_or("no brcm,bcm2836-l1-intc node")?;
            let base = dt.reg0(&intc).map_err(|_| "brcm,bcm2836-l1-intc has no usable reg")?.base().0;
            let core = cpu.mpidr & 0xff;
            if core > 3 {
                return Err("the BCM2836 local controller has mailboxes for cores 0-3 only");
            }
            let reg = base + BCM2836_MAILBOX3_SET0 + 0x10 * core;
            let mapped = crate::mm::kmap::ioremap(reg, 4).map_err(|_| "cannot map the local controller")?;
            Ok(Method::Bcm2836Mailbox(mapped))
        }
        Some(_) => Err("unknown enable-method"),
        None => Err("no enable-method"),
    }
}

/// Starts every CPU of the device tree besides the boot CPU, by its enable method (see the module
/// documentation), waits for each to come online (a bounded wait), and reports what it did.
/// Returns the number of CPUs online. Called once, on the boot CPU, after the kernel tables are
/// final.
pub fn start_secondaries(dt: &crate::dt::DeviceTree<'_>) -> usize {
    arch::cpu::set_index(0);
    let cpus = match dt.cpus() {
        Ok(c) => c,
        Err(e) => {
            println!("smp: /cpus: {e}; only the boot CPU runs");
            return 1;
        }
    };
    let me = arch::cpu::mpidr();
    // Which node is the boot CPU: the one with its MPIDR; failing that, its core number (Aff0).
    // The Pi 2/3 trees give `reg = <0>`..<3> while the BCM2836 reports cluster 0xf in Aff1, and
    // Linux then falls back the same way.
    let exact = dt.cpus().is_ok_and(|mut c| c.any(|c| c.is_ok_and(|c| c.mpidr == me)));
    let is_boot_cpu = |mpidr: u64| if exact { mpidr == me } else { mpidr & 0xff == me & 0xff };
    let regs = arch::mmu::secondary_regs();
    let mut next = 1;
    for cpu in cpus.flatten().filter(|c| c.status == crate::dt::Status::Okay && !is_boot_cpu(c.mpidr)) {
        if next >= MAX_CPUS {
            println!("smp: more than {MAX_CPUS} CPUs; {:#x} and the rest stay off", cpu.mpidr);
            break;
        }
        let method = match method_of(dt, &cpu) {
            Ok(m) => m,
            Err(why) => {
                println!("smp: CPU {:#x}: {why} (enable-method {}); it stays off", cpu.mpidr, cpu.enable_method.unwrap_or("(none)"));
                continue;
            }
        };
        if start(next, cpu.mpidr, method, regs) {
            next += 1;
        } else if method.uses_trampoline() {
            println!("smp: not releasing more CPUs: a late one would read the next CPU's parameters");
            break;
        }
    }
    println!("smp: {} CPU(s) online", online());
    online()
}

/// Starts CPU `mpidr` as index `index` by `method`; true once it is online.
fn start(index: usize, mpidr: u64, method: Method, regs: [u64; 4]) -> bool {
    extern "C" {
        static boot_stacks: u8;
    }
    let stacks = core::ptr::addr_of!(boot_stacks) as usize;
    // SAFETY: slot `index` is written only here, before its CPU starts, on the boot CPU; the CPU
    // reads it once, after the clean below.
    let params = unsafe { &mut *core::ptr::addr_of_mut!(BOOT_PARAMS[index]) };
    *params = BootParams { regs, stack_top: (stacks + (index + 1) * STACK_SIZE) as u64, cpu: index as u64 };
    let addr = params as *const BootParams as usize;
    arch::cache::clean(addr, core::mem::size_of::<BootParams>());
    if method.uses_trampoline() {
        // Read by the released CPU with its MMU and caches off, before it knows anything else.
        arch::cpu::TRAMPOLINE_PARAMS.store(addr, Ordering::Release);
        arch::cache::clean(arch::cpu::TRAMPOLINE_PARAMS.as_ptr() as usize, core::mem::size_of::<usize>());
    }
    arch::cache::dsb();
    let entry = arch::cpu::secondary_trampoline();
    match method {
        Method::Psci => {
            if let Err(e) = crate::drivers::psci::cpu_on(mpidr, arch::cpu::secondary_entry(), addr as u64) {
                println!("smp: CPU {mpidr:#x}: PSCI CPU_ON failed: {e}");
                return false;
            }
        }
        Method::SpinTable(release) => {
            let release = release as usize;
            // SAFETY: `method_of` checked that the release address is mapped, aligned RAM; it is
            // the firmware's spin table, which this CPU's slot belongs to and nothing else uses.
            unsafe { core::ptr::write_volatile(release as *mut u64, entry) };
            // The waiting CPU polls memory with its caches off.
            arch::cache::clean(release, 8);
            arch::cpu::send_event();
        }
        Method::Bcm2836Mailbox(reg) => {
            // SAFETY: `method_of` mapped this CPU's mailbox 3 set register; writing it is how the
            // firmware's stub is told where to go (and only that CPU reads it).
            unsafe { core::ptr::write_volatile(reg as *mut u32, entry as u32) };
            arch::cpu::send_event();
        }
    }
    let freq = arch::counter::frequency().max(1);
    let deadline = arch::counter::read().saturating_add(freq);
    while ONLINE.load(Ordering::Acquire) & (1 << index) == 0 {
        if arch::counter::read() > deadline {
            println!("smp: CPU {mpidr:#x} did not come online within 1 s");
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Where a secondary CPU enters Rust, on its own stack, MMU and caches on.
#[no_mangle]
extern "C" fn dmakern_start_secondary(index: usize) -> ! {
    ONLINE.fetch_or(1 << index, Ordering::AcqRel);
    let mut seen = 0;
    loop {
        let generation = GENERATION.load(Ordering::Acquire);
        if generation == seen {
            arch::cpu::wait_for_event();
            continue;
        }
        seen = generation;
        run_work(index);
    }
}

fn run_work(index: usize) {
    let f = WORK.load(Ordering::Acquire);
    if f != 0 {
        // SAFETY: `on_each_cpu` stores only `fn(usize)` pointers in WORK.
        let f: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(f) };
        f(index);
    }
    DONE.fetch_add(1, Ordering::AcqRel);
    arch::cpu::send_event();
}

/// Runs `f(cpu_index)` on every online CPU at once, the calling (boot) CPU included, and returns
/// when all have finished. Only the boot CPU calls it, never from inside `f`.
pub fn on_each_cpu(f: fn(usize)) {
    let n = online();
    DONE.store(0, Ordering::Release);
    WORK.store(f as usize, Ordering::Release);
    GENERATION.fetch_add(1, Ordering::AcqRel);
    arch::cpu::send_event();
    run_work(cpu_index());
    while DONE.load(Ordering::Acquire) < n {
        arch::cpu::wait_for_event();
    }
    WORK.store(0, Ordering::Release);
}

mod ktests {
    use super::*;
    use crate::ktest::TestResult;
    use crate::{kassert, kassert_eq, kskip};
    use core::sync::atomic::AtomicU64;

    static SEEN: AtomicU64 = AtomicU64::new(0);
    static COUNTER: AtomicU64 = AtomicU64::new(0);

    fn mark(cpu: usize) {
        SEEN.fetch_or(1 << cpu, Ordering::AcqRel);
        kassert_index(cpu);
    }

    fn kassert_index(cpu: usize) {
        if cpu_index() != cpu {
            SEEN.fetch_or(1 << 63, Ordering::AcqRel);
        }
    }

    /// Every CPU the DT offers came online and runs work with its own index.
    fn every_cpu_runs_work() -> TestResult {
        let want = crate::kernel::boot_info().dt.cpu_count().unwrap_or(1).min(MAX_CPUS);
        kassert_eq!(online(), want, "CPUs online");
        if want == 1 {
            kskip!("one CPU");
        }
        SEEN.store(0, Ordering::Release);
        on_each_cpu(mark);
        let seen = SEEN.load(Ordering::Acquire);
        kassert!(seen & (1 << 63) == 0, "a CPU ran with the wrong index");
        kassert_eq!(seen, (1u64 << want) - 1, "CPUs that ran the work");
        Ok(())
    }

    fn add_many(_cpu: usize) {
        for _ in 0..100_000 {
            COUNTER.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Atomics from every CPU at once lose nothing (the CPUs share memory coherently).
    fn concurrent_atomics_add_up() -> TestResult {
        if online() == 1 {
            kskip!("one CPU");
        }
        COUNTER.store(0, Ordering::Release);
        on_each_cpu(add_many);
        kassert_eq!(COUNTER.load(Ordering::Acquire), 100_000 * online() as u64);
        Ok(())
    }

    crate::ktest_suite!("smp", [every_cpu_runs_work, concurrent_atomics_add_up]);
}
