//! KTAP suite `dma_iommu`: the DMA API for PCI functions behind QEMU's SMMUv3
//! (`-M virt,iommu=smmuv3`), with `edu` (its default 28-bit mask: it reaches RAM only through
//! IOVAs) as the bus master: byte-exact transfers at IOVAs below the mask; isolation (DMA to an
//! unmapped IOVA, a device write to a to-device mapping, an IOVA after a strict unmap, another
//! domain's IOVA: each faults with a decoded event and leaves memory untouched); a 64-segment
//! scatter-gather list in one IOVA range; a coherent buffer of scattered pages; the lazy flush
//! queue; the MSI doorbell mapped in the domain. Skips without an SMMU or without edu.

use alloc::vec;
use alloc::vec::Vec;

use super::api::{Bidirectional, DmaAttrs, FromDevice, SgEntry, ToDevice};
use super::busmap::DmaAddr;
use super::maint::Direction;
use super::{Backend, GfpFlags};
use crate::drivers::edu::{Edu, EduDir, EduError};
use crate::iommu::smmuv3::event::EventKind;
use crate::ktest::{NotPassed, TestResult};
use crate::mm::addr::{PhysAddr, PAGE_SIZE};
use crate::{kassert, kassert_eq, kskip, ktry};

/// The `n`th edu, behind the SMMU, with edu's real 28-bit mask.
fn edu(n: usize) -> Result<(Edu, &'static super::iommu::IommuDomain), NotPassed> {
    let mut e = match Edu::probe_nth(n) {
        Ok(e) => e,
        Err(EduError::NotFound) => kskip!("no edu #{n} (-device edu)"),
        Err(e) => kskip!("edu: {e}"),
    };
    if super::iommu::policy().passthrough {
        kskip!("iommu.passthrough=1: edu uses dma-direct (see passthrough_uses_dma_direct)");
    }
    let Backend::Iommu(d) = e.dev.backend() else { kskip!("edu #{n} is not behind an IOMMU (-M virt,iommu=smmuv3)") };
    if crate::drivers::edu::configured_mask() != crate::drivers::edu::DEFAULT_DMA_MASK {
        kskip!("edu runs with a DMA mask other than its 28-bit default");
    }
    ktry!(e.dev.set_mask_and_coherent(crate::drivers::edu::DEFAULT_DMA_MASK));
    Ok((e, d))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

/// The events the SMMU recorded since the last call, as (kind, StreamID, address, read).
fn events(d: &super::iommu::IommuDomain) -> Vec<(EventKind, u32, u64, bool)> {
    let batch = d.domain().smmu().drain_events();
    batch.events.iter().filter_map(|e| e.access.map(|a| (e.kind, e.sid, a.addr, a.read))).collect()
}

/// RAM above 1 GiB reaches edu (28-bit mask) through IOVAs below 2^28, both directions, byte
/// for byte, at unaligned offsets.
fn edu_with_28_bit_mask_through_the_smmu() -> TestResult {
    let (e, _) = edu(0)?;
    for (len, off, seed) in [(1usize, 0u64, 1u8), (100, 17, 2), (4095, 0, 3), (1234, 2000, 4)] {
        let mut out = pattern(seed, len);
        let sent = out.clone();
        let phys = out.as_ptr() as u64;
        let s = ktry!(e.dev.map_single::<ToDevice>(&mut out));
        kassert!(s.dma_addr().0 + len as u64 <= 1 << 28, "IOVA {} beyond edu's mask", s.dma_addr());
        kassert!(s.dma_addr().0 != phys, "the device was given the physical address");
        kassert_eq!(s.dma_addr().0 % PAGE_SIZE, phys % PAGE_SIZE, "offset in the page");
        ktry!(e.transfer(EduDir::RamToEdu, s.dma_addr(), off, len as u64));
        ktry!(s.unmap());
        let mut back = vec![0u8; len];
        let s = ktry!(e.dev.map_single::<FromDevice>(&mut back));
        ktry!(e.transfer(EduDir::EduToRam, s.dma_addr(), off, len as u64));
        ktry!(s.unmap());
        kassert!(back == sent, "{len} bytes at edu offset {off} came back different");
    }
    Ok(())
}

/// DMA to an IOVA nothing is mapped at: F_TRANSLATION with the StreamID and address; memory and
/// the domain untouched.
fn unmapped_iova_faults() -> TestResult {
    let (e, d) = edu(0)?;
    let _ = events(d);
    let mut buf = vec![0x5au8; 256];
    let s = ktry!(e.dev.map_single::<FromDevice>(&mut buf));
    let stale = s.dma_addr();
    ktry!(s.unmap());
    // Strict: the IOTLB forgot the IOVA at the unmap. Lazy: until the batched invalidation a
    // stale entry may still translate it (the documented price of lazy mode), so flush first.
    if !d.is_strict() {
        ktry!(d.flush());
    }
    ktry!(e.transfer(EduDir::EduToRam, stale, 0, 256));
    kassert!(buf.iter().all(|&b| b == 0x5a), "a write to an unmapped IOVA reached memory");
    let ev = events(d);
    kassert!(!ev.is_empty(), "no fault recorded for DMA to an unmapped IOVA");
    kassert!(ev.iter().all(|&(k, sid, addr, read)| k == EventKind::Translation && sid == d.stream_id() && addr >= stale.0 && addr < stale.0 + 256 && !read), "{ev:?}");
    Ok(())
}

/// A device write into a to-device (device read-only) mapping: F_PERMISSION, nothing written.
fn write_to_a_to_device_mapping_faults() -> TestResult {
    let (e, d) = edu(0)?;
    let _ = events(d);
    let mut buf = vec![0x33u8; 512];
    let s = ktry!(e.dev.map_single::<ToDevice>(&mut buf));
    let iova = s.dma_addr();
    ktry!(e.transfer(EduDir::EduToRam, iova, 0, 512));
    let ev = events(d);
    ktry!(s.unmap());
    kassert!(buf.iter().all(|&b| b == 0x33), "the device wrote a buffer it may only read");
    kassert!(!ev.is_empty(), "no fault recorded");
    kassert!(ev.iter().all(|&(k, sid, addr, read)| k == EventKind::Permission && sid == d.stream_id() && addr >= iova.0 && addr < iova.0 + 512 && !read), "{ev:?}");
    Ok(())
}

/// Two devices, two domains: the second edu cannot reach the first one's buffer at its IOVA.
fn domains_isolate_devices() -> TestResult {
    let (a, da) = edu(0)?;
    let (b, db) = edu(1)?;
    kassert!(!core::ptr::eq(da, db), "two functions share a domain");
    kassert!(da.domain().asid() != db.domain().asid(), "two domains share an ASID");
    let _ = events(da);
    let mut secret = vec![0x77u8; 1024];
    let s = ktry!(a.dev.map_single::<Bidirectional>(&mut secret));
    let iova = s.dma_addr();
    // Nothing is mapped at that IOVA in the second domain: its write must fault there.
    kassert!(db.domain().translate(iova.0).is_none(), "the second domain maps the first one's IOVA");
    ktry!(b.transfer(EduDir::EduToRam, iova, 0, 1024));
    let ev = events(db);
    ktry!(s.unmap());
    kassert!(secret.iter().all(|&x| x == 0x77), "another domain's device wrote the buffer");
    kassert!(ev.iter().any(|&(k, sid, _, _)| k == EventKind::Translation && sid == db.stream_id()), "{ev:?}");
    Ok(())
}

/// 64 page-sized segments of scattered pages: one IOVA range, one DMA segment; edu reads one of
/// them correctly through it.
fn scatter_gather_list_is_one_iova_range() -> TestResult {
    let (e, d) = edu(0)?;
    let mut pages = Vec::new();
    for i in 0..64u8 {
        let p = ktry!(crate::mm::phys::alloc_pages(0));
        // SAFETY: a page just allocated for this test.
        unsafe { core::ptr::write_bytes(p.0 as usize as *mut u8, i, PAGE_SIZE as usize) };
        pages.push(p);
    }
    let mut sg: Vec<SgEntry> = pages.iter().map(|&p| SgEntry::new(p, PAGE_SIZE)).collect();
    let merged = ktry!(e.dev.map_sg(&mut sg, Direction::ToDevice, DmaAttrs::NONE));
    kassert_eq!(merged, 1, "DMA segments after merging");
    let first = ktry!(sg[0].dma.ok_or("unmapped"));
    for (i, s) in sg.iter().enumerate() {
        kassert_eq!(s.dma, Some(DmaAddr(first.0 + i as u64 * PAGE_SIZE)), "segment {i} not contiguous in IOVA space");
    }
    let mut back = vec![0u8; 64];
    ktry!(e.transfer(EduDir::RamToEdu, DmaAddr(first.0 + 37 * PAGE_SIZE + 100), 0, 64));
    let r = ktry!(e.dev.map_single::<FromDevice>(&mut back));
    ktry!(e.transfer(EduDir::EduToRam, r.dma_addr(), 0, 64));
    ktry!(r.unmap());
    kassert!(back.iter().all(|&b| b == 37), "segment 37 read wrong through the list's IOVA range");
    ktry!(e.dev.unmap_sg(&mut sg, Direction::ToDevice, DmaAttrs::NONE));
    kassert!(d.domain().translate(first.0).is_none(), "the list's IOVA range still mapped");
    for p in pages {
        ktry!(crate::mm::phys::free_pages(p, 0));
    }
    Ok(())
}

/// A coherent buffer of single pages: contiguous for the device, an alias in the vmap window for
/// the CPU; edu reads what the CPU wrote through it.
fn coherent_buffer_of_scattered_pages() -> TestResult {
    let (e, d) = edu(0)?;
    let size = 3 * PAGE_SIZE;
    let mut c = ktry!(e.dev.alloc_coherent(size, GfpFlags::KERNEL, DmaAttrs::ALLOC_SINGLE_PAGES));
    let cpu = ktry!(c.cpu_ptr().ok_or("no CPU pointer")).as_ptr() as u64;
    kassert!(crate::mm::vmap::contains(cpu), "single pages not mapped through the vmap window");
    kassert!(c.dma_addr().0 + size <= 1 << 28, "IOVA beyond the mask");
    for i in 0..3 {
        kassert!(d.domain().translate(c.dma_addr().0 + i * PAGE_SIZE).is_some(), "IOVA page {i} unmapped");
    }
    let data = pattern(9, size as usize);
    ktry!(c.as_mut_slice().ok_or("no slice")).copy_from_slice(&data);
    ktry!(e.transfer(EduDir::RamToEdu, DmaAddr(c.dma_addr().0 + PAGE_SIZE - 100), 0, 200));
    let mut back = vec![0u8; 200];
    let r = ktry!(e.dev.map_single::<FromDevice>(&mut back));
    ktry!(e.transfer(EduDir::EduToRam, r.dma_addr(), 0, 200));
    ktry!(r.unmap());
    kassert!(back[..] == data[(PAGE_SIZE - 100) as usize..(PAGE_SIZE + 100) as usize], "across a page boundary of scattered pages");
    let dma = c.dma_addr();
    ktry!(c.free());
    kassert!(d.domain().translate(dma.0).is_none(), "IOVA {dma} still mapped after the free");
    kassert!(!crate::mm::vmap::contains(cpu) || crate::mm::kmap::translate(cpu).is_none(), "CPU alias still mapped after the free");
    Ok(())
}

/// Lazy mode (`iommu.strict=0`): an unmap queues its IOVA until a batched invalidation; a flush
/// gives every queued range back. Strict mode queues nothing.
fn flush_queue_in_lazy_mode() -> TestResult {
    let (e, d) = edu(0)?;
    let before = d.queued();
    let mut buf = vec![0u8; 100];
    let s = ktry!(e.dev.map_single::<ToDevice>(&mut buf));
    ktry!(s.unmap());
    if d.is_strict() {
        kassert_eq!(d.queued(), before, "strict mode queued an IOVA");
        return Ok(());
    }
    // The unmap queued its range, unless it filled the queue, which then flushed.
    kassert!(d.queued() == before + 1 || d.queued() == 0, "queue {} after an unmap (before {before})", d.queued());
    ktry!(d.flush());
    kassert_eq!(d.queued(), 0);
    Ok(())
}

/// The MSI doorbell page is mapped at its own address in the domain, read-write: the device's
/// MSI writes (translated by QEMU's SMMU too) reach the interrupt controller.
fn msi_doorbell_is_mapped() -> TestResult {
    let (_, d) = edu(0)?;
    let bus = ktry!(crate::drivers::pci::ecam::bus().map_err(|e| alloc::format!("{e}")));
    let Some(map) = bus.bridge.msi_map.as_ref() else { kskip!("the host bridge has no msi-map") };
    let dt = &crate::kernel::boot_info().dt;
    let node = ktry!(dt.node_by_phandle(ktry!(map.entries.first().ok_or("empty msi-map")).target));
    let doorbell = ktry!(dt.reg0(&node)).base().0;
    let t = ktry!(d.domain().translate(doorbell).ok_or("doorbell unmapped"));
    kassert_eq!(t.pa, PhysAddr(doorbell));
    kassert!(t.perms.write, "doorbell not writable");
    Ok(())
}

/// `iommu.passthrough=1`: a function behind the SMMU gets a bypass stream and dma-direct, so the
/// device is given physical addresses.
fn passthrough_uses_dma_direct() -> TestResult {
    if !super::iommu::policy().passthrough {
        kskip!("iommu.passthrough is off");
    }
    let e = match Edu::probe() {
        Ok(e) => e,
        Err(err) => kskip!("edu: {err}"),
    };
    let bus = ktry!(crate::drivers::pci::ecam::bus().map_err(|e| alloc::format!("{e}")));
    let pdev = ktry!(bus.devices.iter().find(|p| p.vendor == 0x1234 && p.device == 0x11e8).ok_or("edu not enumerated"));
    let (smmu, sid) = ktry!(crate::iommu::smmuv3::smmu_for_pci(pdev).ok_or("edu is not behind an SMMU (-M virt,iommu=smmuv3)"));
    kassert_eq!(e.dev.backend(), Backend::Direct);
    kassert_eq!(smmu.stream_config(sid), Some(crate::iommu::smmuv3::ste::StreamConfig::Bypass));
    Ok(())
}

crate::ktest_suite!("dma_iommu", [
    passthrough_uses_dma_direct,
    edu_with_28_bit_mask_through_the_smmu,
    unmapped_iova_faults,
    write_to_a_to_device_mapping_faults,
    domains_isolate_devices,
    scatter_gather_list_is_one_iova_range,
    coherent_buffer_of_scattered_pages,
    flush_queue_in_lazy_mode,
    msi_doorbell_is_mapped,
]);
