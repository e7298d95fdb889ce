//! I/O buffers that own (or keep alive) their memory for as long as an operation is in flight.
//!
//! An [`IoBuf`] is a list of memory segments plus an owner that keeps the memory valid: either an
//! aligned allocation of our own, or an `Arc` of something external (a VMM's guest memory
//! mapping). A request moves its `IoBuf` into the queue and gets it back in the completion, so no
//! raw pointer outlives the memory it points into — the kernel may write into a buffer only while
//! the queue holds it.
//!
//! Formats split one request over several extents with [`IoBuf::view`]: a view keeps its parent
//! alive through an `Arc` and covers a sub-range of it. Views alias their parent's memory, so
//! making one is `unsafe`: the caller keeps views that are written (reads in flight) apart from
//! every other view and from the parent (see its `# Safety`). All of this crate's raw-pointer
//! handling of I/O memory lives in this file and in the engines.
//!
//! Memory from outside ([`IoBuf::from_raw_segments`]: a guest's memory, which its vCPUs may write
//! at any moment) is *external*: the buffer's own copies in and out of it, and its zero checks,
//! use volatile accesses ([`super::volatile`]) and never form a `&[u8]` over it.

use std::alloc::{self, Layout};
use std::any::Any;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of buffers that [`IoBuf::new`] allocates: enough for O_DIRECT on any device.
pub const BUF_ALIGN: usize = 4096;

/// One contiguous piece of an [`IoBuf`]: a start address and a length.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    ptr: *mut u8,
    len: usize,
}

impl Segment {
    /// A segment over `len` bytes at `ptr`; the creator keeps the memory valid while it is used.
    pub(crate) fn from_raw(ptr: *mut u8, len: usize) -> Segment {
        Segment { ptr, len }
    }

    /// Start address of the segment.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length of the segment in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segment as a `libc::iovec`, for vectored system calls.
    pub fn as_iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len,
        }
    }
}

enum Owner {
    /// Nothing to keep alive: an empty buffer.
    Empty,
    /// Memory this buffer allocated itself, freed on drop.
    Aligned { ptr: NonNull<u8>, layout: Layout },
    /// External memory kept alive by an `Arc` (guest memory, or a parent buffer for a view).
    Shared(#[allow(dead_code)] Arc<dyn Any + Send + Sync>),
}

/// Memory an I/O operation reads into or writes from. See the module documentation.
pub struct IoBuf {
    segments: Segments,
    len: usize,
    owner: Owner,
    /// The memory may change under us (guest memory): accessed only with volatile copies.
    external: bool,
}

enum Segments {
    One(Segment),
    Many(Box<[Segment]>),
}

impl Segments {
    fn as_slice(&self) -> &[Segment] {
        match self {
            Segments::One(s) => std::slice::from_ref(s),
            Segments::Many(v) => v,
        }
    }
}

// SAFETY: an IoBuf is the sole owner of its aligned allocation, or holds an `Arc` that keeps
// external memory alive; the raw pointers are only dereferenced through `&mut self` (writes) or
// `&self` (reads), or by the kernel while the buffer is held by an I/O queue, so moving the buffer
// between threads is sound.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reading the memory (`copy_to_slice`, `as_slice`); all
// writes require `&mut self` or exclusive ownership by an I/O queue.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Allocates a zero-filled buffer of `len` bytes aligned to [`BUF_ALIGN`].
    pub fn new(len: usize) -> IoBuf {
        if len == 0 {
            return IoBuf::empty();
        }
        let layout = match Layout::from_size_align(len, BUF_ALIGN) {
            Ok(l) => l,
            Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: the layout has a non-zero size (len > 0 checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf {
            segments: Segments::One(Segment {
                ptr: ptr.as_ptr(),
                len,
            }),
            len,
            owner: Owner::Aligned { ptr, layout },
            external: false,
        }
    }

    /// An aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut buf = IoBuf::new(data.len());
        buf.copy_from_slice(0, data);
        buf
    }

    /// A buffer of length zero.
    pub fn empty() -> IoBuf {
        IoBuf {
            segments: Segments::Many(Box::new([])),
            len: 0,
            owner: Owner::Empty,
            external: false,
        }
    }

    /// A buffer over external memory, such as a VMM's guest memory, which another party may
    /// change at any moment: the buffer's own accesses to it are volatile copies.
    ///
    /// # Safety
    /// Each `(ptr, len)` segment must be valid for reads and writes for as long as `keep_alive`
    /// is alive, and no Rust reference to that memory may be used while the buffer is in flight
    /// in an I/O queue (the kernel writes into it). Segments must not overlap.
    pub unsafe fn from_raw_segments(
        segments: &[(*mut u8, usize)],
        keep_alive: Arc<dyn Any + Send + Sync>,
    ) -> IoBuf {
        let segs: Box<[Segment]> = segments
            .iter()
            .map(|&(ptr, len)| Segment { ptr, len })
            .collect();
        let len = segs.iter().map(|s| s.len).sum();
        IoBuf {
            segments: if segs.len() == 1 {
                Segments::One(segs[0])
            } else {
                Segments::Many(segs)
            },
            len,
            owner: Owner::Shared(keep_alive),
            external: true,
        }
    }

    /// A buffer covering `len` bytes at `offset` of `parent` (less if the parent is shorter),
    /// keeping the parent alive. Formats use views to split one request over several extents.
    ///
    /// # Safety
    /// A view aliases its parent's memory, and a view moved into an I/O queue for a read is
    /// written by the kernel (or an engine thread) while the caller goes on. So for as long as
    /// a view can be written — in flight for a read, or used with `copy_from_slice` or
    /// `fill_zero` — no other view of an overlapping range, and not the parent, may be read or
    /// written. Views that are only read (in flight for writes) may overlap each other and be
    /// read alongside the parent. The parent is in an `Arc`; whoever unwraps it does so after
    /// every view was dropped (completions reaped), or `Arc::try_unwrap` says it cannot.
    pub(crate) unsafe fn view(parent: &Arc<IoBuf>, offset: usize, len: usize) -> IoBuf {
        debug_assert!(offset + len <= parent.len);
        let mut segs = Vec::new();
        let mut skip = offset;
        let mut want = len;
        for seg in parent.segments() {
            if want == 0 {
                break;
            }
            if skip >= seg.len {
                skip -= seg.len;
                continue;
            }
            let take = (seg.len - skip).min(want);
            // The pointer arithmetic stays inside the parent's segment (skip < seg.len).
            segs.push(Segment {
                ptr: seg.ptr.wrapping_add(skip),
                len: take,
            });
            want -= take;
            skip = 0;
        }
        let keep: Arc<dyn Any + Send + Sync> = parent.clone();
        IoBuf {
            segments: if segs.len() == 1 {
                Segments::One(segs[0])
            } else {
                Segments::Many(segs.into_boxed_slice())
            },
            len: len - want,
            owner: Owner::Shared(keep),
            external: parent.external,
        }
    }

    /// One buffer over the segments of `parts` in order, keeping every part alive.
    ///
    /// Formats use it to write a cluster in one request from pieces: data copied in from elsewhere
    /// around a view of the caller's buffer. The parts are only reachable through the chain until
    /// it is dropped.
    pub(crate) fn chain(parts: Vec<IoBuf>) -> IoBuf {
        let segs: Vec<Segment> = parts
            .iter()
            .flat_map(|p| p.segments().iter().copied())
            .filter(|s| s.len > 0)
            .collect();
        let len = segs.iter().map(|s| s.len).sum();
        let external = parts.iter().any(|p| p.external);
        let keep: Arc<dyn Any + Send + Sync> = Arc::new(parts);
        IoBuf {
            segments: if segs.len() == 1 {
                Segments::One(segs[0])
            } else {
                Segments::Many(segs.into_boxed_slice())
            },
            len,
            owner: Owner::Shared(keep),
            external,
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory segments, in order.
    pub fn segments(&self) -> &[Segment] {
        self.segments.as_slice()
    }

    /// Whether every segment's address and length are multiples of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        self.segments()
            .iter()
            .all(|s| (s.ptr as usize) % align == 0 && s.len % align == 0)
    }

    /// The contents as one slice, when the buffer is a single allocation of its own.
    pub fn as_slice(&self) -> Option<&[u8]> {
        match (&self.owner, &self.segments) {
            (Owner::Aligned { .. }, Segments::One(s)) => {
                // SAFETY: the buffer owns this allocation of `s.len` bytes; `&self` guarantees no
                // concurrent writer (writes need `&mut self` or queue ownership).
                Some(unsafe { std::slice::from_raw_parts(s.ptr, s.len) })
            }
            (Owner::Empty, _) => Some(&[]),
            _ => None,
        }
    }

    /// The contents as one mutable slice, when the buffer is a single allocation of its own.
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        match (&self.owner, &self.segments) {
            (Owner::Aligned { .. }, Segments::One(s)) => {
                // SAFETY: the buffer owns this allocation and `&mut self` makes the access unique.
                Some(unsafe { std::slice::from_raw_parts_mut(s.ptr, s.len) })
            }
            (Owner::Empty, _) => Some(&mut []),
            _ => None,
        }
    }

    /// Whether the memory is external (see the module documentation).
    pub fn is_external(&self) -> bool {
        self.external
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the buffer.
    ///
    /// Panics if the range exceeds the buffer: callers size `dst` from the buffer itself.
    pub fn copy_to_slice(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.len, "copy beyond IoBuf");
        let external = self.external;
        self.walk(offset, dst.len(), |seg_ptr, pos, n| {
            // SAFETY: `walk` yields in-bounds sub-ranges of valid segments; `dst` is a distinct
            // Rust allocation, so the ranges cannot overlap. External memory is read with
            // volatile copies.
            unsafe {
                if external {
                    super::volatile::read_into(seg_ptr, dst.as_mut_ptr().add(pos), n);
                } else {
                    std::ptr::copy_nonoverlapping(seg_ptr, dst.as_mut_ptr().add(pos), n);
                }
            }
        });
    }

    /// Copies `src` into the buffer starting at `offset`.
    pub fn copy_from_slice(&mut self, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.len, "copy beyond IoBuf");
        let external = self.external;
        self.walk(offset, src.len(), |seg_ptr, pos, n| {
            // SAFETY: as in `copy_to_slice`, with `&mut self` giving exclusive access.
            unsafe {
                if external {
                    super::volatile::write_from(src.as_ptr().add(pos), seg_ptr, n);
                } else {
                    std::ptr::copy_nonoverlapping(src.as_ptr().add(pos), seg_ptr, n);
                }
            }
        });
    }

    /// Fills `len` bytes at `offset` with zeros.
    pub fn fill_zero(&mut self, offset: usize, len: usize) {
        assert!(offset + len <= self.len, "fill beyond IoBuf");
        let external = self.external;
        self.walk(offset, len, |seg_ptr, _pos, n| {
            // SAFETY: `walk` yields in-bounds sub-ranges of valid segments; `&mut self` is
            // exclusive.
            unsafe {
                if external {
                    super::volatile::fill_zero(seg_ptr, n);
                } else {
                    std::ptr::write_bytes(seg_ptr, 0, n);
                }
            }
        });
    }

    /// Whether every byte in `offset..offset+len` is zero (for external memory: was zero when
    /// read).
    pub fn is_zero_range(&self, offset: usize, len: usize) -> bool {
        let mut all_zero = true;
        let external = self.external;
        self.walk(offset, len, |seg_ptr, _pos, n| {
            if !all_zero {
                return;
            }
            all_zero = if external {
                // SAFETY: in-bounds range of a valid segment; read with volatile accesses, no
                // reference to memory the guest may be changing.
                unsafe { super::volatile::is_zero(seg_ptr, n) }
            } else {
                // SAFETY: in-bounds range of a valid segment of our own, read-only under
                // `&self`.
                crate::util::is_zero(unsafe { std::slice::from_raw_parts(seg_ptr, n) })
            };
        });
        all_zero
    }

    /// The contents as a `Vec<u8>`.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to_slice(0, &mut v);
        v
    }

    /// Calls `f(segment_pointer, position_in_range, length)` for each piece of `offset..offset+len`.
    fn walk(&self, offset: usize, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
        let mut skip = offset;
        let mut pos = 0;
        for seg in self.segments() {
            if pos == len {
                break;
            }
            if skip >= seg.len {
                skip -= seg.len;
                continue;
            }
            let n = (seg.len - skip).min(len - pos);
            f(seg.ptr.wrapping_add(skip), pos, n);
            pos += n;
            skip = 0;
        }
    }
}

/// Whether the `(position, length)` ranges are in order, disjoint and inside `0..len`: what makes
/// views cut for them (one each, of a buffer of `len` bytes) alias nothing but their own range.
pub(crate) fn in_order_and_disjoint(
    ranges: impl IntoIterator<Item = (u64, u64)>,
    len: u64,
) -> bool {
    let mut end = 0u64;
    ranges.into_iter().all(|(pos, n)| {
        let ok = pos >= end && pos.checked_add(n).is_some_and(|e| e <= len);
        end = pos.saturating_add(n);
        ok
    })
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Owner::Aligned { ptr, layout } = self.owner {
            // SAFETY: `ptr` was returned by `alloc_zeroed(layout)` in `IoBuf::new` and is freed once.
            unsafe { alloc::dealloc(ptr.as_ptr(), layout) };
        }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("segments", &self.segments().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_buffer_is_aligned_and_zeroed() {
        let b = IoBuf::new(8192);
        assert!(b.is_aligned(BUF_ALIGN));
        assert!(b.as_slice().unwrap().iter().all(|&x| x == 0));
    }

    #[test]
    fn views_cover_sub_ranges_of_the_parent() {
        let mut parent = IoBuf::new(16);
        parent.copy_from_slice(0, &(0u8..16).collect::<Vec<_>>());
        let parent = Arc::new(parent);
        // SAFETY: the two views do not overlap, and the parent is not touched until both are
        // dropped.
        let (v, mut w) = unsafe { (IoBuf::view(&parent, 4, 8), IoBuf::view(&parent, 12, 4)) };
        assert_eq!(v.len(), 8);
        assert_eq!(v.to_vec(), (4u8..12).collect::<Vec<_>>());
        w.fill_zero(0, 4);
        drop((v, w));
        let parent = Arc::try_unwrap(parent).unwrap();
        assert_eq!(&parent.to_vec()[12..], &[0, 0, 0, 0]);
    }

    #[test]
    fn chains_concatenate_their_parts() {
        let a = IoBuf::from_slice(&[1, 2]);
        let b = IoBuf::from_slice(&[3]);
        let c = IoBuf::chain(vec![a, IoBuf::empty(), b]);
        assert_eq!(c.len(), 3);
        assert_eq!(c.segments().len(), 2);
        assert_eq!(c.to_vec(), vec![1, 2, 3]);
    }

    #[test]
    fn multi_segment_copy_crosses_segments() {
        let backing = Arc::new(std::sync::Mutex::new(vec![0u8; 10]));
        let base = backing.lock().unwrap().as_mut_ptr();
        // SAFETY: both segments lie inside the vector kept alive by `backing`; the test holds no
        // reference to the vector while the buffer is used.
        let mut b = unsafe {
            IoBuf::from_raw_segments(&[(base, 3), (base.wrapping_add(5), 5)], backing.clone())
        };
        assert!(b.is_external());
        b.copy_from_slice(1, &[1, 2, 3, 4]);
        let mut out = [0u8; 8];
        b.copy_to_slice(0, &mut out);
        assert_eq!(out, [0, 1, 2, 3, 4, 0, 0, 0]);
        assert!(!b.is_zero_range(0, 8) && b.is_zero_range(5, 3));
        // SAFETY: the view is the only buffer used until it is dropped.
        let mut v = unsafe { IoBuf::view(&Arc::new(b), 6, 2) };
        assert!(v.is_external(), "a view of external memory is external");
        v.fill_zero(0, 2);
        drop(v);
        assert_eq!(*backing.lock().unwrap(), vec![0, 1, 2, 0, 0, 3, 4, 0, 0, 0]);
    }
}
