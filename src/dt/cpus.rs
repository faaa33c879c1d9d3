//! `/cpus` and `/psci`: what secondary-CPU bring-up needs.

use super::blob::{Children, Node, Status};
use super::error::{DtError, Name};
use super::translate::{Cells, Pairs, MAX_TRANSLATED_ADDRESS_CELLS};
use super::DeviceTree;

/// One `/cpus/cpu@N` node (a node with `device_type = "cpu"`).
#[derive(Clone, Copy, Debug)]
pub struct Cpu<'a> {
    pub node: Node<'a>,
    /// First `reg` entry: the MPIDR affinity fields (Aff3..Aff0 on arm64, Aff2..Aff0 on arm).
    pub mpidr: u64,
    /// `enable-method`: "psci", "spin-table", "brcm,bcm2836-smp", ...
    pub enable_method: Option<&'a str>,
    /// `cpu-release-addr` (spin-table), one or two cells.
    pub release_addr: Option<u64>,
    /// First `compatible` entry, e.g. "arm,cortex-a53".
    pub compatible: Option<&'a str>,
    /// A disabled CPU may still be started through its enable method (spec 3.8.1).
    pub status: Status,
}

/// Iterator over the CPUs, in blob order.
pub struct Cpus<'a> {
    children: Children<'a>,
    cells: Cells,
}

impl<'a> Iterator for Cpus<'a> {
    type Item = Result<Cpu<'a>, DtError>;

    fn next(&mut self) -> Option<Self::Item> {
        let cells = self.cells;
        let node = self
            .children
            .by_ref()
            .find(|c| c.device_type() == Some("cpu"))?;
        Some(cpu(node, cells))
    }
}

fn cpu(node: Node<'_>, cells: Cells) -> Result<Cpu<'_>, DtError> {
    let reg = node.property("reg").ok_or_else(|| DtError::NotFound {
        what: "reg of cpu node",
        name: node.short_name(),
    })?;
    let (mpidr, _) = Pairs::new(&reg, cells)?
        .next()
        .ok_or_else(|| reg.error("empty"))?;
    let opt_str = |name| node.property(name).map(|p| p.as_str()).transpose();
    Ok(Cpu {
        mpidr,
        enable_method: opt_str("enable-method")?,
        release_addr: node
            .property("cpu-release-addr")
            .map(|p| p.as_u32_or_u64())
            .transpose()?,
        compatible: node.compatible().first(),
        status: node.status(),
        node,
    })
}

/// How PSCI calls are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciMethod {
    Hvc,
    Smc,
}

/// The `/psci` node.
#[derive(Clone, Copy, Debug)]
pub struct Psci<'a> {
    pub node: Node<'a>,
    pub method: PsciMethod,
    /// First `compatible` entry ("arm,psci-1.0", "arm,psci-0.2" or "arm,psci").
    pub compatible: Option<&'a str>,
    /// `cpu_on` function ID: only meaningful for PSCI 0.1 ("arm,psci" alone); 0.2 and later use
    /// the standard IDs.
    pub cpu_on: Option<u32>,
}

const PSCI_COMPATIBLES: [&str; 3] = ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"];

impl<'a> DeviceTree<'a> {
    /// The CPU nodes under `/cpus`. Errors if `/cpus` is missing or its `#address-cells` is not
    /// 1 or 2 (items are errors for CPU nodes without a usable `reg`).
    pub fn cpus(&self) -> Result<Cpus<'a>, DtError> {
        let cpus = self.find_node("/cpus").ok_or_else(|| DtError::NotFound {
            what: "node",
            name: Name::new("/cpus"),
        })?;
        let cells = Cells::of(&cpus)?;
        if cells.address == 0 {
            return Err(DtError::ZeroCells {
                node: cpus.short_name(),
                prop: "#address-cells",
                what: "the `reg` of a CPU node holds its MPIDR",
            });
        }
        if cells.address > MAX_TRANSLATED_ADDRESS_CELLS {
            return Err(DtError::Cells {
                node: cpus.short_name(),
                prop: "#address-cells",
                value: cells.address,
                max: MAX_TRANSLATED_ADDRESS_CELLS,
            });
        }
        Ok(Cpus {
            children: cpus.children(),
            cells,
        })
    }

    /// Number of CPU nodes (any status); the first malformed one is an error.
    pub fn cpu_count(&self) -> Result<usize, DtError> {
        self.cpus()?.try_fold(0usize, |n, c| c.map(|_| n + 1))
    }

    /// The PSCI node: `/psci`, or else the first node compatible with a PSCI binding. `Ok(None)`
    /// if there is none or it is not available; an error if `method` is missing or unknown.
    pub fn psci(&self) -> Result<Option<Psci<'a>>, DtError> {
        let node = self.find_node("/psci").or_else(|| {
            // Each node's `compatible` decoded once, not once per binding.
            self.nodes().find(|n| {
                let compat = n.compatible();
                PSCI_COMPATIBLES.iter().any(|c| compat.contains(c))
            })
        });
        let Some(node) = node.filter(|n| n.is_available()) else {
            return Ok(None);
        };
        let method_p = node.property("method").ok_or_else(|| DtError::NotFound {
            what: "method of PSCI node",
            name: node.short_name(),
        })?;
        let method = match method_p.as_str()? {
            "hvc" => PsciMethod::Hvc,
            "smc" => PsciMethod::Smc,
            _ => return Err(method_p.error("PSCI method must be \"hvc\" or \"smc\"")),
        };
        Ok(Some(Psci {
            node,
            method,
            compatible: node.compatible().first(),
            cpu_on: node.property("cpu_on").map(|p| p.as_u32()).transpose()?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::dt::fixtures::*;
    use crate::dt::{DeviceTree, PsciMethod, Status};

    #[test]
    fn qemu_virt_four_psci_cpus() {
        // qemu-virt-a53-2g.dtb was dumped with -smp 4: cpu@0..3, reg 0..3, enable-method "psci";
        // psci method "hvc", compatible "arm,psci-1.0" first, cpu_on 0xc4000003.
        let dt = DeviceTree::from_bytes(QEMU_VIRT_A53_2G).unwrap();
        assert_eq!(dt.cpu_count().unwrap(), 4);
        for (i, cpu) in dt.cpus().unwrap().enumerate() {
            let cpu = cpu.unwrap();
            assert_eq!(cpu.mpidr, i as u64);
            assert_eq!(cpu.enable_method, Some("psci"));
            assert_eq!(cpu.release_addr, None);
            assert_eq!(cpu.compatible, Some("arm,cortex-a53"));
            assert_eq!(cpu.status, Status::Okay);
        }
        let psci = dt.psci().unwrap().unwrap();
        assert_eq!(psci.method, PsciMethod::Hvc);
        assert_eq!(psci.compatible, Some("arm,psci-1.0"));
        assert_eq!(psci.cpu_on, Some(0xc400_0003));
        assert_eq!(psci.node.name(), "psci");
    }

    #[test]
    fn qemu_virt_a15_single_cpu() {
        let dt = DeviceTree::from_bytes(QEMU_VIRT_A15).unwrap();
        assert_eq!(dt.cpu_count().unwrap(), 1);
        let cpu = dt.cpus().unwrap().next().unwrap().unwrap();
        assert_eq!(cpu.compatible, Some("arm,cortex-a15"));
        assert_eq!(dt.psci().unwrap().unwrap().cpu_on, Some(0x8400_0003));
    }

    #[test]
    fn pi3_spin_table_release_addresses() {
        // bcm2710-rpi-3-b.dts: cpu@0..3 reg 0..3, enable-method "spin-table",
        // cpu-release-addr = <0x00 0xd8>, <0x00 0xe0>, <0x00 0xe8>, <0x00 0xf0>; no /psci.
        let dt = DeviceTree::from_bytes(RPI3B_DOWNSTREAM).unwrap();
        let cpus: Vec<_> = dt.cpus().unwrap().map(|c| c.unwrap()).collect();
        assert_eq!(cpus.len(), 4);
        let release: Vec<_> = cpus.iter().map(|c| c.release_addr).collect();
        assert_eq!(release, [Some(0xd8), Some(0xe0), Some(0xe8), Some(0xf0)]);
        let mpidr: Vec<_> = cpus.iter().map(|c| c.mpidr).collect();
        assert_eq!(mpidr, [0, 1, 2, 3]);
        assert!(cpus.iter().all(|c| c.enable_method == Some("spin-table")));
        assert_eq!(cpus[0].compatible, Some("arm,cortex-a53"));
        assert!(dt.psci().unwrap().is_none());
    }

    #[test]
    fn pi5_psci_smc() {
        let dt = DeviceTree::from_bytes(RPI5B_DOWNSTREAM).unwrap();
        assert_eq!(dt.psci().unwrap().unwrap().method, PsciMethod::Smc);
        assert_eq!(dt.cpu_count().unwrap(), 4);
        let cpu = dt.cpus().unwrap().nth(1).unwrap().unwrap();
        assert_eq!(cpu.enable_method, Some("psci"));
        assert_eq!(cpu.mpidr, 0x100);
    }

    #[test]
    fn cpus_without_address_cells_are_refused() {
        let blob = with_cell(QEMU_VIRT_A53_2G, "/cpus", "#address-cells", 0);
        let dt = DeviceTree::from_bytes(&blob).unwrap();
        let e = dt.cpus().err().unwrap();
        assert_eq!(
            format!("{e}"),
            "`#address-cells = 0` in node `cpus` is not allowed: the `reg` of a CPU node holds \
             its MPIDR"
        );
    }
}
