//! A simulated non-coherent memory system, for host tests of the DMA layer's cache maintenance
//! ([`super::maint`]).
//!
//! Host builds have no cache to get wrong, so a mistake in the maintenance rules would only show
//! on hardware, intermittently. This module gives the rules something to be wrong against:
//!
//! - [`Memory`]: the bytes at the point of coherency, which a non-coherent device reads and
//!   writes directly.
//! - [`Cache`]: a write-back, write-allocate data cache in front of it, with a bounded number of
//!   lines (a fill into a full cache evicts the oldest line), and hooks for what real caches do at
//!   moments no one chooses: [`Cache::evict_at_random`] (a dirty victim is written back, possibly
//!   in the middle of a device transfer) and [`Cache::speculative_fill`] (a line is fetched
//!   although no load asked for it). It implements [`CacheOps`]: this is where the
//!   architecture's cache instructions are routed in host builds, so the real
//!   [`maint::for_device`] / [`maint::for_cpu`] run against it.
//! - [`DmaDevice`]: a device that reads and writes [`Memory`], never the cache.
//! - [`Harness`]: what dma-direct does for a non-coherent device (`direct.rs`): map calls
//!   `for_device`, unmap `for_cpu`, sync-for-CPU `for_cpu`, sync-for-device `for_device`. It also
//!   tracks who owns each mapping, so that a driver touching a buffer the device owns is caught.
//!
//! The model is deliberately the worst case the architecture allows: an invalidate discards a
//! dirty line rather than writing it back (Arm permits either), evictions and speculative fills
//! happen whenever a test says so, and maintenance takes effect only at [`CacheOps::complete`].
//! CPU addresses, physical addresses and bus addresses are the same here (the linear map and an
//! identity bus map).

use super::maint::{self, CacheOps, Direction, MaintError};
use core::fmt;
use core::ops::Range;
use std::vec;
use std::vec::Vec;

/// What the model refuses, or a rule of the DMA API a test broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelError {
    /// `addr .. addr + len` is not all inside the memory.
    OutOfMemory { addr: usize, len: usize },
    /// A memory of `len` bytes at `base` does not fit in the address space.
    MemoryWraps { base: usize, len: usize },
    /// The line size is not a power of two, the capacity is zero, or the memory is not made of
    /// whole lines.
    BadGeometry { line: usize, capacity: usize },
    /// A [`CacheOps`] operation was called outside its contract (misaligned, empty or wrapping).
    OpContract { op: Op, va: usize, len: usize },
    /// The maintenance code returned with `pending` operations it never completed.
    NotCompleted { pending: usize },
    /// The maintenance code refused the request.
    Maint(MaintError),
    /// A mapping of zero bytes (dma-direct refuses those too).
    ZeroSize,
    /// The CPU touched `addr .. addr + len`, which overlaps a mapping the device owns.
    DeviceOwns { addr: usize, len: usize, mapping: Mapping },
    /// No such mapping (never made, or already unmapped).
    NotMapped { mapping: Mapping },
    /// The device accessed a mapping the CPU owns (before sync for device).
    CpuOwns { mapping: Mapping },
    /// The device accessed bytes `offset .. offset + len` outside its mapping.
    OutsideMapping { mapping: Mapping, offset: usize, len: usize },
    /// The device read a from-device mapping or wrote a to-device one.
    WrongDirection { mapping: Mapping },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::OutOfMemory { addr, len } => {
                write!(f, "{addr:#x} + {len:#x} is outside the simulated memory")
            }
            ModelError::MemoryWraps { base, len } => {
                write!(f, "a memory of {len:#x} bytes at {base:#x} wraps the address space")
            }
            ModelError::BadGeometry { line, capacity } => write!(
                f,
                "cache of {capacity} lines of {line} bytes: the line size must be a power of two, \
                 the capacity non-zero and the memory whole lines"
            ),
            ModelError::OpContract { op, va, len } => {
                write!(f, "{op} of {va:#x} + {len:#x} breaks the CacheOps contract")
            }
            ModelError::NotCompleted { pending } => {
                write!(f, "maintenance returned with {pending} operations not completed")
            }
            ModelError::Maint(e) => write!(f, "maintenance refused: {e}"),
            ModelError::ZeroSize => f.write_str("mapping of zero bytes"),
            ModelError::DeviceOwns { addr, len, mapping } => {
                write!(f, "CPU access to {addr:#x} + {len:#x} while the device owns {mapping}")
            }
            ModelError::NotMapped { mapping } => write!(f, "{mapping} is not mapped"),
            ModelError::CpuOwns { mapping } => {
                write!(f, "device access to {mapping} while the CPU owns it")
            }
            ModelError::OutsideMapping { mapping, offset, len } => {
                write!(f, "device access to bytes {offset:#x} + {len:#x}, outside {mapping}")
            }
            ModelError::WrongDirection { mapping } => {
                write!(f, "device access against the direction of {mapping}")
            }
        }
    }
}

/// The cache operations of [`CacheOps`], as the model records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Clean,
    Invalidate,
    CleanInvalidate,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Clean => "clean",
            Op::Invalidate => "invalidate",
            Op::CleanInvalidate => "clean+invalidate",
        })
    }
}

/// A small seeded generator (SplitMix64), so that every "arbitrary moment" is reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0 .. n` (0 when `n` is 0). The modulo bias does not matter here.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Memory at the point of coherency: `len` bytes from `base`.
pub struct Memory {
    base: usize,
    bytes: Vec<u8>,
}

impl Memory {
    /// `len` bytes at `base`, byte `a` holding `init(a)`.
    pub fn new(base: usize, len: usize, init: impl Fn(usize) -> u8) -> Result<Memory, ModelError> {
        base.checked_add(len).ok_or(ModelError::MemoryWraps { base, len })?;
        Ok(Memory { base, bytes: (0..len).map(|i| init(base + i)).collect() })
    }

    pub fn range(&self) -> Range<usize> {
        self.base..self.base + self.bytes.len()
    }

    /// The offset of `addr .. addr + len` in `bytes`, if it is all inside.
    fn offset(&self, addr: usize, len: usize) -> Result<usize, ModelError> {
        let out = ModelError::OutOfMemory { addr, len };
        let off = addr.checked_sub(self.base).ok_or(out)?;
        match off.checked_add(len) {
            Some(end) if end <= self.bytes.len() => Ok(off),
            _ => Err(out),
        }
    }

    pub fn read(&self, addr: usize, buf: &mut [u8]) -> Result<(), ModelError> {
        let off = self.offset(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes[off..off + buf.len()]);
        Ok(())
    }

    pub fn write(&mut self, addr: usize, data: &[u8]) -> Result<(), ModelError> {
        let off = self.offset(addr, data.len())?;
        self.bytes[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// One valid cache line.
struct Line {
    /// Address of its first byte, a multiple of the line size.
    addr: usize,
    data: Vec<u8>,
    /// Holds data newer than memory.
    dirty: bool,
}

/// What the cache has done, for tests to check that the evictions and fills they count on happened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Lines fetched from memory (loads, write-allocates, speculation).
    pub fills: usize,
    /// Lines dropped to make room or by [`Cache::evict_at_random`].
    pub evictions: usize,
    /// Dirty lines written to memory, by eviction or maintenance.
    pub write_backs: usize,
}

/// A write-back, write-allocate data cache in front of a [`Memory`], of `capacity` lines. Every
/// line it holds lies inside the memory (lines are only ever filled from it).
pub struct Cache {
    mem: Memory,
    line: usize,
    capacity: usize,
    /// Valid lines, oldest first: a fill into a full cache evicts the first.
    lines: Vec<Line>,
    /// Operations issued through [`CacheOps`] that take effect at [`CacheOps::complete`].
    queued: Vec<(Op, usize, usize)>,
    /// The first [`CacheOps`] contract violation not yet taken by [`Cache::take_violation`].
    violation: Option<ModelError>,
    stats: Stats,
}

impl Cache {
    /// An empty cache of `capacity` lines of `line` bytes (a power of two) in front of `mem`,
    /// whose base and length must be multiples of `line`.
    pub fn new(mem: Memory, line: usize, capacity: usize) -> Result<Cache, ModelError> {
        let r = mem.range();
        if !line.is_power_of_two() || capacity == 0 || !r.start.is_multiple_of(line) || !r.len().is_multiple_of(line) {
            return Err(ModelError::BadGeometry { line, capacity });
        }
        Ok(Cache {
            mem,
            line,
            capacity,
            lines: Vec::new(),
            queued: Vec::new(),
            violation: None,
            stats: Stats::default(),
        })
    }

    /// The memory behind the cache, as a device (or a test checking what reached it) sees it.
    pub fn memory(&self) -> &Memory {
        &self.mem
    }

    /// The memory behind the cache, for a device's writes: they bypass the cache.
    pub fn memory_mut(&mut self) -> &mut Memory {
        &mut self.mem
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The start of the line holding `addr`.
    pub fn line_of(&self, addr: usize) -> usize {
        addr & !(self.line - 1)
    }

    fn find(&self, addr: usize) -> Option<usize> {
        let l = self.line_of(addr);
        self.lines.iter().position(|x| x.addr == l)
    }

    /// Whether the line holding `addr` is in the cache.
    pub fn holds(&self, addr: usize) -> bool {
        self.find(addr).is_some()
    }

    /// Whether the line holding `addr` is in the cache and dirty.
    pub fn is_dirty(&self, addr: usize) -> bool {
        self.find(addr).is_some_and(|i| self.lines[i].dirty)
    }

    fn write_back(&mut self, i: usize) {
        let line = &mut self.lines[i];
        if line.dirty {
            let off = line.addr - self.mem.base;
            // In range: lines are only filled from inside the memory.
            self.mem.bytes[off..off + self.line].copy_from_slice(&line.data);
            line.dirty = false;
            self.stats.write_backs += 1;
        }
    }

    fn evict(&mut self, i: usize) {
        self.write_back(i);
        self.lines.remove(i);
        self.stats.evictions += 1;
    }

    /// The index of the line holding `addr`, fetched from memory on a miss (evicting the oldest
    /// line if the cache is full).
    fn fill(&mut self, addr: usize) -> Result<usize, ModelError> {
        if let Some(i) = self.find(addr) {
            return Ok(i);
        }
        let l = self.line_of(addr);
        let mut data = vec![0; self.line];
        self.mem.read(l, &mut data)?;
        if self.lines.len() == self.capacity {
            self.evict(0);
        }
        self.lines.push(Line { addr: l, data, dirty: false });
        self.stats.fills += 1;
        Ok(self.lines.len() - 1)
    }

    /// Calls `f(line, offset in the line, offset in the access, length)` for each line piece of
    /// `addr .. addr + len`, filling lines as needed. Checks the whole range first, so that a
    /// refused access changes nothing.
    fn each_piece(
        &mut self,
        addr: usize,
        len: usize,
        mut f: impl FnMut(&mut Line, usize, usize, usize),
    ) -> Result<(), ModelError> {
        self.mem.offset(addr, len)?;
        let mut done = 0;
        while done < len {
            let a = addr + done;
            let in_line = a - self.line_of(a);
            let n = (self.line - in_line).min(len - done);
            let i = self.fill(a)?;
            f(&mut self.lines[i], in_line, done, n);
            done += n;
        }
        Ok(())
    }

    /// A CPU load of `buf.len()` bytes at `addr`, through the cache.
    pub fn cpu_read(&mut self, addr: usize, buf: &mut [u8]) -> Result<(), ModelError> {
        self.each_piece(addr, buf.len(), |line, at, from, n| {
            buf[from..from + n].copy_from_slice(&line.data[at..at + n])
        })
    }

    /// A CPU store of `data` at `addr`: the lines are filled if missing (write-allocate) and left
    /// dirty; memory is not written.
    pub fn cpu_write(&mut self, addr: usize, data: &[u8]) -> Result<(), ModelError> {
        self.each_piece(addr, data.len(), |line, at, from, n| {
            line.data[at..at + n].copy_from_slice(&data[from..from + n]);
            line.dirty = true;
        })
    }

    /// Evicts a line chosen by `rng`, writing it back if dirty, as a real cache may at any moment.
    /// Returns its address, or `None` if the cache is empty.
    pub fn evict_at_random(&mut self, rng: &mut Rng) -> Option<usize> {
        if self.lines.is_empty() {
            return None;
        }
        let i = rng.below(self.lines.len());
        let addr = self.lines[i].addr;
        self.evict(i);
        Some(addr)
    }

    /// Fetches a line of `range` chosen by `rng` (within the memory), as a CPU may speculatively
    /// at any moment. Returns the line's address if it was fetched now, `None` if it was already
    /// in the cache or `range` holds no memory.
    pub fn speculative_fill(&mut self, rng: &mut Rng, range: Range<usize>) -> Option<usize> {
        let mem = self.mem.range();
        let (start, end) = (range.start.max(mem.start), range.end.min(mem.end));
        if start >= end {
            return None;
        }
        let first = self.line_of(start);
        let lines = (end - 1 - first) / self.line + 1;
        let addr = first + rng.below(lines) * self.line;
        if self.holds(addr) {
            return None;
        }
        self.fill(addr).ok().map(|_| addr)
    }

    /// Operations issued and not yet completed.
    pub fn pending(&self) -> usize {
        self.queued.len()
    }

    /// The first [`CacheOps`] contract violation since the last call, if any.
    pub fn take_violation(&mut self) -> Option<ModelError> {
        self.violation.take()
    }

    fn issue(&mut self, op: Op, va: usize, len: usize) {
        let aligned = va.is_multiple_of(self.line) && len != 0 && len.is_multiple_of(self.line);
        if !aligned || va.checked_add(len).is_none() {
            self.violation.get_or_insert(ModelError::OpContract { op, va, len });
            return;
        }
        self.queued.push((op, va, len));
    }

    /// Applies an issued operation to the cached lines of `va .. va + len` (which `issue`
    /// checked does not wrap), going over the lines held rather than over the range.
    fn apply(&mut self, op: Op, va: usize, len: usize) {
        let end = va + len;
        let mut i = 0;
        while i < self.lines.len() {
            let a = self.lines[i].addr;
            if a < va || a >= end {
                i += 1;
                continue;
            }
            if op != Op::Invalidate {
                self.write_back(i);
            }
            if op == Op::Clean {
                i += 1;
            } else {
                self.lines.remove(i);
            }
        }
    }
}

/// The architecture's cache operations, routed to the model.
impl CacheOps for Cache {
    fn line_size(&self) -> usize {
        self.line
    }

    fn clean(&mut self, va: usize, len: usize) {
        self.issue(Op::Clean, va, len)
    }

    fn invalidate(&mut self, va: usize, len: usize) {
        self.issue(Op::Invalidate, va, len)
    }

    fn clean_invalidate(&mut self, va: usize, len: usize) {
        self.issue(Op::CleanInvalidate, va, len)
    }

    fn complete(&mut self) {
        for (op, va, len) in core::mem::take(&mut self.queued) {
            self.apply(op, va, len);
        }
    }
}

/// A non-coherent DMA device: it reads and writes [`Memory`] directly and never sees the cache.
pub struct DmaDevice;

impl DmaDevice {
    pub fn read(&self, mem: &Memory, addr: usize, buf: &mut [u8]) -> Result<(), ModelError> {
        mem.read(addr, buf)
    }

    pub fn write(&self, mem: &mut Memory, addr: usize, data: &[u8]) -> Result<(), ModelError> {
        mem.write(addr, data)
    }
}

/// A streaming mapping made by [`Harness::map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    id: u32,
    pub va: usize,
    pub len: usize,
    pub dir: Direction,
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} mapping {:#x} + {:#x}", self.dir, self.va, self.len)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Cpu,
    Device,
}

/// What `dma-direct` does for a non-coherent device, with the model as the cache and the real
/// maintenance code: [`Harness::map`] and [`Harness::sync_for_device`] call
/// [`maint::for_device`], [`Harness::unmap`] and [`Harness::sync_for_cpu`] call
/// [`maint::for_cpu`]. The device may access only mappings it owns, in their direction; the CPU,
/// through [`Harness::cpu_read`] / [`Harness::cpu_write`], only bytes no device-owned mapping
/// covers. [`Harness::cache_mut`] is the CPU without those checks (speculation, a buggy driver).
/// Bouncing and `SKIP_CPU_SYNC` are not modelled: they change which memory is maintained, or
/// whether, not how.
pub struct Harness {
    cache: Cache,
    device: DmaDevice,
    mappings: Vec<(Mapping, Owner)>,
    next_id: u32,
}

impl Harness {
    pub fn new(cache: Cache) -> Harness {
        Harness { cache, device: DmaDevice, mappings: Vec::new(), next_id: 0 }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn cache_mut(&mut self) -> &mut Cache {
        &mut self.cache
    }

    /// Checks that a maintenance call kept the [`CacheOps`] contract and completed its work.
    fn finish(&mut self, r: Result<(), MaintError>) -> Result<(), ModelError> {
        r.map_err(ModelError::Maint)?;
        if let Some(e) = self.cache.take_violation() {
            return Err(e);
        }
        match self.cache.pending() {
            0 => Ok(()),
            pending => Err(ModelError::NotCompleted { pending }),
        }
    }

    fn for_device(&mut self, va: usize, len: usize, dir: Direction) -> Result<(), ModelError> {
        let r = maint::for_device(&mut self.cache, va, len, dir);
        self.finish(r)
    }

    fn for_cpu(&mut self, va: usize, len: usize, dir: Direction) -> Result<(), ModelError> {
        let r = maint::for_cpu(&mut self.cache, va, len, dir);
        self.finish(r)
    }

    fn index(&self, m: &Mapping) -> Result<usize, ModelError> {
        self.mappings.iter().position(|(x, _)| x.id == m.id).ok_or(ModelError::NotMapped { mapping: *m })
    }

    /// Maps `va .. va + len` for the device: cleans it for the device, which then owns it.
    pub fn map(&mut self, va: usize, len: usize, dir: Direction) -> Result<Mapping, ModelError> {
        if len == 0 {
            return Err(ModelError::ZeroSize);
        }
        self.for_device(va, len, dir)?;
        let m = Mapping { id: self.next_id, va, len, dir };
        self.next_id = self.next_id.wrapping_add(1);
        self.mappings.push((m, Owner::Device));
        Ok(m)
    }

    /// Ends mapping `m`: the maintenance for the CPU, which owns the buffer again.
    pub fn unmap(&mut self, m: Mapping) -> Result<(), ModelError> {
        let i = self.index(&m)?;
        self.for_cpu(m.va, m.len, m.dir)?;
        self.mappings.remove(i);
        Ok(())
    }

    /// Gives the buffer of `m` to the CPU without unmapping it.
    pub fn sync_for_cpu(&mut self, m: &Mapping) -> Result<(), ModelError> {
        let i = self.index(m)?;
        self.for_cpu(m.va, m.len, m.dir)?;
        self.mappings[i].1 = Owner::Cpu;
        Ok(())
    }

    /// Gives the buffer of `m` back to the device.
    pub fn sync_for_device(&mut self, m: &Mapping) -> Result<(), ModelError> {
        let i = self.index(m)?;
        self.for_device(m.va, m.len, m.dir)?;
        self.mappings[i].1 = Owner::Device;
        Ok(())
    }

    /// An empty access touches nothing, and one that wraps is left for the memory to refuse.
    /// `m.va + (m.len - 1)` does not overflow: `map` refused empty buffers and maintenance
    /// refused wrapping ones.
    fn cpu_may_touch(&self, addr: usize, len: usize) -> Result<(), ModelError> {
        let Some(last) = len.checked_sub(1).and_then(|l| addr.checked_add(l)) else {
            return Ok(());
        };
        let overlaps = |m: &Mapping| addr <= m.va + (m.len - 1) && m.va <= last;
        match self.mappings.iter().find(|(m, o)| *o == Owner::Device && overlaps(m)) {
            Some((m, _)) => Err(ModelError::DeviceOwns { addr, len, mapping: *m }),
            None => Ok(()),
        }
    }

    /// A driver's load: refused on bytes the device owns.
    pub fn cpu_read(&mut self, addr: usize, buf: &mut [u8]) -> Result<(), ModelError> {
        self.cpu_may_touch(addr, buf.len())?;
        self.cache.cpu_read(addr, buf)
    }

    /// A driver's store: refused on bytes the device owns.
    pub fn cpu_write(&mut self, addr: usize, data: &[u8]) -> Result<(), ModelError> {
        self.cpu_may_touch(addr, data.len())?;
        self.cache.cpu_write(addr, data)
    }

    /// The start address of bytes `offset .. offset + len` of `m`, if the device may access them.
    fn device_range(&self, m: &Mapping, offset: usize, len: usize, write: bool) -> Result<usize, ModelError> {
        let (cur, owner) = self.mappings[self.index(m)?];
        if owner != Owner::Device {
            return Err(ModelError::CpuOwns { mapping: cur });
        }
        let allowed = match cur.dir {
            Direction::ToDevice => !write,
            Direction::FromDevice => write,
            Direction::Bidirectional => true,
        };
        if !allowed {
            return Err(ModelError::WrongDirection { mapping: cur });
        }
        let outside = ModelError::OutsideMapping { mapping: cur, offset, len };
        match offset.checked_add(len) {
            Some(end) if end <= cur.len => cur.va.checked_add(offset).ok_or(outside),
            _ => Err(outside),
        }
    }

    /// The device reads bytes `offset .. offset + len` of `m`, `step` bytes at a time (0 is taken
    /// as 1), calling `between(cache, bytes done)` before each step and after the last: the
    /// moments at which a test lets the CPU side act.
    pub fn device_read(
        &mut self,
        m: &Mapping,
        offset: usize,
        len: usize,
        step: usize,
        between: &mut dyn FnMut(&mut Cache, usize),
    ) -> Result<Vec<u8>, ModelError> {
        let start = self.device_range(m, offset, len, false)?;
        let mut out = vec![0; len];
        let mut done = 0;
        while done < len {
            between(&mut self.cache, done);
            let n = step.max(1).min(len - done);
            self.device.read(self.cache.memory(), start + done, &mut out[done..done + n])?;
            done += n;
        }
        between(&mut self.cache, done);
        Ok(out)
    }

    /// The device writes `data` at byte `offset` of `m`, in steps as [`Harness::device_read`].
    pub fn device_write(
        &mut self,
        m: &Mapping,
        offset: usize,
        data: &[u8],
        step: usize,
        between: &mut dyn FnMut(&mut Cache, usize),
    ) -> Result<(), ModelError> {
        let start = self.device_range(m, offset, data.len(), true)?;
        let mut done = 0;
        while done < data.len() {
            between(&mut self.cache, done);
            let n = step.max(1).min(data.len() - done);
            self.device.write(self.cache.memory_mut(), start + done, &data[done..done + n])?;
            done += n;
        }
        between(&mut self.cache, done);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;
    use super::*;
    use proptest::prelude::*;

    const BASE: usize = 0x4000_0000;
    const LINE: usize = 64;

    /// Who last wrote a byte; each source gives every address a different value.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Src {
        /// What memory held at the start.
        Old,
        /// The CPU's first write.
        Cpu,
        /// The device's first write.
        Dev,
        /// Later writes (the CPU's second, or the device's second).
        Late,
    }

    fn pat(src: Src, addr: usize) -> u8 {
        // 13 is odd, so the address part takes every value; the sources differ by 61 modulo 256.
        (addr as u8).wrapping_mul(13).wrapping_add(61 * src as u8)
    }

    fn pats(src: Src, r: Range<usize>) -> Vec<u8> {
        r.map(|a| pat(src, a)).collect()
    }

    /// A harness over `len` bytes of `Old` data at `BASE`, with `lines` lines of `line` bytes.
    fn harness(len: usize, line: usize, lines: usize) -> Harness {
        let mem = Memory::new(BASE, len, |a| pat(Src::Old, a)).unwrap();
        Harness::new(Cache::new(mem, line, lines).unwrap())
    }

    fn cpu_bytes(h: &mut Harness, r: Range<usize>) -> Vec<u8> {
        let mut buf = vec![0; r.len()];
        h.cpu_read(r.start, &mut buf).unwrap();
        buf
    }

    fn mem_bytes(h: &Harness, r: Range<usize>) -> Vec<u8> {
        let mut buf = vec![0; r.len()];
        h.cache().memory().read(r.start, &mut buf).unwrap();
        buf
    }

    fn nothing(_: &mut Cache, _: usize) {}

    /// The source whose data `v` is at `addr`, for failure messages.
    fn source(addr: usize, v: u8) -> Option<Src> {
        [Src::Old, Src::Cpu, Src::Dev, Src::Late].into_iter().find(|&s| pat(s, addr) == v)
    }

    /// Fails with `why` unless `got`, the bytes of `r`, are all `src`'s data; the message names
    /// the first wrong byte and whose data it holds.
    #[track_caller]
    fn assert_from(got: &[u8], r: Range<usize>, src: Src, why: &str) {
        let wrong: Vec<usize> = r.clone().filter(|&a| got[a - r.start] != pat(src, a)).collect();
        if let Some(&a) = wrong.first() {
            panic!(
                "{why}: {} of the {} bytes from {:#x} are not {src:?} data; the first, {a:#x}, holds {:?} data",
                wrong.len(),
                r.len(),
                r.start,
                source(a, got[a - r.start])
            );
        }
    }

    /// Fails with `why` unless `got`, the bytes from `start`, are `want`.
    #[track_caller]
    fn assert_as_written(got: &[u8], want: &[u8], start: usize, why: &str) {
        let wrong: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
        if let Some(&i) = wrong.first() {
            panic!(
                "{why}: {} of the {} bytes from {start:#x} are wrong; the first, {:#x}, holds {:?} data \
                 instead of {:?} data",
                wrong.len(),
                want.len(),
                start + i,
                source(start + i, got[i]),
                source(start + i, want[i])
            );
        }
    }

    #[test]
    fn the_model_is_write_back_write_allocate_and_bounded() {
        let mut h = harness(0x400, LINE, 2);
        let c = h.cache_mut();
        c.cpu_write(BASE + 8, &[1, 2]).unwrap();
        // The store stays in the cache; the rest of its line was fetched (write-allocate).
        assert!(c.is_dirty(BASE));
        assert_eq!(mem_bytes(&h, BASE + 8..BASE + 10), pats(Src::Old, BASE + 8..BASE + 10));
        let c = h.cache_mut();
        let mut b = [0; 4];
        c.cpu_read(BASE + 6, &mut b).unwrap();
        assert_eq!(b, [pat(Src::Old, BASE + 6), pat(Src::Old, BASE + 7), 1, 2]);
        // Two more lines into a two-line cache: the dirty line, the oldest, is written back.
        c.cpu_read(BASE + LINE, &mut b).unwrap();
        c.cpu_read(BASE + 2 * LINE, &mut b).unwrap();
        assert!(!c.holds(BASE));
        assert_eq!(mem_bytes(&h, BASE + 8..BASE + 10), [1, 2]);
        assert_eq!(h.cache().stats(), Stats { fills: 3, evictions: 1, write_backs: 1 });
        // Maintenance takes effect at complete(), and an invalidate loses dirty data.
        let c = h.cache_mut();
        c.cpu_write(BASE + 2 * LINE, &[9]).unwrap();
        c.invalidate(BASE + 2 * LINE, LINE);
        assert!(c.is_dirty(BASE + 2 * LINE));
        assert_eq!(c.pending(), 1);
        c.complete();
        assert!(!c.holds(BASE + 2 * LINE));
        assert_eq!(mem_bytes(&h, BASE + 2 * LINE..BASE + 2 * LINE + 1), [pat(Src::Old, BASE + 2 * LINE)]);
        // Clean keeps the line, clean+invalidate drops it; both write back.
        let c = h.cache_mut();
        c.cpu_write(BASE + LINE, &[7]).unwrap();
        c.clean(BASE + LINE, LINE);
        c.complete();
        assert!(c.holds(BASE + LINE) && !c.is_dirty(BASE + LINE));
        c.cpu_write(BASE + LINE, &[8]).unwrap();
        c.clean_invalidate(BASE, 2 * LINE);
        c.complete();
        assert!(!c.holds(BASE + LINE));
        assert_eq!(mem_bytes(&h, BASE + LINE..BASE + LINE + 1), [8]);
    }

    #[test]
    fn the_model_refuses_bad_input() {
        let mem = || Memory::new(BASE, 0x400, |_| 0).unwrap();
        assert!(matches!(Cache::new(mem(), 48, 4), Err(ModelError::BadGeometry { line: 48, .. })));
        assert!(Cache::new(mem(), 64, 0).is_err());
        assert!(Cache::new(Memory::new(BASE + 8, 0x400, |_| 0).unwrap(), 64, 4).is_err());
        assert_eq!(Memory::new(usize::MAX, 2, |_| 0).err(), Some(ModelError::MemoryWraps { base: usize::MAX, len: 2 }));
        let mut h = harness(0x400, LINE, 4);
        let c = h.cache_mut();
        let mut b = [0; 2];
        assert_eq!(c.cpu_read(BASE + 0x3ff, &mut b), Err(ModelError::OutOfMemory { addr: BASE + 0x3ff, len: 2 }));
        assert_eq!(c.cpu_write(BASE - 1, &[0]), Err(ModelError::OutOfMemory { addr: BASE - 1, len: 1 }));
        assert_eq!(c.stats().fills, 0);
        assert_eq!(c.speculative_fill(&mut Rng::new(1), 0..BASE), None);
        c.clean(BASE + 8, LINE);
        c.invalidate(BASE, 0);
        assert_eq!(c.take_violation(), Some(ModelError::OpContract { op: Op::Clean, va: BASE + 8, len: LINE }));
        assert_eq!(
            format!("{}", ModelError::OpContract { op: Op::CleanInvalidate, va: 0x40, len: 0x10 }),
            "clean+invalidate of 0x40 + 0x10 breaks the CacheOps contract"
        );
        assert_eq!(h.map(BASE, 0, Direction::ToDevice), Err(ModelError::ZeroSize));
        assert!(h.map(BASE, 2, Direction::ToDevice).is_ok());
        assert_eq!(
            h.map(usize::MAX, 2, Direction::ToDevice),
            Err(ModelError::Maint(MaintError::Wraps { va: usize::MAX, len: 2 }))
        );
    }

    #[test]
    fn the_harness_enforces_ownership_and_direction() {
        let mut h = harness(0x400, LINE, 8);
        let buf = BASE + 0x100..BASE + 0x140;
        let m = h.map(buf.start, buf.len(), Direction::FromDevice).unwrap();
        let mut b = [0; 1];
        // A neighbour's byte is the CPU's; the buffer's are the device's.
        h.cpu_read(buf.start - 1, &mut b).unwrap();
        assert_eq!(
            h.cpu_write(buf.end - 1, &[0]),
            Err(ModelError::DeviceOwns { addr: buf.end - 1, len: 1, mapping: m })
        );
        assert_eq!(h.device_read(&m, 0, 4, 4, &mut nothing), Err(ModelError::WrongDirection { mapping: m }));
        assert_eq!(
            h.device_write(&m, 0x3f, &[0, 0], 4, &mut nothing),
            Err(ModelError::OutsideMapping { mapping: m, offset: 0x3f, len: 2 })
        );
        h.sync_for_cpu(&m).unwrap();
        h.cpu_read(buf.start, &mut b).unwrap();
        assert_eq!(h.device_write(&m, 0, &[0], 4, &mut nothing), Err(ModelError::CpuOwns { mapping: m }));
        h.sync_for_device(&m).unwrap();
        h.device_write(&m, 0, &[0], 4, &mut nothing).unwrap();
        h.unmap(m).unwrap();
        assert_eq!(h.unmap(m), Err(ModelError::NotMapped { mapping: m }));
        h.cpu_write(buf.start, &[1]).unwrap();
        assert_eq!(
            format!("{}", ModelError::DeviceOwns { addr: 0x1000, len: 4, mapping: m }),
            "CPU access to 0x1000 + 0x4 while the device owns from-device mapping 0x40000100 + 0x40"
        );
    }

    /// Case 1. The CPU's data sits dirty in the cache; the device reads memory. Only the clean in
    /// `for_device` puts the data where the device looks.
    #[test]
    fn to_device_sees_what_the_cpu_wrote() {
        let mut h = harness(0x1000, LINE, 16);
        let buf = BASE + 0x100..BASE + 0x200;
        h.cpu_write(buf.start, &pats(Src::Cpu, buf.clone())).unwrap();
        assert!(buf.clone().step_by(LINE).all(|a| h.cache().is_dirty(a)), "the test needs the data dirty");
        let m = h.map(buf.start, buf.len(), Direction::ToDevice).unwrap();
        let seen = h.device_read(&m, 0, buf.len(), 16, &mut nothing).unwrap();
        assert_from(&seen, buf.clone(), Src::Cpu, "the device read stale memory: no clean before the transfer");
        h.unmap(m).unwrap();
        assert_from(&cpu_bytes(&mut h, buf.clone()), buf, Src::Cpu, "after unmap");
    }

    /// Case 2. The CPU read the buffer before (its lines are valid in the cache); the device
    /// writes memory. Only the invalidate in `for_cpu` makes the CPU read memory again.
    #[test]
    fn from_device_the_cpu_sees_the_device_data_after_unmap() {
        let mut h = harness(0x1000, LINE, 16);
        let buf = BASE + 0x100..BASE + 0x200;
        assert_from(&cpu_bytes(&mut h, buf.clone()), buf.clone(), Src::Old, "before map");
        assert!(buf.clone().step_by(LINE).all(|a| h.cache().holds(a)), "the test needs the old lines cached");
        let m = h.map(buf.start, buf.len(), Direction::FromDevice).unwrap();
        h.device_write(&m, 0, &pats(Src::Dev, buf.clone()), 16, &mut nothing).unwrap();
        h.unmap(m).unwrap();
        assert_from(
            &cpu_bytes(&mut h, buf.clone()),
            buf,
            Src::Dev,
            "the CPU read stale lines: no invalidate after the transfer",
        );
    }

    /// The second reason `for_device` cleans a from-device buffer: a dirty line left in the cache
    /// is evicted after the device wrote its bytes, and the eviction overwrites them.
    #[test]
    fn from_device_a_dirty_line_evicted_mid_transfer_does_not_overwrite_the_device() {
        let mut h = harness(0x1000, LINE, 16);
        let buf = BASE + 0x100..BASE + 0x200;
        h.cpu_write(buf.start, &pats(Src::Cpu, buf.clone())).unwrap();
        let m = h.map(buf.start, buf.len(), Direction::FromDevice).unwrap();
        let mut rng = Rng::new(7);
        let len = buf.len();
        // One random eviction per step; at the end, everything still cached goes.
        h.device_write(&m, 0, &pats(Src::Dev, buf.clone()), 16, &mut |c, done| {
            c.evict_at_random(&mut rng);
            if done == len {
                while c.evict_at_random(&mut rng).is_some() {}
            }
        })
        .unwrap();
        assert_from(
            &mem_bytes(&h, buf.clone()),
            buf.clone(),
            Src::Dev,
            "an eviction during the transfer wrote the CPU's stale data over the device's: no clean at map",
        );
        h.unmap(m).unwrap();
        assert_from(&cpu_bytes(&mut h, buf.clone()), buf, Src::Dev, "after unmap");
    }

    /// Why `for_device` cleans rather than invalidates a from-device buffer: the device may write
    /// only part of it, and the CPU's data in the rest must survive; so must the data of the
    /// neighbours sharing its edge lines, written before the map.
    #[test]
    fn from_device_map_keeps_the_cpu_data_the_device_does_not_write() {
        let mut h = harness(0x1000, LINE, 16);
        // Edge lines 0x100 and 0x1c0 shared with neighbours 0x100..0x110 and 0x1f0..0x200.
        let buf = BASE + 0x110..BASE + 0x1f0;
        let around = BASE + 0x100..BASE + 0x200;
        h.cpu_write(around.start, &pats(Src::Cpu, around.clone())).unwrap();
        let m = h.map(buf.start, buf.len(), Direction::FromDevice).unwrap();
        // A short transfer: 0x50 bytes, ending inside the third line.
        let split = buf.start + 0x50;
        h.device_write(&m, 0, &pats(Src::Dev, buf.start..split), 16, &mut nothing).unwrap();
        h.unmap(m).unwrap();
        assert_from(&cpu_bytes(&mut h, buf.start..split), buf.start..split, Src::Dev, "the device's bytes");
        assert_from(
            &cpu_bytes(&mut h, split..buf.end),
            split..buf.end,
            Src::Cpu,
            "the CPU's data in bytes the device did not write was lost at map",
        );
        for n in [around.start..buf.start, buf.end..around.end] {
            let why = "a neighbour's data in a shared edge line was lost at map";
            assert_from(&cpu_bytes(&mut h, n.clone()), n, Src::Cpu, why);
        }
    }

    /// Case 3. A buffer whose first and last lines are shared with live CPU data, which the CPU
    /// writes during the transfer. The partial-line clean+invalidate in `for_cpu` keeps those
    /// writes; a plain invalidate would discard them. The documented price is shown too: the
    /// write-back also puts the cache's copy of the buffer's bytes in that line into memory.
    #[test]
    fn edge_lines_shared_with_live_data() {
        let mut h = harness(0x1000, LINE, 16);
        // Lines 0x100 (head: neighbour 0x100..0x110), 0x140, 0x180, 0x1c0 (tail: neighbour
        // 0x1f0..0x200).
        let buf = BASE + 0x110..BASE + 0x1f0;
        let head = BASE + 0x100..buf.start;
        let tail = buf.end..BASE + 0x200;
        let m = h.map(buf.start, buf.len(), Direction::FromDevice).unwrap();
        let len = buf.len();
        let (hd, tl) = (head.clone(), tail.clone());
        // The head neighbour is written before the device writes anything (its line is fetched
        // with the buffer's old bytes), the tail neighbour after the device finished (its line
        // is fetched with the device's bytes).
        h.device_write(&m, 0, &pats(Src::Dev, buf.clone()), 16, &mut |c, done| {
            if done == 0 {
                c.cpu_write(hd.start, &pats(Src::Late, hd.clone())).unwrap();
            }
            if done == len {
                c.cpu_write(tl.start, &pats(Src::Late, tl.clone())).unwrap();
            }
        })
        .unwrap();
        assert!(h.cache().is_dirty(head.start) && h.cache().is_dirty(tail.start));
        h.unmap(m).unwrap();
        assert_from(
            &cpu_bytes(&mut h, head.clone()),
            head,
            Src::Late,
            "the CPU's write to the head neighbour was discarded: edge line invalidated, not cleaned",
        );
        assert_from(
            &cpu_bytes(&mut h, tail.clone()),
            tail,
            Src::Late,
            "the CPU's write to the tail neighbour was discarded: edge line invalidated, not cleaned",
        );
        let whole = BASE + 0x140..BASE + 0x1c0;
        assert_from(&cpu_bytes(&mut h, whole.clone()), whole, Src::Dev, "the buffer's whole lines");
        // The limitation maint.rs documents: the buffer's bytes in a shared line are the cache's
        // copy. Fetched before the device wrote: the old bytes replaced the device's.
        let head_edge = buf.start..BASE + 0x140;
        assert_from(&cpu_bytes(&mut h, head_edge.clone()), head_edge, Src::Old, "head edge (limitation)");
        // Fetched after the device wrote: the device's bytes, by luck of timing.
        let tail_edge = BASE + 0x1c0..buf.end;
        assert_from(&cpu_bytes(&mut h, tail_edge.clone()), tail_edge, Src::Dev, "tail edge (limitation)");
    }

    /// Case 4. The CPU reads a buffer the device owns. Through the DMA API's rules the read is
    /// refused; done anyway (or by speculation, which no rule prevents) it brings stale lines into
    /// the cache in the middle of the transfer, after any maintenance at map could have removed
    /// them. Only the invalidate in `for_cpu`, after the transfer, gets rid of them.
    #[test]
    fn a_cpu_read_while_the_device_owns_the_buffer() {
        let mut h = harness(0x1000, LINE, 16);
        let buf = BASE + 0x100..BASE + 0x200;
        let m = h.map(buf.start, buf.len(), Direction::FromDevice).unwrap();
        let mut b = [0; 4];
        assert_eq!(h.cpu_read(buf.start, &mut b), Err(ModelError::DeviceOwns { addr: buf.start, len: 4, mapping: m }));
        assert!(buf.clone().step_by(LINE).all(|a| !h.cache().holds(a)), "nothing cached at map");
        let mut rng = Rng::new(3);
        let (r, half) = (buf.clone(), buf.len() / 2);
        let mut early = Vec::new();
        let mut stale_read = Vec::new();
        h.device_write(&m, 0, &pats(Src::Dev, buf.clone()), 16, &mut |c, done| {
            if done == 0 {
                // Speculation before the device wrote anything.
                for _ in 0..8 {
                    early.extend(c.speculative_fill(&mut rng, r.clone()));
                }
            }
            if done == half {
                // A buggy driver polls the last bytes before the device got there.
                let mut tail = vec![0; 16];
                c.cpu_read(r.end - 16, &mut tail).unwrap();
                stale_read = tail;
            }
        })
        .unwrap();
        assert!(!early.is_empty(), "the seed must speculate at least one line");
        assert_from(&stale_read, buf.end - 16..buf.end, Src::Old, "a read during the transfer sees stale data");
        h.unmap(m).unwrap();
        assert_from(
            &cpu_bytes(&mut h, buf.clone()),
            buf,
            Src::Dev,
            "lines fetched during the transfer were still cached: no invalidate after the transfer",
        );
    }

    const DIRS: [Direction; 3] = [Direction::ToDevice, Direction::FromDevice, Direction::Bidirectional];

    /// The CPU's meddling at each step of a transfer in a correct sequence: random evictions,
    /// speculative fills anywhere, loads of neighbours and (to-device only) stores to them. Stores
    /// to a line shared with a buffer the device writes are excluded: that is the documented
    /// limitation, not a correct sequence.
    fn meddle(c: &mut Cache, rng: &mut Rng, shadow: &mut [u8], buf: &Range<usize>, neighbours_writable: bool) {
        if rng.below(2) == 0 {
            c.evict_at_random(rng);
        }
        if rng.below(2) == 0 {
            c.speculative_fill(rng, BASE..BASE + shadow.len());
        }
        let below = rng.below(2) == 0;
        let addr =
            if below { BASE + rng.below(buf.start - BASE) } else { buf.end + rng.below(BASE + shadow.len() - buf.end) };
        let mut b = [0];
        c.cpu_read(addr, &mut b).unwrap();
        assert_as_written(&b, &shadow[addr - BASE..addr - BASE + 1], addr, "a neighbour's byte during the transfer");
        if neighbours_writable && rng.below(2) == 0 {
            let v = rng.next_u64() as u8;
            c.cpu_write(addr, &[v]).unwrap();
            shadow[addr - BASE] = v;
        }
    }

    /// One correct map / (sync for CPU / sync for device) / unmap cycle under random evictions,
    /// speculation and neighbour accesses; every byte must end up as the program wrote it.
    fn correct_cycle(seed: u64, shift: u32, lines: usize, off: usize, len: usize, dir: Direction, step: usize) {
        const MEM: usize = 0x400;
        let line = 1 << shift;
        let mut h = harness(MEM, line, lines);
        let mut rng = Rng::new(seed);
        let mut shadow = pats(Src::Old, BASE..BASE + MEM);
        let buf = BASE + 0x80 + off..BASE + 0x80 + off + len;
        let set = |shadow: &mut [u8], src: Src, r: Range<usize>| {
            for a in r {
                shadow[a - BASE] = pat(src, a);
            }
        };
        // Before mapping, the CPU writes the buffer and its neighbours: dirty lines everywhere.
        let around = buf.start - 0x40..buf.end + 0x40;
        h.cpu_write(around.start, &pats(Src::Cpu, around.clone())).unwrap();
        set(&mut shadow, Src::Cpu, around);
        for _ in 0..rng.below(4) {
            h.cache_mut().evict_at_random(&mut rng);
        }
        let m = h.map(buf.start, len, dir).unwrap();
        if dir != Direction::FromDevice {
            let seen = h.device_read(&m, 0, len, step, &mut |c, _| {
                meddle(c, &mut rng, &mut shadow, &buf, dir == Direction::ToDevice)
            });
            assert_as_written(&seen.unwrap(), &shadow[buf.start - BASE..buf.end - BASE], buf.start, "device read");
        }
        if dir == Direction::ToDevice {
            // The CPU takes the buffer back, rewrites it, and gives it to the device again.
            h.sync_for_cpu(&m).unwrap();
            let got = cpu_bytes(&mut h, buf.clone());
            assert_as_written(&got, &shadow[buf.start - BASE..buf.end - BASE], buf.start, "CPU read after sync");
            h.cpu_write(buf.start, &pats(Src::Late, buf.clone())).unwrap();
            set(&mut shadow, Src::Late, buf.clone());
            h.sync_for_device(&m).unwrap();
            let seen = h.device_read(&m, 0, len, step, &mut |c, _| meddle(c, &mut rng, &mut shadow, &buf, true));
            let want = &shadow[buf.start - BASE..buf.end - BASE];
            assert_as_written(&seen.unwrap(), want, buf.start, "device read after sync");
        } else {
            h.device_write(&m, 0, &pats(Src::Dev, buf.clone()), step, &mut |c, _| {
                meddle(c, &mut rng, &mut shadow, &buf, false)
            })
            .unwrap();
            set(&mut shadow, Src::Dev, buf.clone());
            // The CPU looks at the result, then the device writes part of the buffer again.
            h.sync_for_cpu(&m).unwrap();
            let got = cpu_bytes(&mut h, buf.clone());
            assert_as_written(&got, &shadow[buf.start - BASE..buf.end - BASE], buf.start, "CPU read after sync");
            h.sync_for_device(&m).unwrap();
            let a = rng.below(len);
            let b = a + rng.below(len - a) + 1;
            h.device_write(&m, a, &pats(Src::Late, buf.start + a..buf.start + b), step, &mut |c, _| {
                meddle(c, &mut rng, &mut shadow, &buf, false)
            })
            .unwrap();
            set(&mut shadow, Src::Late, buf.start + a..buf.start + b);
        }
        h.unmap(m).unwrap();
        assert_as_written(&cpu_bytes(&mut h, BASE..BASE + MEM), &shadow, BASE, "after unmap");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Random evictions and speculation at arbitrary moments never break a correct sequence.
        #[test]
        fn correct_sequences_survive_the_caches_whims(
            seed in any::<u64>(),
            shift in 4u32..8,
            lines in 1usize..10,
            off in 0usize..0x100,
            len in 1usize..0x200,
            d in 0usize..3,
            step in 1usize..24,
        ) {
            correct_cycle(seed, shift, lines, off, len, DIRS[d], step);
        }
    }
}
