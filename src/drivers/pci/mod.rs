//! PCI behind a generic ECAM host bridge (`pci-host-ecam-generic`, QEMU virt's `pcie@10000000`):
//! find the functions on the root bus, size their BARs, give them addresses from the bridge's
//! windows, turn on decoding and bus mastering, and say where their legacy interrupts (INTx) go.
//!
//! Nothing assigns BARs before us on QEMU virt (no firmware runs), so the kernel does what Linux's
//! `pci_host_common_probe` and `pci_assign_unassigned_bus_resources` do, in a much smaller form:
//!
//! - [`HostBridge::from_dt`] reads the bridge's DT node: the ECAM window (`reg`, `bus-range`), the
//!   address windows (`ranges`), `interrupt-map`, `iommu-map` and `msi-map` (host.rs).
//! - [`enumerate`] scans the root bus through a [`ConfigSpace`], sizes every BAR (scan.rs),
//!   assigns addresses with one bump allocator per window (assign.rs), writes them and enables
//!   the functions. It returns one [`PciDevice`] per function, whose `Display` is the boot-log line.
//! - [`capabilities`] walks a function's capability list (caps.rs), for drivers looking for MSI,
//!   MSI-X or virtio's vendor-specific capabilities.
//!
//! Configuration space is reached through a trait so that all of this is host-tested against a
//! fake (fake.rs) and the kernel supplies only the MMIO accessors, at the offsets
//! [`EcamWindow::offset`] computes.
//!
//! Scope: only the root bus (the first bus of `bus-range`) is scanned, which is where QEMU virt
//! puts every device unless a `pcie-root-port` is added. A PCI-to-PCI bridge found there is an
//! error ([`PciError::UnsupportedHeader`]) rather than a silently unconfigured subtree. Expansion
//! ROMs are not assigned, and MSI/MSI-X are left to drivers.

mod assign;
mod caps;
#[cfg(target_os = "none")]
pub mod ecam;
#[cfg(test)]
mod fake;
mod host;
mod scan;

pub use assign::assign;
pub use caps::{
    capabilities, find_capability, Capabilities, Capability, CAP_MSI, CAP_MSIX, CAP_PCIE,
    CAP_VENDOR,
};
pub use host::{
    Controller, EcamWindow, HostBridge, IdMap, IdMapEntry, InterruptMap, InterruptMapEntry,
    InterruptSpec, Window, COMPATIBLE, MAX_INTERRUPT_CELLS,
};
pub use scan::size_bars;

use alloc::vec::Vec;
use core::fmt;

use crate::dt::DtError;
use crate::mm::addr::PhysAddr;
use crate::mm::memmap::HumanSize;

// Register offsets of the type-0 configuration header (PCI Local Bus 3.0, section 6.1), as the
// aligned dwords `ConfigSpace` accesses.

/// Vendor ID (bits 15:0), device ID (31:16).
pub const REG_ID: u16 = 0x00;
/// Command (bits 15:0), status (31:16).
pub const REG_COMMAND: u16 = 0x04;
/// Revision ID (bits 7:0), class code (31:8).
pub const REG_CLASS: u16 = 0x08;
/// Header type in bits 23:16 (bit 23: multi-function device).
pub const REG_HEADER: u16 = 0x0c;
/// The first of the six BARs; BAR n is at `REG_BAR0 + 4 * n`.
pub const REG_BAR0: u16 = 0x10;
/// Capabilities pointer (bits 7:0).
pub const REG_CAP_PTR: u16 = 0x34;
/// Interrupt line (bits 7:0), interrupt pin (15:8).
pub const REG_INTERRUPT: u16 = 0x3c;

/// Command register: respond to I/O space accesses.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: respond to memory space accesses.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: allow the function to master the bus (DMA, MSI writes).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Status register: the function has a capability list.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Size of one function's configuration space in ECAM (PCIe extended configuration space).
pub const CONFIG_SPACE_SIZE: u16 = 4096;

/// Access to PCI configuration space, one aligned 32-bit register at a time.
///
/// The driver only ever passes an `offset` that is a multiple of 4 below [`CONFIG_SPACE_SIZE`],
/// and a `bdf` on a bus the [`EcamWindow`] covers. Implementations must behave as ECAM hardware
/// does: reading a function that does not exist returns `0xffff_ffff`, writing to it does
/// nothing. The kernel's implementation is a volatile MMIO access at
/// `ecam_virtual_base + EcamWindow::offset(bdf, offset)`.
pub trait ConfigSpace {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32;
    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32);
}

/// A function's address on its segment: bus, device (0..32), function (0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// `None` if `device >= 32` or `function >= 8`.
    pub const fn new(bus: u8, device: u8, function: u8) -> Option<Bdf> {
        if device < 32 && function < 8 {
            Some(Bdf {
                bus,
                device,
                function,
            })
        } else {
            None
        }
    }

    pub const fn bus(self) -> u8 {
        self.bus
    }

    pub const fn device(self) -> u8 {
        self.device
    }

    pub const fn function(self) -> u8 {
        self.function
    }

    /// The requester ID the function puts on its transactions, `bus << 8 | device << 3 |
    /// function`: what `iommu-map` (StreamIDs) and `msi-map` (ITS DeviceIDs) are indexed by.
    pub const fn requester_id(self) -> u16 {
        (self.bus as u16) << 8 | (self.device as u16) << 3 | self.function as u16
    }

    /// The `phys.hi` cell of the function's DT unit address: `bus << 16 | device << 11 |
    /// function << 8`, the child address that `interrupt-map` entries match.
    pub const fn dt_phys_hi(self) -> u32 {
        (self.requester_id() as u32) << 8
    }
}

impl fmt::Display for Bdf {
    /// `00:02.0`, as Linux prints it after the segment.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// A legacy interrupt pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntxPin {
    A,
    B,
    C,
    D,
}

impl IntxPin {
    /// Decodes the Interrupt Pin register: 1..=4 are INTA..INTD; 0 means the function uses no
    /// pin, and the values the specification reserves (5..=255) are treated the same way (there
    /// is nothing to route for them).
    pub const fn from_register(value: u8) -> Option<IntxPin> {
        match value {
            1 => Some(IntxPin::A),
            2 => Some(IntxPin::B),
            3 => Some(IntxPin::C),
            4 => Some(IntxPin::D),
            _ => None,
        }
    }

    /// 1 for INTA .. 4 for INTD: the register encoding, also the interrupt specifier cell that
    /// `interrupt-map` entries use.
    pub const fn number(self) -> u32 {
        match self {
            IntxPin::A => 1,
            IntxPin::B => 2,
            IntxPin::C => 3,
            IntxPin::D => 4,
        }
    }
}

impl fmt::Display for IntxPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let letter = match self {
            IntxPin::A => "A",
            IntxPin::B => "B",
            IntxPin::C => "C",
            IntxPin::D => "D",
        };
        write!(f, "INT{letter}")
    }
}

/// The PCI address space a BAR decodes or a host-bridge window forwards (the DT `phys.hi` space
/// code: 01 I/O, 10 32-bit memory, 11 64-bit memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Io,
    Mem32,
    /// A 64-bit memory BAR occupies two BAR slots (the upper address half in the second).
    Mem64,
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Space::Io => "io",
            Space::Mem32 => "mem32",
            Space::Mem64 => "mem64",
        })
    }
}

/// What sizing found in one BAR: how much address space of which kind it decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// The BAR slot (0..6); for a 64-bit BAR the slot holding the low half.
    pub index: u8,
    /// A power of two: the BAR's size and its required alignment.
    pub size: u64,
    pub kind: Space,
    pub prefetchable: bool,
}

/// An assigned BAR: the address it decodes, as the CPU reaches it and as the bus sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// The BAR slot (0..6); for a 64-bit BAR the slot holding the low half.
    pub index: u8,
    /// Where the CPU accesses the BAR (map this).
    pub cpu_addr: PhysAddr,
    /// The value written to the BAR: the address on the PCI bus, aligned to `size`.
    pub pci_addr: u64,
    pub size: u64,
    pub kind: Space,
    pub prefetchable: bool,
}

impl fmt::Display for Bar {
    /// `BAR4 mem64 pref 0x8000000000 (16 KiB)`, plus `[bus 0x1000]` when the bus address differs
    /// from the CPU address (I/O windows).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BAR{} {}", self.index, self.kind)?;
        if self.prefetchable {
            f.write_str(" pref")?;
        }
        write!(
            f,
            " {:#x} ({})",
            self.cpu_addr.as_u64(),
            HumanSize(self.size)
        )?;
        if self.pci_addr != self.cpu_addr.as_u64() {
            write!(f, " [bus {:#x}]", self.pci_addr)?;
        }
        Ok(())
    }
}

/// One enumerated, configured function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciDevice {
    /// The PCI segment (`linux,pci-domain` of the host bridge).
    pub domain: u32,
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// Base class, subclass and programming interface: `0x00ff00` for edu and virtio.
    pub class: u32,
    pub revision: u8,
    /// The header layout (bits 6:0 of the Header Type register; the multi-function bit removed).
    pub header_type: u8,
    /// Assigned BARs by slot. The slot after a 64-bit BAR is `None`: it holds the upper half.
    pub bars: [Option<Bar>; 6],
    pub irq_pin: Option<IntxPin>,
    /// Where `irq_pin` is routed by the host bridge's `interrupt-map`; `None` if there is no pin
    /// or no entry for it.
    pub intx: Option<InterruptSpec>,
}

impl PciDevice {
    /// The BAR in slot `index`, if it was assigned.
    pub fn bar(&self, index: usize) -> Option<&Bar> {
        self.bars.get(index)?.as_ref()
    }

    /// See [`Bdf::requester_id`].
    pub fn requester_id(&self) -> u16 {
        self.bdf.requester_id()
    }
}

impl fmt::Display for PciDevice {
    /// One boot-log line:
    /// `pci 0000:00:02.0 1234:11e8 class 00ff00 BAR0 mem32 0x10000000 (1 MiB) INTA -> GIC SPI 5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pci {:04x}:{} {:04x}:{:04x} class {:06x}",
            self.domain, self.bdf, self.vendor, self.device, self.class
        )?;
        for bar in self.bars.iter().flatten() {
            write!(f, " {bar}")?;
        }
        match (self.irq_pin, &self.intx) {
            (Some(pin), Some(spec)) => write!(f, " {pin} -> {spec}"),
            (Some(pin), None) => write!(f, " {pin} -> unrouted"),
            (None, _) => Ok(()),
        }
    }
}

/// Why the host bridge could not be described or its bus configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    /// A property of the host bridge's DT node (or one it references) is missing or malformed.
    Dt(DtError),
    /// The host bridge's description is unusable as a whole.
    HostBridge { what: &'static str },
    /// Host-bridge window `index` (in `ranges` order, config-space entries skipped) is invalid.
    BadWindow { index: usize, what: &'static str },
    /// Two host-bridge windows of the same address space (memory or I/O) share PCI addresses.
    WindowOverlap { first: usize, second: usize },
    /// A header layout other than type 0 (a PCI-to-PCI or CardBus bridge) on the scanned bus.
    UnsupportedHeader { bdf: Bdf, header_type: u8 },
    /// A BAR that cannot be used as it reads back.
    BadBar {
        bdf: Bdf,
        index: u8,
        what: &'static str,
    },
    /// No host-bridge window able to hold this BAR has room left for it.
    NoSpace {
        bdf: Bdf,
        index: u8,
        size: u64,
        kind: Space,
        prefetchable: bool,
    },
    /// A capability pointer (read at config offset `at`) points into the standard header.
    CapabilityPointer { bdf: Bdf, at: u8, pointer: u8 },
    /// The capability list comes back to an offset it already visited.
    CapabilityLoop { bdf: Bdf, offset: u8 },
}

impl From<DtError> for PciError {
    fn from(e: DtError) -> Self {
        PciError::Dt(e)
    }
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use PciError::*;
        match self {
            Dt(e) => write!(f, "PCI host bridge: {e}"),
            HostBridge { what } => write!(f, "PCI host bridge: {what}"),
            BadWindow { index, what } => write!(f, "PCI host bridge window {index}: {what}"),
            WindowOverlap { first, second } => write!(
                f,
                "PCI host bridge windows {first} and {second} overlap in PCI address space"
            ),
            UnsupportedHeader { bdf, header_type } => write!(
                f,
                "pci {bdf}: header type {header_type:#04x} (a bridge) is not supported: only the \
                 root bus is scanned"
            ),
            BadBar { bdf, index, what } => write!(f, "pci {bdf} BAR{index}: {what}"),
            NoSpace {
                bdf,
                index,
                size,
                kind,
                prefetchable,
            } => {
                let pref = if *prefetchable { " pref" } else { "" };
                write!(
                    f,
                    "pci {bdf} BAR{index} ({kind}{pref}, {}): no host bridge window has room for it",
                    HumanSize(*size)
                )
            }
            CapabilityPointer { bdf, at, pointer } => write!(
                f,
                "pci {bdf}: capability pointer {pointer:#04x} (read at {at:#04x}) points into the \
                 header"
            ),
            CapabilityLoop { bdf, offset } => write!(
                f,
                "pci {bdf}: capability list loops back to offset {offset:#04x}"
            ),
        }
    }
}

/// Enumerates the root bus of `host` through `cfg` and configures every function found: sizes
/// its BARs, assigns each an address in a window of `host` (see [`assign`] for the policy),
/// writes them, then sets memory decoding (if it has a memory BAR), I/O decoding (if it has an
/// I/O BAR) and bus mastering in its command register.
///
/// Returns the functions in bus order. On an error nothing has been enabled: BARs are written
/// and decoding turned on only once every BAR of every function has found a place.
pub fn enumerate<C: ConfigSpace + ?Sized>(
    cfg: &mut C,
    host: &HostBridge,
) -> Result<Vec<PciDevice>, PciError> {
    let found = scan::scan_bus(cfg, host.ecam.bus_start())?;
    let requests: Vec<(Bdf, BarInfo)> = found
        .iter()
        .flat_map(|f| f.bars.iter().flatten().map(move |bar| (f.bdf, *bar)))
        .collect();
    let placed = assign(&requests, &host.windows)?;

    let mut devices: Vec<PciDevice> = found
        .iter()
        .map(|f| PciDevice {
            domain: host.domain,
            bdf: f.bdf,
            vendor: f.vendor,
            device: f.device,
            class: f.class,
            revision: f.revision,
            header_type: f.header_type,
            bars: [None; 6],
            irq_pin: f.irq_pin,
            intx: f.irq_pin.and_then(|pin| host.intx_route(f.bdf, pin)),
        })
        .collect();
    for (bdf, bar) in placed {
        let slot = devices
            .iter_mut()
            .find(|d| d.bdf == bdf)
            .and_then(|d| d.bars.get_mut(usize::from(bar.index)));
        if let Some(slot) = slot {
            *slot = Some(bar);
        }
    }
    for dev in &devices {
        scan::program(cfg, dev);
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::fake::{qemu_like, FakeConfig};
    use super::*;
    use crate::dt::fixtures::*;
    use crate::dt::DeviceTree;

    fn qemu_host(dtb: &[u8]) -> HostBridge {
        let dt = DeviceTree::from_bytes(dtb).unwrap();
        let node = dt.find_compatible(COMPATIBLE).next().unwrap();
        HostBridge::from_dt(&dt, &node).unwrap()
    }

    fn bdf(d: u8, f: u8) -> Bdf {
        Bdf::new(0, d, f).unwrap()
    }

    #[test]
    fn bdf_encodings() {
        let b = Bdf::new(0x12, 0x1f, 7).unwrap();
        assert_eq!(b.requester_id(), 0x12ff);
        assert_eq!(b.dt_phys_hi(), 0x0012_ff00);
        assert_eq!(format!("{b}"), "12:1f.7");
        assert_eq!(Bdf::new(0, 32, 0), None);
        assert_eq!(Bdf::new(0, 0, 8), None);
        assert_eq!(bdf(2, 0).dt_phys_hi(), 0x1000);
    }

    /// The fake bus (see fake.rs) on QEMU virt's real host bridge (aarch64, GICv3 + SMMUv3):
    /// every BAR lands where the largest-first bump allocation over QEMU's windows puts it,
    /// worked out by hand here.
    #[test]
    fn enumerate_the_qemu_like_bus() {
        let host = qemu_host(QEMU_VIRT_GICV3_SMMUV3);
        let mut cfg = qemu_like();
        let devs = enumerate(&mut cfg, &host).unwrap();
        let ids: Vec<_> = devs
            .iter()
            .map(|d| (d.bdf, d.vendor, d.device, d.class, d.irq_pin))
            .collect();
        assert_eq!(
            ids,
            [
                (bdf(0, 0), 0x1b36, 0x0008, 0x060000, None),
                (bdf(1, 0), 0x1af4, 0x1044, 0x00ff00, Some(IntxPin::A)),
                (bdf(2, 0), 0x1234, 0x11e8, 0x00ff00, Some(IntxPin::A)),
                (bdf(3, 0), 0x1af4, 0x1000, 0x020000, Some(IntxPin::A)),
                (bdf(4, 0), 0xabcd, 0x0001, 0x058000, None),
                (bdf(4, 2), 0xabcd, 0x0002, 0x058000, Some(IntxPin::C)),
                (bdf(31, 0), 0xabcd, 0x0003, 0x088000, None),
            ]
        );

        // (bdf, slot, kind, prefetchable, pci address, cpu address, size)
        #[rustfmt::skip]
        let expected = [
            // 1 MiB and 512 KiB first, at the bottom of the 32-bit window.
            (bdf(2, 0), 0, Space::Mem32, false, 0x1000_0000, 0x1000_0000, 1 << 20),
            (bdf(4, 2), 0, Space::Mem32, false, 0x1010_0000, 0x1010_0000, 512 << 10),
            // 64-bit BARs go to the 64-bit window, largest first.
            (bdf(4, 0), 0, Space::Mem64, false, 0x80_0000_0000, 0x80_0000_0000, 64 << 10),
            (bdf(1, 0), 4, Space::Mem64, true, 0x80_0001_0000, 0x80_0001_0000, 16 << 10),
            (bdf(3, 0), 4, Space::Mem64, true, 0x80_0001_4000, 0x80_0001_4000, 16 << 10),
            // A prefetchable 32-bit BAR may use the non-prefetchable 32-bit window.
            (bdf(4, 0), 5, Space::Mem32, true, 0x1018_0000, 0x1018_0000, 8 << 10),
            (bdf(1, 0), 1, Space::Mem32, false, 0x1018_2000, 0x1018_2000, 4 << 10),
            (bdf(3, 0), 1, Space::Mem32, false, 0x1018_3000, 0x1018_3000, 4 << 10),
            // I/O starts at bus address 0x1000; the window's bus 0 is CPU 0x3eff0000.
            (bdf(3, 0), 0, Space::Io, false, 0x1000, 0x3eff_1000, 32),
            (bdf(4, 0), 2, Space::Io, false, 0x1020, 0x3eff_1020, 16),
        ];
        let mut bar_count = 0;
        for d in &devs {
            bar_count += d.bars.iter().flatten().count();
        }
        assert_eq!(bar_count, expected.len());
        for (b, slot, kind, pref, pci, cpu, size) in expected {
            let d = devs.iter().find(|d| d.bdf == b).unwrap();
            let bar = d.bar(slot).unwrap();
            assert_eq!(
                *bar,
                Bar {
                    index: slot as u8,
                    cpu_addr: PhysAddr::new(cpu),
                    pci_addr: pci,
                    size,
                    kind,
                    prefetchable: pref
                },
                "{b} BAR{slot}"
            );
            // What the device itself now decodes: the BAR registers (flag bits masked off).
            let off = REG_BAR0 + 4 * slot as u16;
            let low = cfg.read32(b, off);
            let reg = match kind {
                Space::Io => u64::from(low & !0x3),
                Space::Mem32 => u64::from(low & !0xf),
                Space::Mem64 => u64::from(low & !0xf) | u64::from(cfg.read32(b, off + 4)) << 32,
            };
            assert_eq!(reg, pci, "{b} BAR{slot} register");
        }

        // Command registers: memory/I/O decoding where such BARs exist, bus mastering for all.
        let cmd = |d, f| cfg.read32(bdf(d, f), REG_COMMAND) as u16 & 0x7;
        assert_eq!(cmd(0, 0), COMMAND_BUS_MASTER);
        assert_eq!(cmd(1, 0), COMMAND_MEMORY | COMMAND_BUS_MASTER);
        assert_eq!(cmd(2, 0), COMMAND_MEMORY | COMMAND_BUS_MASTER);
        assert_eq!(cmd(3, 0), COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER);
        assert_eq!(cmd(4, 0), COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER);
        assert_eq!(cmd(4, 2), COMMAND_MEMORY | COMMAND_BUS_MASTER);
        assert_eq!(cmd(31, 0), COMMAND_BUS_MASTER);
        assert!(!cfg.sized_while_decoding(), "BARs sized with decoding on");
        // The status register's write-one-to-clear error bits were never written with ones.
        assert_eq!(cfg.read32(bdf(2, 0), REG_COMMAND) >> 16, 0x0010 | 0x8000);

        // INTx through QEMU's interrupt-map: slot s pin p -> SPI 3 + (s + p - 1) % 4.
        let spi = |d: &PciDevice| d.intx.map(|s| s.cells().to_vec());
        assert_eq!(spi(&devs[1]), Some(vec![0, 4, 4]));
        assert_eq!(spi(&devs[2]), Some(vec![0, 5, 4]));
        assert_eq!(spi(&devs[3]), Some(vec![0, 6, 4]));
        assert_eq!(spi(&devs[5]), Some(vec![0, 5, 4]), "slot 4 INTC");
        assert_eq!(spi(&devs[0]), None);

        assert_eq!(
            format!("{}", devs[2]),
            "pci 0000:00:02.0 1234:11e8 class 00ff00 BAR0 mem32 0x10000000 (1 MiB) INTA -> GIC SPI 5"
        );
        assert_eq!(
            format!("{}", devs[3]),
            "pci 0000:00:03.0 1af4:1000 class 020000 BAR0 io 0x3eff1000 (32 B) [bus 0x1000] \
             BAR1 mem32 0x10183000 (4 KiB) BAR4 mem64 pref 0x8000014000 (16 KiB) INTA -> GIC SPI 6"
        );
        assert_eq!(
            format!("{}", devs[0]),
            "pci 0000:00:00.0 1b36:0008 class 060000"
        );
    }

    #[test]
    fn without_a_64bit_window_everything_shares_the_32bit_one() {
        // armv7 highmem=off: I/O and 32-bit memory windows only; the ECAM covers buses 0..=15.
        let host = qemu_host(QEMU_VIRT_A15);
        let mut cfg = qemu_like();
        let devs = enumerate(&mut cfg, &host).unwrap();
        let mut mem: Vec<(u64, u64)> = devs
            .iter()
            .flat_map(|d| d.bars.iter().flatten())
            .filter(|b| b.kind != Space::Io)
            .map(|b| (b.pci_addr, b.size))
            .collect();
        mem.sort();
        // 1M, 512K, 64K, 16K, 16K, 8K, 4K, 4K packed from 0x10000000 without gaps.
        assert_eq!(
            mem,
            [
                (0x1000_0000, 1 << 20),
                (0x1010_0000, 512 << 10),
                (0x1018_0000, 64 << 10),
                (0x1019_0000, 16 << 10),
                (0x1019_4000, 16 << 10),
                (0x1019_8000, 8 << 10),
                (0x1019_a000, 4 << 10),
                (0x1019_b000, 4 << 10),
            ]
        );
        assert_eq!(devs[0].domain, 0);
    }

    #[test]
    fn a_full_window_is_an_error_naming_the_bar_and_nothing_is_enabled() {
        let mut host = qemu_host(QEMU_VIRT_A15);
        // Shrink the 32-bit window to 1 MiB: edu's BAR0 (largest) fits, then 00:04.2's does not.
        let w = host
            .windows
            .iter_mut()
            .find(|w| w.kind == Space::Mem32)
            .unwrap();
        w.size = 1 << 20;
        let mut cfg = qemu_like();
        let e = enumerate(&mut cfg, &host).unwrap_err();
        assert_eq!(
            e,
            PciError::NoSpace {
                bdf: bdf(4, 2),
                index: 0,
                size: 512 << 10,
                kind: Space::Mem32,
                prefetchable: false
            }
        );
        assert_eq!(
            format!("{e}"),
            "pci 00:04.2 BAR0 (mem32, 512 KiB): no host bridge window has room for it"
        );
        for (d, f) in [(1, 0), (2, 0), (3, 0)] {
            assert_eq!(
                cfg.read32(bdf(d, f), REG_COMMAND) & 0x7,
                0,
                "{d}.{f} enabled"
            );
            assert_eq!(cfg.read32(bdf(d, f), REG_BAR0 + 4) & !0xf, 0);
        }
    }

    #[test]
    fn a_bridge_on_the_root_bus_is_reported() {
        let mut cfg = FakeConfig::new();
        cfg.add(bdf(0, 0), 0x1b36, 0x0008, 0x060000, 0);
        cfg.add(bdf(5, 0), 0x1b36, 0x000c, 0x060400, 0x01);
        let host = qemu_host(QEMU_VIRT_A53_128M);
        let e = enumerate(&mut cfg, &host).unwrap_err();
        assert_eq!(
            e,
            PciError::UnsupportedHeader {
                bdf: bdf(5, 0),
                header_type: 1
            }
        );
        assert_eq!(
            format!("{e}"),
            "pci 00:05.0: header type 0x01 (a bridge) is not supported: only the root bus is scanned"
        );
    }

    #[test]
    fn an_empty_bus_yields_nothing() {
        let host = qemu_host(QEMU_VIRT_A53_128M);
        let mut cfg = FakeConfig::new();
        assert_eq!(enumerate(&mut cfg, &host), Ok(vec![]));
    }
}
