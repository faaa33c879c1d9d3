//! The kernel side of the interrupt layer: the controllers found at boot, the handler registry,
//! dispatch and the waiting helper.

use super::{spec_by_name, spec_of, ChipKind, IrqError, IrqSpec, Trigger, MAX_CHAIN};
use super::{bcm2835_armctrl::Armctrl, bcm2836_local::LocalIntc, gic_v2::GicV2};
use crate::dt::{DeviceTree, Name, Node};
use crate::mm::kmap;
use crate::println;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use spin::{Mutex, Once};

/// A line of a controller: what handlers are registered on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Irq {
    /// Index of the controller in the boot-time table.
    chip: usize,
    hwirq: u32,
    trigger: Trigger,
}

impl Irq {
    /// The line number at its controller.
    pub fn hwirq(&self) -> u32 {
        self.hwirq
    }

    /// The name of its controller's driver.
    pub fn controller(&self) -> &'static str {
        controllers().get(self.chip).map_or("?", |c| c.kind.name())
    }
}

impl core::fmt::Display for Irq {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} line {}", self.controller(), self.hwirq)
    }
}

enum Chip {
    Gic(GicV2),
    Local(LocalIntc),
    Armctrl(Armctrl),
}

impl Chip {
    fn enable(&self, hwirq: u32, trigger: Trigger) -> bool {
        match self {
            Chip::Gic(g) => g.enable(hwirq, trigger),
            Chip::Local(l) => l.enable(hwirq),
            Chip::Armctrl(a) => a.enable(hwirq),
        }
    }

    fn disable(&self, hwirq: u32) {
        match self {
            Chip::Gic(g) => g.disable(hwirq),
            Chip::Local(l) => l.disable(hwirq),
            Chip::Armctrl(a) => a.disable(hwirq),
        }
    }

    fn handle(&self, f: &mut dyn FnMut(u32)) {
        match self {
            Chip::Gic(g) => g.handle(f),
            Chip::Local(l) => l.handle(f),
            Chip::Armctrl(a) => a.handle(f),
        }
    }
}

struct Controller {
    kind: ChipKind,
    /// The DT node's offset: how specifiers find their controller.
    node: usize,
    name: Name,
    chip: Chip,
    /// The parent's line this controller's output drives; `None` for a root.
    parent: Option<Irq>,
}

static CONTROLLERS: Once<Vec<Controller>> = Once::new();

fn controllers() -> &'static [Controller] {
    CONTROLLERS.get().map_or(&[], |v| v.as_slice())
}

/// A registered handler: called in IRQ context with its context word. It must clear the
/// interrupt at its source (lines are level-triggered) and take no lock the interrupted code may
/// hold.
pub type Handler = fn(usize);

#[derive(Clone, Copy)]
struct Registration {
    irq: Irq,
    handler: Handler,
    ctx: usize,
}

/// How many handlers may be registered at once, and on one line.
const MAX_HANDLERS: usize = 64;
const MAX_SHARED: usize = 8;

static HANDLERS: Mutex<Vec<Registration>> = Mutex::new(Vec::new());
/// Interrupts that arrived on a line with no handler (the line is then disabled), and the last
/// one as `chip << 32 | hwirq`.
static UNHANDLED: AtomicU32 = AtomicU32::new(0);
static LAST_UNHANDLED: AtomicU64 = AtomicU64::new(0);

/// Maps `node`'s `reg` entry `i` as device memory.
fn map_reg(dt: &DeviceTree<'_>, node: &Node<'_>, i: usize) -> Result<usize, IrqError> {
    let missing = crate::dt::DtError::NotFound { what: "reg entry of interrupt controller", name: Name::new(node.name()) };
    let region = dt.reg(node)?.and_then(|mut r| r.nth(i)).ok_or(missing)??;
    kmap::ioremap(region.base().0, region.size()).map_err(|_| IrqError::NoDriver { controller: Name::new(node.name()) })
}

fn start(dt: &DeviceTree<'_>, node: &Node<'_>, kind: ChipKind) -> Result<Chip, IrqError> {
    Ok(match kind {
        // SAFETY: the two blocks are the GIC's distributor and CPU interface from its DT node,
        // just mapped as device memory; only this layer drives the GIC.
        ChipKind::GicV2 => Chip::Gic(unsafe { GicV2::new(map_reg(dt, node, 0)?, map_reg(dt, node, 1)?) }),
        // SAFETY: the controller's registers from its DT node, just mapped; only this layer
        // drives its interrupt registers.
        ChipKind::Bcm2836Local => Chip::Local(unsafe { LocalIntc::new(map_reg(dt, node, 0)?) }),
        // SAFETY: as above.
        ChipKind::Bcm2835Armctrl => Chip::Armctrl(unsafe { Armctrl::new(map_reg(dt, node, 0)?) }),
    })
}

/// Finds and starts every supported interrupt controller of the DT (all lines disabled) and
/// chains them; prints what it found. IRQs stay masked at the CPU. Controllers that fail to start
/// are reported and left out; devices behind them then get [`IrqError::NoDriver`].
pub fn init(dt: &DeviceTree<'_>) {
    let mut found: Vec<Controller> = Vec::new();
    // The started controllers' nodes, in `found`'s order, for the chaining below (no second walk).
    let mut nodes = Vec::new();
    // The kind first: most nodes are no interrupt controller, and that is one property lookup.
    for (node, kind) in dt.nodes().filter_map(|n| ChipKind::of(&n).map(|k| (n, k))).filter(|(n, _)| n.is_available()) {
        match start(dt, &node, kind) {
            Ok(chip) => {
                found.push(Controller { kind, node: node.offset(), name: Name::new(node.name()), chip, parent: None });
                nodes.push(node);
            }
            Err(e) => println!("irq: {} `{}`: {e}", kind.name(), node.name()),
        }
    }
    // Chain: a controller's own first interrupt names its parent line, unless it is itself.
    for (i, node) in nodes.iter().enumerate() {
        if !node.has_property("interrupts") && !node.has_property("interrupts-extended") {
            continue;
        }
        match spec_of(dt, node, 0).and_then(|s| resolve_in(&found, &s)) {
            Ok(p) if p.chip != i => found[i].parent = Some(p),
            Ok(_) => {}
            Err(e) => println!("irq: {} `{}`: its parent line: {e}", found[i].kind.name(), found[i].name),
        }
    }
    for c in &found {
        match c.parent {
            Some(p) => println!("irq: {} `{}` below {} `{}` line {}", c.kind.name(), c.name, found[p.chip].kind.name(), found[p.chip].name, p.hwirq),
            None => println!("irq: {} `{}` (root)", c.kind.name(), c.name),
        }
    }
    if found.is_empty() {
        if let Ok(Some(n)) = dt.phandle_ref(&dt.root(), "interrupt-parent") {
            println!("irq: no driver for the board's controller `{}` ({})", n.name(), n.compatible().first().unwrap_or("no compatible"));
        }
        println!("irq: no supported interrupt controller; drivers poll");
    }
    CONTROLLERS.call_once(|| found);
}

/// The line `spec` names among `table`'s controllers.
fn resolve_in(table: &[Controller], spec: &IrqSpec<'_>) -> Result<Irq, IrqError> {
    let off = spec.controller.offset();
    let chip = table.iter().position(|c| c.node == off).ok_or(IrqError::NoDriver { controller: Name::new(spec.controller.name()) })?;
    let kind = table[chip].kind;
    let hw = kind.translate(spec.cells()).map_err(|err| IrqError::Spec { controller: kind.name(), err })?;
    Ok(Irq { chip, hwirq: hw.hwirq, trigger: hw.trigger })
}

/// The `index`th interrupt of `node` as a line of a running controller.
pub fn request(dt: &DeviceTree<'_>, node: &Node<'_>, index: usize) -> Result<Irq, IrqError> {
    resolve_in(controllers(), &spec_of(dt, node, index)?)
}

/// The interrupt of `node` named `name` (in `interrupt-names`) as a line of a running controller.
pub fn request_by_name(dt: &DeviceTree<'_>, node: &Node<'_>, name: &str) -> Result<Irq, IrqError> {
    resolve_in(controllers(), &spec_by_name(dt, node, name)?)
}

/// Enables `irq` and every parent line above it.
fn enable_chain(irq: Irq) -> Result<(), IrqError> {
    let table = controllers();
    let mut cur = Some(irq);
    for _ in 0..=MAX_CHAIN {
        let Some(line) = cur else { return Ok(()) };
        let c = table.get(line.chip).ok_or(IrqError::NotRegistered)?;
        if !c.chip.enable(line.hwirq, line.trigger) {
            return Err(IrqError::NoSuchLine { controller: c.kind.name(), hwirq: line.hwirq });
        }
        cur = c.parent;
    }
    Err(IrqError::ChainTooDeep { controller: table[irq.chip].name })
}

/// Registers `handler` (called with `ctx`) on `irq` and enables the line, with its parents.
/// Several handlers may share a line: each is called on every interrupt of it. Call with IRQs
/// masked (the kernel's normal state).
pub fn register(irq: Irq, handler: Handler, ctx: usize) -> Result<(), IrqError> {
    let was = crate::arch::irq::disable();
    let r = (|| {
        let mut h = HANDLERS.lock();
        let on_line = h.iter().filter(|r| r.irq.chip == irq.chip && r.irq.hwirq == irq.hwirq).count();
        if h.len() >= MAX_HANDLERS || on_line >= MAX_SHARED {
            return Err(IrqError::TooManyHandlers);
        }
        enable_chain(irq)?;
        h.push(Registration { irq, handler, ctx });
        Ok(())
    })();
    crate::arch::irq::restore(was);
    r
}

/// Removes the registration of `handler` with `ctx` on `irq`; the line is disabled when no
/// handler is left on it (its parents stay enabled: other lines may share them).
pub fn unregister(irq: Irq, handler: Handler, ctx: usize) -> Result<(), IrqError> {
    let was = crate::arch::irq::disable();
    let r = {
        let mut h = HANDLERS.lock();
        match h.iter().position(|r| r.irq == irq && core::ptr::fn_addr_eq(r.handler, handler) && r.ctx == ctx) {
            Some(i) => {
                h.remove(i);
                if !h.iter().any(|r| r.irq.chip == irq.chip && r.irq.hwirq == irq.hwirq) {
                    if let Some(c) = controllers().get(irq.chip) {
                        c.chip.disable(irq.hwirq);
                    }
                }
                Ok(())
            }
            None => Err(IrqError::NotRegistered),
        }
    };
    crate::arch::irq::restore(was);
    r
}

/// Whether any controller is running (a driver without one polls).
pub fn available() -> bool {
    !controllers().is_empty()
}

/// Interrupts that arrived on lines without a handler since boot (each such line is disabled).
pub fn unhandled() -> (u32, Option<(usize, u32)>) {
    let n = UNHANDLED.load(Ordering::Relaxed);
    let last = LAST_UNHANDLED.load(Ordering::Relaxed);
    (n, (n > 0).then_some(((last >> 32) as usize, last as u32)))
}

/// Handles line `hwirq` of controller `chip`: descends into a controller chained on it, else
/// calls its handlers.
fn handle_line(chip: usize, hwirq: u32, depth: usize) {
    let table = controllers();
    if let Some(child) = table.iter().position(|c| c.parent.is_some_and(|p| p.chip == chip && p.hwirq == hwirq)) {
        if depth < MAX_CHAIN {
            table[child].chip.handle(&mut |h| handle_line(child, h, depth + 1));
        }
        return;
    }
    // Copied out (without allocating: the interrupted code may be in the allocator) so that the
    // lock is not held while handlers run.
    let mut regs: [Option<Registration>; MAX_SHARED] = [None; MAX_SHARED];
    for (slot, r) in regs.iter_mut().zip(HANDLERS.lock().iter().filter(|r| r.irq.chip == chip && r.irq.hwirq == hwirq)) {
        *slot = Some(*r);
    }
    let mut called = false;
    for r in regs.iter().flatten() {
        (r.handler)(r.ctx);
        called = true;
    }
    if !called {
        if let Some(c) = table.get(chip) {
            c.chip.disable(hwirq);
        }
        UNHANDLED.fetch_add(1, Ordering::Relaxed);
        LAST_UNHANDLED.store((chip as u64) << 32 | u64::from(hwirq), Ordering::Relaxed);
    }
}

/// The IRQ exception's handler (called by the vector code with IRQs masked): asks every root
/// controller for its pending lines and runs their handlers.
pub fn dispatch() {
    let table = controllers();
    for (i, c) in table.iter().enumerate().filter(|(_, c)| c.parent.is_none()) {
        c.chip.handle(&mut |h| handle_line(i, h, 0));
    }
}

/// Unmasks IRQs on this CPU until `done()` holds or `timeout_ns` passed, then masks them again;
/// returns the last `done()`. The wait spins rather than sleeping in `wfi`: nothing else could
/// wake the CPU if the interrupt never came, and the time-out must still end the wait.
pub fn wait_until(timeout_ns: u64, mut done: impl FnMut() -> bool) -> bool {
    let freq = u128::from(crate::arch::counter::frequency().max(1));
    let start = crate::arch::counter::read();
    let was = crate::arch::irq::disable();
    crate::arch::irq::enable();
    let ok = loop {
        if done() {
            break true;
        }
        let ns = u128::from(crate::arch::counter::read().wrapping_sub(start)) * 1_000_000_000 / freq;
        if ns > u128::from(timeout_ns) {
            break done();
        }
        core::hint::spin_loop();
    };
    crate::arch::irq::disable();
    crate::arch::irq::restore(was);
    ok
}
