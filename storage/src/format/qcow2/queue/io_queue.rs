//! The [`IoQueue`] implementation of a [`Qcow2Queue`]: accepts and checks guest requests and
//! dispatches them to the read and write paths, starts flushes (metadata write-back or a host
//! flush), reaps and waits on the lower queues, and on drop drains them and settles every
//! allocation still in flight.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Result, StorageError};
use crate::format::qcow2::plan::ZeroMode;
use crate::io::{check_range, Completion, IoQueue, Op, QueueFull, Request};

use super::{Kind, Lower, Qcow2Queue, SubWhat};

impl Qcow2Queue {
    fn start_flush(&mut self, tag: u64) {
        let writeback = {
            let mut m = self.lock();
            if m.needs_writeback() {
                Some(m.writeback())
            } else {
                None
            }
        };
        match writeback {
            Some(r) => self.complete_now(tag, None, r.map(|()| 0)),
            None => {
                let r = self.new_req(tag, Kind::Other, None, 0);
                self.submit_lower(Lower::Host, r, SubWhat::Piece, Op::Flush);
                self.end_planning(r);
            }
        }
    }
}

impl IoQueue for Qcow2Queue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.accepted
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if self.accepted >= self.depth {
            return Err(QueueFull(req));
        }
        self.accepted += 1;
        self.img.active.fetch_add(1, Ordering::AcqRel);
        let Request { tag, mut op } = req;
        let size = self.img.size.load(Ordering::Acquire);
        if let Err(e) = check_range(&op, size) {
            let buf = op.take_buf();
            self.complete_now(tag, buf, Err(e));
            return Ok(());
        }
        let writes = !matches!(op, Op::Read { .. } | Op::Flush);
        if writes && self.img.read_only {
            let buf = op.take_buf();
            self.complete_now(tag, buf, Err(StorageError::ReadOnly(self.img.name.clone())));
            return Ok(());
        }
        match op {
            Op::Read { buf, .. } if buf.is_empty() => self.complete_now(tag, Some(buf), Ok(0)),
            Op::Write { offset: _, buf } if buf.is_empty() => {
                self.complete_now(tag, Some(buf), Ok(0))
            }
            Op::Read { offset, buf } => self.start_read(tag, offset, buf),
            Op::Write { offset, buf } => self.start_write(tag, offset, buf),
            Op::Flush => self.start_flush(tag),
            Op::Discard { len: 0, .. } | Op::WriteZeroes { len: 0, .. } => {
                self.complete_now(tag, None, Ok(0))
            }
            Op::Discard { offset, len } => self.start_zero(tag, offset, len, ZeroMode::Discard),
            Op::WriteZeroes { offset, len, unmap } => {
                let mode = if unmap {
                    ZeroMode::Unmap
                } else {
                    ZeroMode::Keep
                };
                self.start_zero(tag, offset, len, mode)
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.host.commit()?;
        if let Some(b) = self.backing.as_mut() {
            b.commit()?;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.reaping = true;
        self.process();
        self.reaping = false;
        let n = self.ready.len();
        self.accepted -= n;
        out.extend(self.ready.drain(..));
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.commit()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.reaping = true;
            self.process();
            self.reaping = false;
            if !self.ready.is_empty() || self.accepted == 0 {
                return Ok(());
            }
            let mut ms: i32 = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(());
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
                None => -1,
            };
            let stalled =
                !self.blocked.is_empty() || !self.host_backlog.is_empty() || !self.lower_busy();
            if stalled {
                // Waiting on another queue's allocation: it signals us, but poll briefly too.
                ms = if ms < 0 { 1 } else { ms.min(1) };
            }
            match &self.notifier {
                Some(n) => {
                    let mut fds = [libc::pollfd {
                        fd: n.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    }];
                    // SAFETY: `fds` is one valid pollfd for the duration of the call.
                    let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
                    if r > 0 {
                        // Readable, so this does not block even on a blocking eventfd.
                        let _ = n.read();
                    }
                }
                None if stalled => std::thread::sleep(Duration::from_millis(ms.max(0) as u64)),
                None => {
                    let t = (ms >= 0).then(|| Duration::from_millis(ms as u64));
                    self.host.wait(t)?;
                }
            }
        }
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.external.as_ref()
    }
}

impl Drop for Qcow2Queue {
    fn drop(&mut self) {
        // Allocations in flight must be committed or rolled back, or other queues would wait on
        // their clusters forever.
        let give_up = Instant::now() + Duration::from_secs(60);
        while (self.lower_busy()
            || !self.host_backlog.is_empty()
            || !self.backing_backlog.is_empty())
            && Instant::now() < give_up
        {
            let _ = self.commit();
            self.process();
            if self.lower_busy() {
                let _ = self.host.wait(Some(Duration::from_millis(10)));
                if let Some(b) = self.backing.as_mut() {
                    let _ = b.wait(Some(Duration::from_millis(1)));
                }
            }
        }
        let jobs: Vec<usize> = (0..self.jobs.items.len()).collect();
        for j in jobs {
            if self.jobs.get_mut(j).is_some() {
                self.end_job(j, Err(StorageError::Unavailable("queue closed".into())));
            }
        }
    }
}
