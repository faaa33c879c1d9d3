//! Interrupts: the controllers the device tree describes, a registry of handlers, and dispatch
//! from the CPU's IRQ exception.
//!
//! The kernel polls everything by default and runs with IRQs masked at the CPU. A driver that
//! wants a completion interrupt resolves its line from the DT ([`request`], [`request_by_name`]),
//! registers a handler on it ([`register`], which enables the line at its controller and at every
//! controller above it) and then waits with [`wait_until`]: only there, on the waiting CPU, are
//! IRQs unmasked. So nothing else in the kernel ever runs with interrupts on, and a handler can
//! only ever interrupt that wait loop, which holds no lock.
//!
//! Device-tree model (Linux's of_irq): a node's interrupts are `interrupts-extended` (phandle +
//! specifier per entry) or `interrupts` read with its interrupt parent's `#interrupt-cells`
//! (`interrupt-parent`, inherited up the tree: [`DeviceTree::interrupt_parent`]); `interrupt-names`
//! names the entries. Nexus nodes (`interrupt-map`) are not supported and say so. A controller is
//! a node with `interrupt-controller` and a compatible one of the drivers here knows:
//!
//! - GICv2 ("arm,gic-400", "arm,cortex-a15-gic", "arm,cortex-a7-gic": QEMU virt, Pi 4),
//!   [`gic_v2`];
//! - the BCM2836 per-core local controller ("brcm,bcm2836-l1-intc", Pi 2/3), [`bcm2836_local`];
//! - the BCM2835/2836 ARM controller ("brcm,bcm2835-armctrl-ic", "brcm,bcm2836-armctrl-ic"),
//!   [`bcm2835_armctrl`], which on the BCM2836/7 is itself an input of the local controller (its
//!   own `interrupts = <8 4>`).
//!
//! A controller whose `interrupts` resolve to a line of another controller is chained below that
//! line: dispatch descends into it, and enabling one of its lines enables that parent line too. A
//! controller with no parent (or whose parent is itself, as a GIC's maintenance interrupt says)
//! is a root, wired to the CPU; [`dispatch`] asks every root in turn.
//!
//! Pure logic (specifier decoding, DT resolution) builds for the host and is unit-tested there;
//! the registry and the hardware drivers exist only in the kernel build.

pub mod bcm2835_armctrl;
pub mod bcm2836_local;
pub mod gic_v2;
#[cfg(target_os = "none")]
mod ktests;

use core::fmt;

use crate::dt::{DeviceTree, DtError, Name, Node};

/// The most specifier cells a supported controller uses (and the most this layer stores).
pub const MAX_CELLS: usize = 3;

/// How a line signals: level (stays asserted until the source is cleared) or edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Level,
    Edge,
}

impl Trigger {
    /// The trigger named by the IRQ_TYPE_* flags of a specifier (dt-bindings/interrupt-controller/
    /// irq.h): 1 and 2 are edges, 4 and 8 levels, 0 (none given) is taken as level.
    fn from_flags(flags: u32) -> Trigger {
        if flags & 0x3 != 0 {
            Trigger::Edge
        } else {
            Trigger::Level
        }
    }
}

/// The interrupt-controller drivers this layer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChipKind {
    GicV2,
    Bcm2836Local,
    Bcm2835Armctrl,
}

impl ChipKind {
    /// The driver for `node`, if it is an interrupt controller one of them knows.
    pub fn of(node: &Node<'_>) -> Option<ChipKind> {
        if !node.has_property("interrupt-controller") {
            return None;
        }
        node.compatible().find_map(|c| match c {
            "arm,gic-400" | "arm,cortex-a15-gic" | "arm,cortex-a7-gic" | "arm,cortex-a9-gic" => Some(ChipKind::GicV2),
            "brcm,bcm2836-l1-intc" => Some(ChipKind::Bcm2836Local),
            "brcm,bcm2835-armctrl-ic" | "brcm,bcm2836-armctrl-ic" => Some(ChipKind::Bcm2835Armctrl),
            _ => None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            ChipKind::GicV2 => "GICv2",
            ChipKind::Bcm2836Local => "BCM2836 local",
            ChipKind::Bcm2835Armctrl => "BCM2835 ARM",
        }
    }

    /// The `#interrupt-cells` its binding uses.
    pub const fn cells(self) -> usize {
        match self {
            ChipKind::GicV2 => 3,
            ChipKind::Bcm2836Local | ChipKind::Bcm2835Armctrl => 2,
        }
    }

    /// The controller's own line number and trigger for a DT specifier.
    pub fn translate(self, spec: &[u32]) -> Result<HwIrq, SpecError> {
        if spec.len() != self.cells() {
            return Err(SpecError::CellCount { expected: self.cells(), got: spec.len() });
        }
        match self {
            ChipKind::GicV2 => gic_v2::translate(spec[0], spec[1], spec[2]),
            ChipKind::Bcm2836Local => bcm2836_local::translate(spec[0], spec[1]),
            ChipKind::Bcm2835Armctrl => bcm2835_armctrl::translate(spec[0], spec[1]),
        }
    }
}

/// A line of one controller, as its driver numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwIrq {
    pub hwirq: u32,
    pub trigger: Trigger,
}

/// Why a specifier does not name a line of its controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecError {
    CellCount { expected: usize, got: usize },
    /// A value outside its field's range (`what` names the field).
    OutOfRange { what: &'static str, value: u32 },
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SpecError::CellCount { expected, got } => write!(f, "{got} specifier cells, the binding has {expected}"),
            SpecError::OutOfRange { what, value } => write!(f, "{what} {value} is out of range"),
        }
    }
}

/// Everything that can go wrong resolving, registering or enabling an interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqError {
    /// The device tree is malformed where the interrupt was looked up.
    Dt(DtError),
    /// The node has no interrupt with that index (or no interrupts at all).
    NoSuchIndex { node: Name, index: usize },
    /// No `interrupt-names` entry is `name`.
    NoSuchName { node: Name, name: Name },
    /// A controller's `#interrupt-cells` is 0 or more than [`MAX_CELLS`].
    BadCells { controller: Name, cells: u32 },
    /// `interrupts`/`interrupts-extended` ends in the middle of an entry.
    Truncated { node: Name },
    /// The parent routes interrupts through an `interrupt-map` (a nexus), which is not supported.
    Nexus { node: Name },
    /// The interrupt parent is a controller no driver here knows, or one that failed to start.
    NoDriver { controller: Name },
    /// The specifier does not name a line of the controller.
    Spec { controller: &'static str, err: SpecError },
    /// The controller does not have that line (beyond the lines it implements).
    NoSuchLine { controller: &'static str, hwirq: u32 },
    /// The handler table is full, or the line already has the most handlers one may share.
    TooManyHandlers,
    /// No such handler is registered (unregister).
    NotRegistered,
    /// A chain of controllers deeper than [`MAX_CHAIN`] or looping.
    ChainTooDeep { controller: Name },
}

/// How deep controllers may be chained below a root.
pub const MAX_CHAIN: usize = 4;

impl From<DtError> for IrqError {
    fn from(e: DtError) -> IrqError {
        IrqError::Dt(e)
    }
}

impl fmt::Display for IrqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IrqError::Dt(e) => write!(f, "device tree: {e}"),
            IrqError::NoSuchIndex { node, index } => write!(f, "node `{node}` has no interrupt #{index}"),
            IrqError::NoSuchName { node, name } => write!(f, "node `{node}` has no interrupt named `{name}`"),
            IrqError::BadCells { controller, cells } => {
                write!(f, "interrupt controller `{controller}` has #interrupt-cells = {cells} (1..={MAX_CELLS} supported)")
            }
            IrqError::Truncated { node } => write!(f, "the interrupts of node `{node}` end in the middle of an entry"),
            IrqError::Nexus { node } => write!(f, "`{node}` maps interrupts through interrupt-map, which is not supported"),
            IrqError::NoDriver { controller } => write!(f, "no driver runs the interrupt controller `{controller}`"),
            IrqError::Spec { controller, err } => write!(f, "{controller} interrupt specifier: {err}"),
            IrqError::NoSuchLine { controller, hwirq } => write!(f, "the {controller} controller has no line {hwirq}"),
            IrqError::TooManyHandlers => f.write_str("the interrupt handler table (or the line's share of it) is full"),
            IrqError::NotRegistered => f.write_str("no such interrupt handler is registered"),
            IrqError::ChainTooDeep { controller } => {
                write!(f, "interrupt controller `{controller}` is chained more than {MAX_CHAIN} deep or in a loop")
            }
        }
    }
}

/// An interrupt as the DT names it: the controller node and the specifier cells.
#[derive(Clone, Copy, Debug)]
pub struct IrqSpec<'a> {
    pub controller: Node<'a>,
    cells: [u32; MAX_CELLS],
    len: usize,
}

impl IrqSpec<'_> {
    /// The specifier's cells (as many as the controller's `#interrupt-cells`).
    pub fn cells(&self) -> &[u32] {
        &self.cells[..self.len]
    }
}

/// `#interrupt-cells` of `controller`, checked to be usable.
fn interrupt_cells(controller: &Node<'_>) -> Result<usize, IrqError> {
    let prop = controller
        .property("#interrupt-cells")
        .ok_or(DtError::NotFound { what: "#interrupt-cells of interrupt parent", name: Name::new(controller.name()) })?;
    let cells = prop.as_u32()?;
    match usize::try_from(cells) {
        Ok(n @ 1..=MAX_CELLS) => Ok(n),
        _ => Err(IrqError::BadCells { controller: Name::new(controller.name()), cells }),
    }
}

fn spec_from<'a>(controller: Node<'a>, words: &[u32]) -> IrqSpec<'a> {
    let mut cells = [0; MAX_CELLS];
    let len = words.len().min(MAX_CELLS);
    cells[..len].copy_from_slice(&words[..len]);
    IrqSpec { controller, cells, len }
}

/// A parent that routes through `interrupt-map` rather than being a controller.
fn check_not_nexus(parent: &Node<'_>) -> Result<(), IrqError> {
    if parent.has_property("interrupt-map") && !parent.has_property("interrupt-controller") {
        return Err(IrqError::Nexus { node: Name::new(parent.name()) });
    }
    Ok(())
}

/// The `index`th interrupt of `node` (0-based): from `interrupts-extended` if present, else from
/// `interrupts` with the node's interrupt parent. Errors name the node and say what is wrong.
pub fn spec_of<'a>(dt: &DeviceTree<'a>, node: &Node<'a>, index: usize) -> Result<IrqSpec<'a>, IrqError> {
    let missing = IrqError::NoSuchIndex { node: Name::new(node.name()), index };
    let truncated = IrqError::Truncated { node: Name::new(node.name()) };
    if let Some(prop) = node.property("interrupts-extended") {
        let mut words = prop.as_u32s()?;
        let mut i = 0;
        while let Some(phandle) = words.next() {
            let controller = dt.phandle_target(&prop, phandle)?;
            check_not_nexus(&controller)?;
            let n = interrupt_cells(&controller)?;
            let mut buf = [0u32; MAX_CELLS];
            for slot in buf.iter_mut().take(n) {
                *slot = words.next().ok_or(truncated)?;
            }
            if i == index {
                return Ok(spec_from(controller, &buf[..n]));
            }
            i += 1;
        }
        return Err(missing);
    }
    let prop = node.property("interrupts").ok_or(missing)?;
    let parent = dt.interrupt_parent(node)?;
    check_not_nexus(&parent)?;
    let n = interrupt_cells(&parent)?;
    let words = prop.as_u32s()?;
    let total = prop.value.len() / 4;
    if total % n != 0 {
        return Err(truncated);
    }
    let start = index.checked_mul(n).filter(|&s| s < total).ok_or(missing)?;
    let mut buf = [0u32; MAX_CELLS];
    for (slot, w) in buf.iter_mut().zip(words.skip(start).take(n)) {
        *slot = w;
    }
    Ok(spec_from(parent, &buf[..n]))
}

/// The index of the `interrupt-names` entry `name` of `node`.
pub fn index_of_name(node: &Node<'_>, name: &str) -> Result<usize, IrqError> {
    let none = IrqError::NoSuchName { node: Name::new(node.name()), name: Name::new(name) };
    let mut names = node.property("interrupt-names").ok_or(none)?.as_str_list()?;
    names.position(|n| n == name).ok_or(none)
}

/// The interrupt of `node` named `name` in its `interrupt-names`.
pub fn spec_by_name<'a>(dt: &DeviceTree<'a>, node: &Node<'a>, name: &str) -> Result<IrqSpec<'a>, IrqError> {
    spec_of(dt, node, index_of_name(node, name)?)
}

#[cfg(target_os = "none")]
mod kernel;
#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::fixtures::*;

    fn dt(blob: &[u8]) -> DeviceTree<'_> {
        DeviceTree::from_bytes(blob).unwrap()
    }

    fn node<'a>(dt: &DeviceTree<'a>, compat: &str) -> Node<'a> {
        dt.find_compatible(compat).next().unwrap_or_else(|| panic!("no {compat}"))
    }

    #[test]
    fn pi3_dma_channels_resolve_through_the_arm_controller() {
        let t = dt(RPI3B_DOWNSTREAM);
        let dma = node(&t, "brcm,bcm2835-dma");
        // dma2 is `<1 18>`: bank 1 (GPU IRQs 0-31), bit 18 → line 50 of the ARM controller.
        let s = spec_by_name(&t, &dma, "dma2").unwrap();
        assert_eq!(ChipKind::of(&s.controller), Some(ChipKind::Bcm2835Armctrl));
        assert_eq!(s.cells(), &[1, 18]);
        assert_eq!(ChipKind::Bcm2835Armctrl.translate(s.cells()), Ok(HwIrq { hwirq: 50, trigger: Trigger::Level }));
        // Channels 11-14 share one line, 27 in bank 1.
        let shared: Vec<_> = (11..=14).map(|c| spec_by_name(&t, &dma, &format!("dma{c}")).unwrap().cells().to_vec()).collect();
        assert!(shared.iter().all(|c| c == &[1, 27]), "{shared:?}");
        // The ARM controller hangs off line 8 (the GPU interrupt) of the local controller.
        let arm = node(&t, "brcm,bcm2836-armctrl-ic");
        let up = spec_of(&t, &arm, 0).unwrap();
        assert_eq!(ChipKind::of(&up.controller), Some(ChipKind::Bcm2836Local));
        assert_eq!(ChipKind::Bcm2836Local.translate(up.cells()).unwrap().hwirq, 8);
        assert!(matches!(spec_of(&t, &dma, 16), Err(IrqError::NoSuchIndex { index: 16, .. })));
        assert!(matches!(spec_by_name(&t, &dma, "dma15"), Err(IrqError::NoSuchName { .. })));
    }

    #[test]
    fn pi4_dma_channels_resolve_to_gic_spis() {
        let t = dt(RPI4B_DOWNSTREAM);
        let dma = node(&t, "brcm,bcm2835-dma");
        let s = spec_by_name(&t, &dma, "dma2").unwrap();
        assert_eq!(ChipKind::of(&s.controller), Some(ChipKind::GicV2));
        assert_eq!(s.cells(), &[0, 0x52, 4]);
        // SPI n is GIC interrupt ID 32 + n.
        assert_eq!(ChipKind::GicV2.translate(s.cells()), Ok(HwIrq { hwirq: 32 + 0x52, trigger: Trigger::Level }));
        // dma7 and dma8 share SPI 87, as the DT says.
        let a = spec_by_name(&t, &dma, "dma7").unwrap();
        let b = spec_by_name(&t, &dma, "dma8").unwrap();
        assert_eq!((a.cells(), b.cells()), (&[0, 87, 4][..], &[0, 87, 4][..]));
    }

    #[test]
    fn virt_uart_and_timer_resolve_on_the_gic() {
        for blob in [QEMU_VIRT_A53_128M, QEMU_VIRT_A15] {
            let t = dt(blob);
            let uart = node(&t, "arm,pl011");
            let s = spec_of(&t, &uart, 0).unwrap();
            assert_eq!(ChipKind::of(&s.controller), Some(ChipKind::GicV2));
            assert_eq!(ChipKind::GicV2.translate(s.cells()).unwrap().hwirq, 33, "SPI 1");
            let timer = t.find_compatible("arm,armv8-timer").chain(t.find_compatible("arm,armv7-timer")).next().unwrap();
            // Index 2 is the virtual timer: PPI 11, ID 27.
            let v = spec_of(&t, &timer, 2).unwrap();
            assert_eq!(ChipKind::GicV2.translate(v.cells()).unwrap().hwirq, 27);
        }
    }

    #[test]
    fn gicv3_is_not_taken_for_a_gicv2() {
        let t = dt(QEMU_VIRT_GICV3_SMMUV3);
        assert!(t.nodes().filter_map(|n| ChipKind::of(&n)).next().is_none());
    }

    #[test]
    fn specifiers_decode_per_binding() {
        use ChipKind::*;
        // GIC: type 0 = SPI (ID 32 + n, n < 988), type 1 = PPI (ID 16 + n, n < 16).
        assert_eq!(GicV2.translate(&[0, 0, 1]), Ok(HwIrq { hwirq: 32, trigger: Trigger::Edge }));
        assert_eq!(GicV2.translate(&[0, 987, 4]).unwrap().hwirq, 1019);
        assert!(GicV2.translate(&[0, 988, 4]).is_err());
        assert_eq!(GicV2.translate(&[1, 15, 0xf08]), Ok(HwIrq { hwirq: 31, trigger: Trigger::Level }));
        assert!(GicV2.translate(&[1, 16, 4]).is_err());
        assert!(GicV2.translate(&[2, 0, 4]).is_err());
        assert!(GicV2.translate(&[0, 1]).is_err());
        // ARM controller: bank 0 has 8 ARM lines, banks 1 and 2 32 GPU lines each.
        assert_eq!(Bcm2835Armctrl.translate(&[0, 7]).unwrap().hwirq, 7);
        assert!(Bcm2835Armctrl.translate(&[0, 8]).is_err());
        assert_eq!(Bcm2835Armctrl.translate(&[2, 31]).unwrap().hwirq, 95);
        assert!(Bcm2835Armctrl.translate(&[3, 0]).is_err());
        assert!(Bcm2835Armctrl.translate(&[1, 32]).is_err());
        // Local controller: 4 timers, 4 mailboxes, GPU, PMU.
        assert_eq!(Bcm2836Local.translate(&[9, 4]).unwrap().hwirq, 9);
        assert!(Bcm2836Local.translate(&[10, 4]).is_err());
        assert_eq!(Bcm2836Local.translate(&[3, 1]).unwrap().trigger, Trigger::Edge);
    }
}
