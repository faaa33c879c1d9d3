//! `/chosen`: the kernel command line, the initrd, and the console (`stdout-path`).

use super::blob::Node;
use super::error::{DtError, Name};
use super::DeviceTree;
use crate::mm::addr::PhysAddr;
use crate::mm::memmap::Region;

/// The console named by `/chosen/stdout-path`.
#[derive(Clone, Copy, Debug)]
pub struct StdoutPath<'a> {
    pub node: Node<'a>,
    /// The text after ':' (e.g. `115200n8`), if any and non-empty.
    pub options: Option<&'a str>,
}

impl<'a> DeviceTree<'a> {
    /// The `/chosen` node, if present.
    pub fn chosen(&self) -> Option<Node<'a>> {
        self.find_node("/chosen")
    }

    /// `/chosen/bootargs`, if present.
    pub fn bootargs(&self) -> Result<Option<&'a str>, DtError> {
        self.chosen()
            .and_then(|c| c.property("bootargs"))
            .map(|p| p.as_str())
            .transpose()
    }

    /// The initrd from `/chosen` `linux,initrd-start` / `linux,initrd-end` (each one or two
    /// cells; end exclusive). `Ok(None)` if neither is present or the range is empty; an error if
    /// only one is present or the end precedes the start.
    pub fn initrd(&self) -> Result<Option<Region>, DtError> {
        let Some(chosen) = self.chosen() else {
            return Ok(None);
        };
        let start = chosen.property("linux,initrd-start");
        let end = chosen.property("linux,initrd-end");
        let (start_p, end_p) = match (start, end) {
            (None, None) => return Ok(None),
            (Some(s), Some(e)) => (s, e),
            (Some(p), None) | (None, Some(p)) => {
                return Err(p.error("linux,initrd-start and linux,initrd-end must come together"))
            }
        };
        let start = start_p.as_u32_or_u64()?;
        let end = end_p.as_u32_or_u64()?;
        if end < start {
            return Err(end_p.error("initrd ends before it starts"));
        }
        if end == start {
            return Ok(None);
        }
        Ok(Region::new(PhysAddr::new(start), end - start))
    }

    /// The console: `/chosen/stdout-path` (or the legacy `linux,stdout-path`), which is a full
    /// path or an alias name, optionally followed by `/sub/path`, then optionally by
    /// `:options`. `Ok(None)` if neither property exists; an error if it names nothing.
    pub fn stdout_path(&self) -> Result<Option<StdoutPath<'a>>, DtError> {
        let Some(chosen) = self.chosen() else {
            return Ok(None);
        };
        let Some(prop) = chosen
            .property("stdout-path")
            .or_else(|| chosen.property("linux,stdout-path"))
        else {
            return Ok(None);
        };
        let value = prop.as_str()?;
        let (path, options) = match value.split_once(':') {
            Some((p, o)) => (p, Some(o).filter(|o| !o.is_empty())),
            None => (value, None),
        };
        let node = if path.starts_with('/') {
            self.find_node(path)
        } else {
            let (alias, rest) = path.split_once('/').unwrap_or((path, ""));
            match self.alias(alias)? {
                Some(base) => self.find_relative(base, rest),
                None => None,
            }
        };
        node.map(|node| Some(StdoutPath { node, options }))
            .ok_or_else(|| DtError::NotFound {
                what: "stdout-path target",
                name: Name::new(path),
            })
    }

    /// The `/aliases` entry naming `node`, if any (e.g. to report "serial0").
    pub fn alias_of(&self, node: &Node<'a>) -> Option<&'a str> {
        let aliases = self.find_node("/aliases")?;
        aliases
            .properties()
            .find(|p| p.as_str().ok().and_then(|path| self.find_node(path)) == Some(*node))
            .map(|p| p.name)
    }
}

#[cfg(test)]
mod tests {
    use crate::dt::fixtures::*;
    use crate::dt::DeviceTree;

    #[test]
    fn qemu_virt_console_is_pl011_by_full_path() {
        let dt = DeviceTree::from_bytes(QEMU_VIRT_A53_128M).unwrap();
        let out = dt.stdout_path().unwrap().unwrap();
        assert_eq!(out.node.name(), "pl011@9000000");
        assert_eq!(out.options, None);
        assert_eq!(dt.reg0(&out.node).unwrap().base().as_u64(), 0x0900_0000);
        assert_eq!(dt.reg0(&out.node).unwrap().size(), 0x1000);
        assert_eq!(dt.alias_of(&out.node), Some("serial0"));
        assert_eq!(dt.bootargs().unwrap(), None);
        assert_eq!(dt.initrd().unwrap(), None);
    }

    #[test]
    fn pi3_downstream_console_is_mini_uart_via_alias_serial0() {
        // bcm2710-rpi-3-b.dts: stdout-path = "serial0:115200n8";
        // serial0 = "/soc/serial@7e215040"; soc ranges <0x7e000000 0x3f000000 0x1000000 ...>;
        // serial@7e215040 reg = <0x7e215040 0x40>.
        let dt = DeviceTree::from_bytes(RPI3B_DOWNSTREAM).unwrap();
        let out = dt.stdout_path().unwrap().unwrap();
        assert_eq!(out.node.name(), "serial@7e215040");
        assert_eq!(format!("{}", out.node.path()), "/soc/serial@7e215040");
        assert_eq!(out.options, Some("115200n8"));
        let r = dt.reg0(&out.node).unwrap();
        assert_eq!((r.base().as_u64(), r.size()), (0x3f21_5040, 0x40));
        assert_eq!(
            dt.bootargs().unwrap(),
            Some(
                "coherent_pool=1M 8250.nr_uarts=1 snd_bcm2835.enable_headphones=0 \
                 cgroup_disable=memory"
            )
        );
    }

    #[test]
    fn custom_tree_alias_with_subpath_and_initrd() {
        // tests/fixtures/dt/bus-translate.dts
        let dt = DeviceTree::from_bytes(BUS_TRANSLATE).unwrap();
        let out = dt.stdout_path().unwrap().unwrap();
        assert_eq!(
            format!("{}", out.node.path()),
            "/soc/bridge@7e010000/uart@200"
        );
        assert_eq!(out.options, Some("9600n8"));
        let initrd = dt.initrd().unwrap().unwrap();
        assert_eq!(initrd.base().as_u64(), 0x4800_0000);
        assert_eq!(initrd.size(), 0x20_0000);
        assert_eq!(
            dt.bootargs().unwrap(),
            Some("console=ttyS0 ktest.filter=\"dma.*\"")
        );
    }

    #[test]
    fn dangling_stdout_path_and_half_initrd_are_errors() {
        let dt = DeviceTree::from_bytes(BROKEN_CHOSEN).unwrap();
        let e = dt.stdout_path().unwrap_err();
        assert_eq!(format!("{e}"), "stdout-path target `serial7` not found");
        let e = dt.initrd().unwrap_err();
        assert!(format!("{e}").contains("linux,initrd-start"), "{e}");
    }
}
