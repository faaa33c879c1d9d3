//! The kernel heap: `linked_list_allocator` over memory that the boot memory map hands out early,
//! behind a spin lock. It serves `alloc` (Vec, Box, String) for kernel bookkeeping; DMA buffers never
//! come from here.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use linked_list_allocator::Heap;
use spin::Mutex;

pub struct KernelHeap(Mutex<Heap>);

#[global_allocator]
static HEAP: KernelHeap = KernelHeap(Mutex::new(Heap::empty()));

/// Give the heap its memory.
///
/// # Safety
/// `[start, start+size)` must be mapped, writable, unused by anything else for the rest of the
/// kernel's life, and this must be called once.
pub unsafe fn init(start: usize, size: usize) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { HEAP.0.lock().init(start as *mut u8, size) };
}

/// (used, free) bytes.
pub fn usage() -> (usize, usize) {
    let h = HEAP.0.lock();
    (h.used(), h.free())
}

// SAFETY: allocation and deallocation go through the locked `Heap`, which returns blocks that
// satisfy the layout and never overlap; `dealloc` receives only pointers `alloc` returned.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0.lock().allocate_first_fit(layout).map_or(core::ptr::null_mut(), |p| p.as_ptr())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: the GlobalAlloc contract: `ptr` came from `alloc` with this layout.
            unsafe { self.0.lock().deallocate(p, layout) };
        }
    }
}
