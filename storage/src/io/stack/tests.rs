//! A stacked queue driven the way the VMM's virtio worker drives it: the consumer submits,
//! commits, and from then on only waits on its eventfd and reaps — it commits again only when it
//! has new requests of its own.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::{Layer, Lower, Stack, StackedQueue};
use crate::device::BlockDevice;
use crate::format::{open_host_file, OpenOptions};
use crate::io::{notify, Completion, IoBuf, IoQueue, QueueOptions, Request};

/// Holds every request until a gate opens (as live restore holds a read until its chunk has
/// arrived), then sends it to the one lower queue.
#[derive(Debug)]
struct Gate {
    open: Arc<AtomicBool>,
    /// The eventfd to signal when the gate opens (the stack's).
    waker: Arc<Mutex<Option<Arc<EventFd>>>>,
    parked: VecDeque<Request>,
}

impl Layer for Gate {
    type Sub = u64;

    fn start(&mut self, st: &mut Stack<u64>, req: Request) {
        if let Ok(mut w) = self.waker.lock() {
            *w = st.waker().cloned();
        }
        self.parked.push_back(req);
        self.advance(st);
    }

    fn finished(&mut self, st: &mut Stack<u64>, tag: u64, c: Completion) {
        st.complete(Completion {
            tag,
            result: c.result,
            buf: c.buf,
        });
    }

    fn advance(&mut self, st: &mut Stack<u64>) -> bool {
        if self.open.load(Ordering::Acquire) {
            while let Some(r) = self.parked.pop_front() {
                st.send(0, r.tag, r.op);
            }
        }
        !self.parked.is_empty()
    }
}

/// Waits on `efd` for at most `limit`; whether it was signalled.
fn poll(efd: &EventFd, limit: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: efd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as libc::c_int) };
    if r > 0 {
        let _ = efd.read();
    }
    r > 0
}

#[test]
fn work_a_wake_up_releases_reaches_the_engine_without_another_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.img");
    std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
    let file = open_host_file(&path, &OpenOptions::default()).unwrap();
    let consumer = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    // A submission batch of two, as the VMM's: one request alone waits for a commit.
    let opts = QueueOptions::with_depth(8)
        .batch(2)
        .notify(consumer.clone());
    let open = Arc::new(AtomicBool::new(false));
    let waker = Arc::new(Mutex::new(None));
    let layer = Gate {
        open: open.clone(),
        waker: waker.clone(),
        parked: VecDeque::new(),
    };
    let dev = file.clone();
    let lower = Lower {
        opener: Box::new(move |_, o| dev.open_queue(o)),
        depth: 8,
        own_eventfd: true,
    };
    let mut q = StackedQueue::new(layer, &opts, lower).unwrap();
    q.submit(Request::read(5, 0, IoBuf::new(4096))).unwrap();
    q.commit().unwrap();
    let mut out = Vec::new();
    assert_eq!(q.reap(&mut out), 0, "the gate is shut");

    // The gate opens on another thread's account, which signals the queue's eventfd.
    open.store(true, Ordering::Release);
    notify(waker.lock().unwrap().as_ref());

    // The consumer wakes, reaps, and waits for the completion — without committing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.is_empty() && Instant::now() < deadline {
        if poll(&consumer, Duration::from_millis(200)) {
            q.reap(&mut out);
        }
    }
    assert_eq!(
        out.len(),
        1,
        "the released read never reached the engine: it waited for a commit nobody makes"
    );
    assert_eq!(out[0].tag, 5);
    assert_eq!(out[0].result.as_ref().ok(), Some(&4096));
    assert_eq!(
        out[0].buf.as_ref().map(|b| b.as_slice().unwrap()[0]),
        Some(7)
    );
}
