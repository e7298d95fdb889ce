//! Fan-in: a request split into pieces completes when its last piece does, with the first
//! error any piece had, and hands its buffer back to the consumer.
//!
//! A request is opened with one hold of its own (so that it cannot complete while it is still
//! being split); each piece adds one and every finished piece, and finally the end of the
//! splitting, drops one. The buffer travels whole when the request goes down as one piece
//! ([`Fanin::lend`]: no allocation on the common path) and comes back with that piece's
//! completion; a request spanning several extents shares it instead, each piece carrying an
//! [`IoBuf::view`] of it ([`Fanin::view`]).

use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::io::{Completion, IoBuf};

use super::slab::Slab;

/// A request in flight, by the number [`super::Stack::open`] gave it.
pub type ReqId = usize;

#[derive(Debug)]
enum Held {
    /// The request has no buffer.
    None,
    /// The buffer is here.
    Owned(IoBuf),
    /// One piece carries the whole buffer; its completion brings it back.
    Lent,
    /// Pieces carry views of it.
    Shared(Arc<IoBuf>),
}

#[derive(Debug)]
struct Parent {
    tag: u64,
    holds: u32,
    result: Result<u64>,
    buf: Held,
}

/// Requests in flight. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Fanin {
    slab: Slab<Parent>,
}

impl Fanin {
    /// Opens a request that succeeds with `len`, holding it open until [`Fanin::release`].
    pub(crate) fn open(&mut self, tag: u64, buf: Option<IoBuf>, len: u64) -> ReqId {
        self.slab.insert(Parent {
            tag,
            holds: 1,
            result: Ok(len),
            buf: buf.map_or(Held::None, Held::Owned),
        })
    }

    /// Requests in flight.
    pub(crate) fn len(&self) -> usize {
        self.slab.len()
    }

    /// One more piece of request `id` is outstanding.
    pub(crate) fn hold(&mut self, id: ReqId) {
        if let Some(p) = self.slab.get_mut(id) {
            p.holds += 1;
        }
    }

    /// The whole buffer of request `id`, for its only piece; it comes back with that piece's
    /// [`Fanin::release`]. `None` if the buffer was already shared or lent.
    pub(crate) fn lend(&mut self, id: ReqId) -> Option<IoBuf> {
        let p = self.slab.get_mut(id)?;
        match std::mem::replace(&mut p.buf, Held::Lent) {
            Held::Owned(b) => Some(b),
            other => {
                p.buf = other;
                None
            }
        }
    }

    /// A view of `len` bytes at `offset` of request `id`'s buffer (which becomes shared).
    ///
    /// # Safety
    /// The contract of [`IoBuf::view`]: while this view can be written (a read's piece, or
    /// filled here), no other live view of request `id` may overlap it. The shared buffer is
    /// only unwrapped by [`Fanin::release`] once every piece came back.
    pub(crate) unsafe fn view(&mut self, id: ReqId, offset: usize, len: usize) -> Option<IoBuf> {
        let p = self.slab.get_mut(id)?;
        if let Held::Owned(_) = p.buf {
            if let Held::Owned(b) = std::mem::replace(&mut p.buf, Held::None) {
                p.buf = Held::Shared(Arc::new(b));
            }
        }
        match &p.buf {
            Held::Shared(s) if offset.checked_add(len).is_some_and(|e| e <= s.len()) => {
                // SAFETY: the caller keeps writable views of this request disjoint (this
                // function's contract); the buffer is unwrapped only after every hold is released.
                Some(unsafe { IoBuf::view(s, offset, len) })
            }
            _ => None,
        }
    }

    /// The buffer for one piece of request `id`: the whole buffer ([`Fanin::lend`]) when the
    /// piece is the request's only one (`whole`), else a view of `len` bytes at `offset`
    /// ([`Fanin::view`]). When neither can be had, the request is failed here, so that it can
    /// never complete as if the piece had been read or written; the caller sends nothing for
    /// the piece.
    ///
    /// # Safety
    /// As for [`Fanin::view`].
    pub(crate) unsafe fn piece(
        &mut self,
        id: ReqId,
        whole: bool,
        offset: u64,
        len: u64,
    ) -> Option<IoBuf> {
        let buf = if whole {
            self.lend(id)
        } else {
            let (Ok(at), Ok(n)) = (usize::try_from(offset), usize::try_from(len)) else {
                return self.piece_missing(id, offset, len);
            };
            // SAFETY: this function's contract is `view`'s.
            unsafe { self.view(id, at, n) }
        };
        match buf {
            Some(b) => Some(b),
            None => self.piece_missing(id, offset, len),
        }
    }

    fn piece_missing(&mut self, id: ReqId, offset: u64, len: u64) -> Option<IoBuf> {
        self.fail(
            id,
            StorageError::Unavailable(format!(
                "bytes {offset}..{} of a request's buffer for one of its pieces",
                offset.saturating_add(len)
            )),
        );
        None
    }

    /// Records an error for request `id` (the first one wins).
    pub(crate) fn fail(&mut self, id: ReqId, e: StorageError) {
        if let Some(p) = self.slab.get_mut(id) {
            if p.result.is_ok() {
                p.result = Err(e);
            }
        }
    }

    /// Drops one hold of request `id` — a piece finished with `result`, handing back `buf` (the
    /// lent whole buffer, or a view, which is dropped) — and returns the request's completion
    /// once no hold is left.
    pub(crate) fn release(
        &mut self,
        id: ReqId,
        result: Result<()>,
        buf: Option<IoBuf>,
    ) -> Option<Completion> {
        let p = self.slab.get_mut(id)?;
        if let Held::Lent = p.buf {
            if let Some(b) = buf {
                p.buf = Held::Owned(b);
            }
        } else {
            drop(buf);
        }
        if let Err(e) = result {
            if p.result.is_ok() {
                p.result = Err(e);
            }
        }
        p.holds = p.holds.saturating_sub(1);
        if p.holds > 0 {
            return None;
        }
        let p = self.slab.remove(id)?;
        let (buf, lost) = match p.buf {
            Held::Owned(b) => (Some(b), false),
            Held::Shared(s) => match Arc::try_unwrap(s) {
                Ok(b) => (Some(b), false),
                Err(_) => (None, true),
            },
            Held::Lent => (None, true),
            Held::None => (None, false),
        };
        // Only a request opened with a buffer can have lent or shared it.
        let result = match (p.result, lost) {
            (Err(e), _) => Err(e),
            (Ok(_), true) => Err(StorageError::Unavailable(
                "a piece of the request did not give its buffer back".into(),
            )),
            (Ok(n), false) => Ok(n),
        };
        Some(Completion {
            tag: p.tag,
            result,
            buf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_request_gets_its_whole_buffer_back() {
        let mut f = Fanin::default();
        let id = f.open(9, Some(IoBuf::from_slice(&[1, 2, 3, 4, 5, 6, 7, 8])), 8);
        f.hold(id);
        f.hold(id);
        // SAFETY: the two views are disjoint.
        let mut a = unsafe { f.view(id, 0, 4) }.unwrap();
        // SAFETY: as above.
        let c = unsafe { f.view(id, 4, 4) }.unwrap();
        a.fill_zero(0, 2);
        assert!(f.release(id, Ok(()), Some(a)).is_none());
        assert!(f.release(id, Ok(()), Some(c)).is_none());
        let done = f.release(id, Ok(()), None).unwrap();
        assert_eq!(done.tag, 9);
        assert_eq!(done.result.unwrap(), 8);
        assert_eq!(done.buf.unwrap().to_vec(), vec![0, 0, 3, 4, 5, 6, 7, 8]);
        assert_eq!(f.len(), 0);
    }

    #[test]
    fn a_lent_buffer_comes_back_with_its_piece() {
        let mut f = Fanin::default();
        let id = f.open(1, Some(IoBuf::new(4)), 4);
        f.hold(id);
        let b = f.lend(id).unwrap();
        // SAFETY: no other view of the request exists.
        assert!(unsafe { f.view(id, 0, 1) }.is_none());
        assert!(f.release(id, Ok(()), None).is_none());
        let done = f.release(id, Ok(()), Some(b)).unwrap();
        assert_eq!(done.buf.unwrap().len(), 4);
        assert_eq!(done.result.unwrap(), 4);
    }

    #[test]
    fn a_piece_outside_the_buffer_fails_its_request() {
        let mut f = Fanin::default();
        let id = f.open(3, Some(IoBuf::new(8)), 8);
        f.hold(id);
        // SAFETY: the two views are disjoint.
        let a = unsafe { f.piece(id, false, 0, 4) }.unwrap();
        assert_eq!(a.len(), 4);
        // SAFETY: as above; this one lies past the end and is refused.
        assert!(unsafe { f.piece(id, false, 6, 4) }.is_none());
        assert!(f.release(id, Ok(()), Some(a)).is_none());
        let c = f.release(id, Ok(()), None).unwrap();
        assert!(
            matches!(&c.result, Err(StorageError::Unavailable(m)) if m.contains("6..10")),
            "{:?}",
            c.result
        );
        assert_eq!(c.buf.unwrap().len(), 8, "the buffer still goes back");

        // A second whole piece cannot have the buffer lent twice.
        let id = f.open(4, Some(IoBuf::new(8)), 8);
        f.hold(id);
        // SAFETY: whole pieces take no views.
        let b = unsafe { f.piece(id, true, 0, 8) }.unwrap();
        // SAFETY: as above.
        assert!(unsafe { f.piece(id, true, 0, 8) }.is_none());
        assert!(f.release(id, Ok(()), Some(b)).is_none());
        let c = f.release(id, Ok(()), None).unwrap();
        assert!(matches!(c.result, Err(StorageError::Unavailable(_))));
    }

    #[test]
    fn the_first_error_wins_and_a_lost_buffer_is_an_error() {
        let mut f = Fanin::default();
        let id = f.open(1, None, 0);
        f.hold(id);
        f.release(id, Err(StorageError::Busy("x".into())), None);
        f.fail(id, StorageError::Cancelled);
        let c = f.release(id, Ok(()), None).unwrap();
        assert!(matches!(c.result, Err(StorageError::Busy(_))));

        let id = f.open(2, Some(IoBuf::new(4)), 4);
        f.hold(id);
        let _lost = f.lend(id);
        f.release(id, Ok(()), None);
        let c = f.release(id, Ok(()), None).unwrap();
        assert!(matches!(c.result, Err(StorageError::Unavailable(_))));
    }
}
