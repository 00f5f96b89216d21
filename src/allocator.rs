//! The process's allocator: the C library's `malloc`, with over-aligned
//! blocks carved out of a plain `malloc` instead of `posix_memalign`.
//!
//! Every proxied connection allocates three blocks aligned to 128 bytes:
//! its task (tokio aligns task cells to a cache-line pair) and the two
//! sockets' I/O registrations (`ScheduledIo`, likewise). glibc serves
//! those with `_int_memalign`, which takes an oversized chunk, splits off
//! the misaligned head and the tail and frees both, and its `free` merges
//! them back: 600 to 1,200 instructions a block where a plain `malloc`
//! takes about 100 (callgrind, `benches/README.md`). Here an over-aligned
//! block is `malloc(size + align)`, rounded up to the alignment, with the
//! address `malloc` gave stored in the word just below the block for
//! `free`. It costs `align` bytes a block. Blocks aligned to 16 bytes or
//! less (glibc's own guarantee: nearly all of them) go to `malloc` as
//! before, through [`System`].

// An allocator is unsafe by contract: every block below says what it upholds.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// The alignment every `malloc` block has (glibc's `MALLOC_ALIGNMENT` on
/// 64-bit targets); a larger one takes the carving path.
const MALLOC_ALIGN: usize = 16;

/// The global allocator of the binary (`#[global_allocator]` in
/// `main.rs`): [`System`], except for over-aligned blocks (module doc).
#[derive(Debug, Default, Clone, Copy)]
pub struct Allocator;

impl Allocator {
    /// Whether `layout` takes the carving path.
    fn carves(layout: Layout) -> bool {
        layout.align() > MALLOC_ALIGN
    }

    /// Aligns the block `raw` (from `malloc` or `calloc`, of `size + align`
    /// bytes) and records `raw` below the aligned address.
    ///
    /// # Safety
    /// `raw` is null or a block of at least `layout.size() + layout.align()`
    /// bytes, aligned to [`MALLOC_ALIGN`].
    unsafe fn carve(raw: *mut u8, layout: Layout) -> *mut u8 {
        if raw.is_null() {
            return raw;
        }
        // The next multiple of `align` strictly above `raw`: both are
        // multiples of 16, so there are at least 16 bytes below it, and
        // at most `align`, so `size` bytes fit after it.
        let offset = layout.align() - (raw as usize & (layout.align() - 1));
        // SAFETY: `offset` ≤ align, inside the block (above).
        let aligned = unsafe { raw.add(offset) };
        // SAFETY: the word below `aligned` is inside the block (offset ≥
        // 16) and aligned to 8 (aligned is a multiple of 32).
        unsafe { aligned.cast::<*mut u8>().sub(1).write(raw) };
        aligned
    }

    /// The block `malloc` gave for a carved `ptr`.
    ///
    /// # Safety
    /// `ptr` was returned by [`Self::carve`].
    unsafe fn raw(ptr: *mut u8) -> *mut u8 {
        // SAFETY: `carve` wrote it there.
        unsafe { ptr.cast::<*mut u8>().sub(1).read() }
    }
}

// SAFETY: every block comes from the C allocator with the layout's size
// and alignment (module doc); each path frees what its own alloc made.
//
// Each entry point stays out of line, as the default allocator's are (std
// is not part of our LTO): inlined, its branch grew every drop of a
// `Box<dyn Error>`, and `io::Error`'s drop stopped being inlined into the
// movers (+100 instructions a keep-alive request, callgrind).
unsafe impl GlobalAlloc for Allocator {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::carves(layout) {
            // SAFETY: the caller's contract, passed on.
            unsafe { alloc_carved(layout, false) }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc(layout) }
        }
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::carves(layout) {
            // SAFETY: the caller's contract, passed on.
            unsafe { alloc_carved(layout, true) }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if Self::carves(layout) {
            // SAFETY: allocated by `alloc`/`alloc_zeroed` with this layout.
            unsafe { dealloc_carved(ptr) }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if Self::carves(layout) {
            // SAFETY: the caller's contract, passed on.
            unsafe { realloc_carved(ptr, layout, new_size) }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

/// An over-aligned block: `malloc` (or `calloc`) of `size + align`, carved.
///
/// # Safety
/// `layout` has a non-zero size and an alignment above [`MALLOC_ALIGN`].
#[inline]
unsafe fn alloc_carved(layout: Layout, zeroed: bool) -> *mut u8 {
    let Some(total) = layout.size().checked_add(layout.align()) else {
        return std::ptr::null_mut();
    };
    // SAFETY: plain malloc/calloc; `carve` checks for null.
    unsafe {
        let raw = if zeroed {
            libc::calloc(total, 1)
        } else {
            libc::malloc(total)
        };
        Allocator::carve(raw.cast(), layout)
    }
}

/// Frees a block from [`alloc_carved`].
///
/// # Safety
/// `ptr` came from [`alloc_carved`] and is not used again.
#[inline]
unsafe fn dealloc_carved(ptr: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { libc::free(Allocator::raw(ptr).cast()) }
}

/// Moves a block from [`alloc_carved`] to a new one of `new_size` bytes,
/// aligned alike.
///
/// # Safety
/// `ptr` came from [`alloc_carved`] with `layout`; `new_size` with its
/// alignment is a valid layout.
#[inline]
unsafe fn realloc_carved(ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    // SAFETY: the caller's contract: a valid layout.
    let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
    // SAFETY: both blocks are valid for the smaller of the two sizes.
    unsafe {
        let new = alloc_carved(new_layout, false);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            dealloc_carved(ptr);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every alignment from 1 to a page, at sizes around it: the block is
    /// aligned, writable to its last byte, zeroed when asked, keeps its
    /// bytes through a realloc, and frees.
    #[test]
    fn blocks_are_aligned_writable_and_freed() {
        let a = Allocator;
        for align in [1, 2, 8, 16, 32, 64, 128, 256, 4096] {
            for size in [1, 7, 16, 100, 128, 2_304, 10_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "align {align} size {size}");
                    std::ptr::write_bytes(p, 0xa5, size);
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "realloc keeps align {align}");
                    assert!(
                        (0..size).all(|i| *grown.add(i) == 0xa5),
                        "realloc kept the bytes"
                    );
                    std::ptr::write_bytes(grown, 0x5a, size * 3);
                    a.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());

                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0), "zeroed");
                    a.dealloc(z, layout);
                }
            }
        }
    }

    /// A size that cannot take the alignment on top fails cleanly.
    #[test]
    fn an_impossible_size_is_null() {
        let layout = Layout::from_size_align(isize::MAX as usize - 255, 128).unwrap();
        assert!(unsafe { Allocator.alloc(layout) }.is_null());
    }
}
