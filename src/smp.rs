//! Secondary CPUs: brought up by the device tree's `enable-method` (PSCI CPU_ON on QEMU virt;
//! `spin-table` and `brcm,bcm2836-smp` are reported as not supported yet: they arrive with the
//! Raspberry Pi work), numbered in DT order after the boot CPU (index 0), each with its own stack
//! and its index in a CPU register (`arch::cpu::index`). A started CPU joins the boot CPU's
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
/// passes it: the boot CPU's translation registers (`arch::mmu::secondary_regs`), its stack top
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

/// Starts every CPU of the device tree besides the boot CPU whose `enable-method` is PSCI, waits
/// for each to come online (a bounded wait), and reports what it did. Returns the number of CPUs
/// online. Called once, on the boot CPU, after the kernel tables are final.
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
    let regs = arch::mmu::secondary_regs();
    let mut next = 1;
    for cpu in cpus.flatten().filter(|c| c.status == crate::dt::Status::Okay && c.mpidr != me) {
        if next >= MAX_CPUS {
            println!("smp: more than {MAX_CPUS} CPUs; {:#x} and the rest stay off", cpu.mpidr);
            break;
        }
        match cpu.enable_method {
            Some("psci") => {}
            other => {
                println!("smp: CPU {:#x}: enable-method {} not supported yet; it stays off", cpu.mpidr, other.unwrap_or("(none)"));
                continue;
            }
        }
        if start(next, cpu.mpidr, regs) {
            next += 1;
        }
    }
    println!("smp: {} CPU(s) online", online());
    online()
}

/// Starts CPU `mpidr` as index `index`; true once it is online.
fn start(index: usize, mpidr: u64, regs: [u64; 4]) -> bool {
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
    arch::cache::dsb();
    if let Err(e) = crate::drivers::psci::cpu_on(mpidr, arch::cpu::secondary_entry(), addr as u64) {
        println!("smp: CPU {mpidr:#x}: PSCI CPU_ON failed: {e}");
        return false;
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

    /// Every CPU the DT offers with PSCI came online and runs work with its own index.
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
