//! The proxy's allocator: mimalloc, and when free memory goes back to the system.
//!
//! mimalloc keeps free blocks per thread and size class, so taking and giving back a block is a
//! few dozen instructions; glibc's malloc and free took about 350 per pair, a fifth of a
//! sleeping Lua request's instructions.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::time::Duration;

use libmimalloc_sys as mi;

#[global_allocator]
static ALLOCATOR: Mimalloc = Mimalloc;

/// mimalloc, asked for an alignment only when its blocks do not have it anyway.
///
/// Every block is aligned to a word, and a block whose size is a multiple of 16 to 16. Passing
/// every request's alignment to `mi_malloc_aligned` (as the `mimalloc` crate does) took its slow
/// path for any block over 1 KiB and for any block that was not already aligned: Lua asks for 16
/// bytes' alignment on every allocation, and a 24-byte block is aligned to 8. That path
/// over-allocates, and cost 246 instructions a call, ten calls per sleeping request.
struct Mimalloc;

/// What every mimalloc block is aligned to.
const WORD: usize = std::mem::size_of::<usize>();

/// What a block whose size is a multiple of it is aligned to (`MI_MAX_ALIGN_SIZE`).
const MAX_ALIGN: usize = 16;

// SAFETY: every block comes from mimalloc and goes back to it; a block is returned only when it
// has the layout's alignment (checked, for the alignments mimalloc's blocks have by their size).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain calls into the allocator.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain calls into the allocator.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` was allocated by mimalloc (the caller's contract).
        unsafe { mi::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        if align <= WORD {
            // SAFETY: `ptr` is mimalloc's (the caller's contract); any block has this alignment.
            return unsafe { mi::mi_realloc(ptr.cast(), new_size) }.cast();
        }
        if align > MAX_ALIGN {
            // SAFETY: as above, with the alignment asked of mimalloc.
            return unsafe { mi::mi_realloc_aligned(ptr.cast(), new_size, align) }.cast();
        }
        // As `mi_realloc` does: in place while the block fits and wastes under half.
        // SAFETY: `ptr` is a live mimalloc block.
        let usable = unsafe { mi::mi_usable_size(ptr.cast()) };
        if new_size <= usable && new_size >= usable / 2 {
            return ptr;
        }
        // SAFETY: `new_size` with `align` is a valid layout (the caller's contract).
        let moved = unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, align)) };
        if !moved.is_null() {
            // SAFETY: both blocks are live and hold at least the bytes copied; they are distinct.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                mi::mi_free(ptr.cast());
            }
        }
        moved
    }
}

/// A block for `layout` from `plain` (mimalloc's own alignment) when that is enough, from
/// `aligned` otherwise.
#[allow(unsafe_code)]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    if align <= WORD {
        // SAFETY: a plain call into the allocator.
        return unsafe { plain(size) }.cast();
    }
    if align <= MAX_ALIGN {
        // SAFETY: a plain call into the allocator.
        let block = unsafe { plain(size.next_multiple_of(MAX_ALIGN)) };
        if block.addr() % align == 0 {
            return block.cast();
        }
        // Not expected (see `MAX_ALIGN`), but then the aligned way.
        // SAFETY: `block` is the live block just allocated.
        unsafe { mi::mi_free(block) };
    }
    // SAFETY: a plain call into the allocator.
    unsafe { aligned(size, align) }.cast()
}

/// `mi_option_purge_delay` in `mimalloc.h` (the same in its versions 2 and 3); the bindings do
/// not name it.
const PURGE_DELAY: mi::mi_option_t = 15;

/// How often, at most, the allocator returns free memory to the system on its own while a
/// worker never goes quiet (the upkeep returns it once the worker is, `upkeep::TRIM_AFTER`).
///
/// mimalloc's delay is not per block: the first free after a purge sets a deadline, and at that
/// deadline everything free is returned, also what was freed a moment ago. With its default of
/// one second, and with the ten seconds this replaced, the next burst faulted its pages in
/// again: 22,000 page faults in the second of two bursts of 10,000 sleeping HTTP/2 requests a
/// second apart, 3,500 now.
const PURGE_EVERY: Duration = Duration::from_secs(300);

/// Sets the allocator's purge delay ([`PURGE_EVERY`]) and returns what is free now: a deadline
/// set before, under mimalloc's default, would otherwise still come due in the first burst.
#[allow(unsafe_code)]
pub(crate) fn configure() {
    let delay = std::ffi::c_long::try_from(PURGE_EVERY.as_millis()).unwrap_or(std::ffi::c_long::MAX);
    // SAFETY: mimalloc's options may be set from any thread at any time; the value is a plain
    // number of milliseconds.
    unsafe { mi::mi_option_set(PURGE_DELAY, delay) };
    release_free_memory();
}

/// Returns the calling thread's free memory, and the freed memory waiting in the shared arenas,
/// to the system now. A worker calls it for itself: each thread's heap is its own.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: mi_collect has no preconditions; it works on the calling thread's heap and takes
    // the arenas' locks for the shared part.
    unsafe { mi::mi_collect(true) };
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::*;

    /// What `MAX_ALIGN` relies on: mimalloc's blocks of a multiple of 16 bytes are aligned to 16,
    /// whatever the size class and wherever in its page (else every such request would take
    /// the aligned way, correct but slow).
    #[test]
    #[allow(unsafe_code)]
    fn blocks_of_a_multiple_of_16_bytes_are_aligned_to_16() {
        for size in (16..=70_000).step_by(16) {
            // Several at once, so that they sit at different places in their page.
            // SAFETY: plain allocations, freed below.
            let blocks: Vec<_> = (0..8).map(|_| unsafe { mi::mi_malloc(size) }).collect();
            for block in blocks {
                assert_eq!(block.addr() % 16, 0, "a block of {size} bytes");
                // SAFETY: each block was allocated above and is freed once.
                unsafe { mi::mi_free(block) };
            }
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn every_alignment_is_honoured_through_growth_and_shrinking() {
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 8, 15, 16, 24, 40, 100, 1000, 1025, 1500, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: a live block of `layout`, filled, resized along its layouts, freed.
                unsafe {
                    let mut block = ALLOCATOR.alloc_zeroed(layout);
                    assert_eq!(block.addr() % align, 0, "{size} bytes aligned to {align}");
                    assert!((0..size).all(|i| *block.add(i) == 0));
                    block.write_bytes(0xa5, size);
                    let mut current = layout;
                    for new_size in [size * 3, size + 1, size.div_ceil(2).max(1), size * 40] {
                        block = ALLOCATOR.realloc(block, current, new_size);
                        assert_eq!(block.addr() % align, 0, "{size} -> {new_size} bytes aligned to {align}");
                        let kept = current.size().min(new_size).min(size);
                        assert!((0..kept).all(|i| *block.add(i) == 0xa5), "{size} -> {new_size}");
                        block.add(kept).write_bytes(0xa5, new_size - kept);
                        current = Layout::from_size_align(new_size, align).expect("layout");
                    }
                    ALLOCATOR.dealloc(block, current);
                }
            }
        }
    }
}
