//! `DeviceTree::from_bytes` and every query the kernel makes of a tree and of its nodes: errors
//! must be values, never a panic, a hang or an arithmetic overflow.

#![no_main]

use dmakern::dt::{DeviceTree, Node};
use dmakern_fuzz::{render, split_dtb};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (Some(dt), _) = split_dtb(data) else {
        return;
    };
    tree_queries(&dt);
    // Node-local queries run on every node. Queries that walk the tree (a node's parent and
    // path, `reg` translation, phandle and path lookups) cost O(tree) each, so on every node of
    // a large tree they would be quadratic (seconds per input on the Raspberry Pi trees): they
    // run on every node of a small tree and on an evenly spread sample of a large one; alias
    // lookups, O(aliases x tree) each, on fewer still.
    let stride = dt.nodes().count().div_ceil(WALKED_NODES).max(1);
    for (i, node) in dt.nodes().enumerate() {
        local_queries(&node);
        if i % stride == 0 {
            walking_queries(&dt, &node);
            if i / stride < ALIAS_LOOKUPS {
                let _ = dt.alias_of(&node);
            }
        }
    }
});

/// Nodes, at most, on which the tree-walking queries run.
const WALKED_NODES: usize = 64;
/// Nodes, at most, whose alias is looked up.
const ALIAS_LOOKUPS: usize = 4;

fn tree_queries(dt: &DeviceTree<'_>) {
    let _ = (
        dt.totalsize(),
        dt.boot_cpuid_phys(),
        dt.phys_region(),
        dt.as_bytes().len(),
    );
    render(&format_args!("{dt:?}"));
    for r in dt.memory() {
        drain(r);
    }
    for r in dt.mem_reserve() {
        drain(r);
    }
    match dt.reserved_memory() {
        Ok(rms) => {
            for rm in rms {
                match rm {
                    Ok(rm) => {
                        render(&format_args!("{rm:?}"));
                        let _ = (rm.name(), rm.is_available(), rm.has_reg(), rm.is_dynamic());
                        let _ = rm.compatible().count();
                        for r in rm.regs() {
                            drain(r);
                        }
                        for r in rm.alloc_ranges() {
                            drain(r);
                        }
                    }
                    Err(e) => drop(render(&e)),
                }
            }
        }
        Err(e) => drop(render(&e)),
    }
    let _ = dt.chosen();
    drain(dt.bootargs());
    drain(dt.initrd());
    if let Ok(Some(out)) = dt.stdout_path() {
        let _ = dt.alias_of(&out.node);
        render(&out.node.path());
    }
    drain(dt.stdout_path());
    match dt.cpus() {
        Ok(cpus) => {
            for c in cpus {
                drain(c);
            }
        }
        Err(e) => drop(render(&e)),
    }
    drain(dt.cpu_count());
    drain(dt.psci());
    drain(dt.model());
    if let Ok(list) = dt.root_compatible() {
        let _ = list.count();
    }
    if let Some(aliases) = dt.find_node("/aliases") {
        for p in aliases.properties() {
            drain(dt.alias(p.name));
        }
    }
    for compat in [
        "arm,pl011",
        "shared-dma-pool",
        "arm,psci-1.0",
        "simple-bus",
        "pci-host-ecam-generic",
    ] {
        let _ = dt.find_compatible(compat).count();
    }
    for path in [
        "/",
        "/memory",
        "/chosen",
        "/cpus/cpu@0",
        "/soc/serial",
        "//a//b/",
        "",
    ] {
        let _ = dt.find_node(path);
    }
    let _ = dt.node_by_phandle(1);
    let _ = dt.node_by_phandle(u32::MAX);
}

fn local_queries(node: &Node<'_>) {
    let _ = (
        node.name(),
        node.base_name(),
        node.unit_address(),
        node.offset(),
    );
    let _ = (node.status(), node.is_available(), node.device_type());
    let _ = node.compatible().count();
    let _ = node.children().count();
    for p in node.properties() {
        let _ = node.property(p.name);
        drain(p.as_u32());
        drain(p.as_u64());
        drain(p.as_u32_or_u64());
        drain(p.as_cells(1));
        drain(p.as_cells(2));
        drain(p.as_cells(3));
        drain(p.as_phandle());
        drain(p.as_str());
        if let Ok(list) = p.as_str_list() {
            let _ = list.count();
        }
        if let Ok(cells) = p.as_u32s() {
            let _ = cells.count();
        }
        render(&p.error("fuzz"));
    }
    if let Some(first) = node.compatible().first() {
        let _ = node.is_compatible(first);
    }
}

fn walking_queries<'a>(dt: &DeviceTree<'a>, node: &Node<'a>) {
    let _ = (node.depth(), node.parent());
    let ancestry = node.ancestry();
    let _ = (
        ancestry.len(),
        ancestry.last(),
        ancestry.parent(),
        ancestry.pop().len(),
    );
    render(&format_args!("{node:?}"));
    let path = render(&node.path());
    let _ = dt.find_node(&path);
    if let Ok(Some(regs)) = dt.reg(node) {
        for r in regs {
            drain(r);
        }
    }
    drain(dt.reg(node).map(|r| r.is_some()));
    drain(dt.reg0(node));
    for prop in [
        "interrupt-parent",
        "memory-region",
        "clocks",
        "iommus",
        "phandle",
    ] {
        drain(dt.phandle_ref(node, prop));
    }
    drain(dt.interrupt_parent(node));
    if let Ok(phandle) = node.property("phandle").map_or(Ok(0), |p| p.as_u32()) {
        if phandle != 0 {
            if let Ok(found) = dt.node_by_phandle(phandle) {
                // Any other node defining the same phandle makes the lookup ambiguous (an error).
                assert!(
                    found == *node,
                    "node_by_phandle({phandle:#x}) found {} instead of {path}",
                    render(&found.path())
                );
            }
        }
    }
}

/// Formats the value or the error (running every `Display`/`Debug` impl on the way).
fn drain<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>) {
    match r {
        Ok(v) => drop(render(&format_args!("{v:?}"))),
        Err(e) => drop(render(&e)),
    }
}
