//! The conformance suite (feature `test-utils`): what every engine, format and volume must do.
//!
//! [`run_all`] takes a factory of fresh, zero-filled, writable devices and checks:
//! - random batches of reads, writes, discards, write-zeroes and flushes against a `Vec<u8>`
//!   model (proptest, shrunk to a minimal failing sequence);
//! - edge cases: requests past the end and overflowing offsets, zero-length requests, unaligned
//!   buffers, offsets and lengths, vectored requests with more segments than one system call
//!   takes, back-pressure at the queue depth, many requests in flight, eventfd notification.
//!
//! Failures panic with a message naming the case, as test helpers do.

// Test support (feature `test-utils`): a failed step panics the test, by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{BlockDevice, Capabilities};
use crate::io::blocking::BlockingQueue;
use crate::io::{Completion, IoBuf, IoQueue, Op, QueueOptions, Request};
use crate::StorageError;

/// Makes a fresh zero-filled device of at least the requested size.
pub type Factory<'a> = &'a dyn Fn(u64) -> Arc<dyn BlockDevice>;

/// Size of the devices the random sequences run on.
pub const RANDOM_DEVICE_SIZE: u64 = 4 << 20;

/// Runs the whole suite; `cases` random sequences.
pub fn run_all(make: Factory<'_>, cases: u32) {
    random_sequences(make, cases);
    edge_cases(make);
}

/// Runs every edge case.
pub fn edge_cases(make: Factory<'_>) {
    out_of_range_requests_fail(make);
    zero_length_requests_succeed(make);
    unaligned_requests_round_trip(make);
    huge_vectored_requests_round_trip(make);
    queue_applies_back_pressure(make);
    many_requests_in_flight_complete_once(make);
    eventfd_is_signalled(make);
}

#[derive(Clone, Debug)]
enum Action {
    Write { offset: u64, len: usize, seed: u8 },
    Read { offset: u64, len: usize },
    Discard { offset: u64, len: u64 },
    Zero { offset: u64, len: u64, unmap: bool },
    Flush,
}

impl Action {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Action::Write { offset, len, .. } | Action::Read { offset, len } => {
                Some((offset, len as u64))
            }
            Action::Discard { offset, len } | Action::Zero { offset, len, .. } => {
                Some((offset, len))
            }
            Action::Flush => None,
        }
    }

    fn writes(&self) -> bool {
        !matches!(self, Action::Read { .. } | Action::Flush)
    }
}

fn offset_and_len(size: u64) -> impl Strategy<Value = (u64, u64)> {
    let block = 4096u64;
    prop_oneof![
        // Block-aligned: the common case for guests.
        (0..size / block, 1..64u64).prop_map(move |(b, n)| (b * block, n * block)),
        // Sector-aligned.
        (0..size / 512, 1..256u64).prop_map(|(s, n)| (s * 512, n * 512)),
        // Byte-granular.
        (0..size, 1..20_000u64),
    ]
    .prop_map(move |(o, l)| (o.min(size - 1), l.min(size - o.min(size - 1))))
}

fn action(size: u64) -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (offset_and_len(size), any::<u8>()).prop_map(|((offset, len), seed)| Action::Write { offset, len: len as usize, seed }),
        3 => offset_and_len(size).prop_map(|(offset, len)| Action::Read { offset, len: len as usize }),
        1 => offset_and_len(size).prop_map(|(offset, len)| Action::Discard { offset, len }),
        1 => (offset_and_len(size), any::<bool>()).prop_map(|((offset, len), unmap)| Action::Zero { offset, len, unmap }),
        1 => Just(Action::Flush),
    ]
}

/// Keeps only actions whose ranges do not overlap a write in the same batch, so that the batch's
/// outcome does not depend on completion order.
fn independent(batch: Vec<Action>) -> Vec<Action> {
    let mut kept: Vec<Action> = Vec::new();
    for a in batch {
        let clash = a.range().is_some_and(|(o, l)| {
            kept.iter().any(|k| {
                (a.writes() || k.writes())
                    && k.range().is_some_and(|(ko, kl)| o < ko + kl && ko < o + l)
            })
        });
        if !clash {
            kept.push(a);
        }
    }
    kept
}

fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((offset + i as u64).wrapping_mul(31) as u8) ^ seed ^ 0x5a)
        .collect()
}

/// Random batches checked against a model.
pub fn random_sequences(make: Factory<'_>, cases: u32) {
    let size = RANDOM_DEVICE_SIZE;
    let strategy = proptest::collection::vec(proptest::collection::vec(action(size), 1..8), 1..24);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |batches| {
        let dev = make(size);
        let caps = dev.capabilities();
        let mut model = vec![0u8; size as usize];
        let mut q = dev
            .open_queue(&QueueOptions::with_depth(16))
            .map_err(fail)?;
        for batch in batches {
            let batch = independent(batch);
            run_batch(q.as_mut(), &batch, &mut model, caps)?;
        }
        // Everything reads back as the model says.
        let mut bq = BlockingQueue::new(q);
        let all = bq.read_at(0, size as usize).map_err(fail)?;
        if all != model {
            let first = all
                .iter()
                .zip(&model)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(TestCaseError::fail(format!(
                "final contents differ from the model at byte {first}"
            )));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("conformance: random sequences failed: {e}");
    }
}

fn fail(e: StorageError) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn run_batch(
    q: &mut dyn IoQueue,
    batch: &[Action],
    model: &mut [u8],
    caps: Capabilities,
) -> Result<(), TestCaseError> {
    for (i, a) in batch.iter().enumerate() {
        let op = match *a {
            Action::Write { offset, len, seed } => {
                let data = pattern(offset, len, seed);
                Op::Write {
                    offset,
                    buf: IoBuf::from_slice(&data),
                }
            }
            Action::Read { offset, len } => Op::Read {
                offset,
                buf: IoBuf::new(len),
            },
            Action::Discard { offset, len } if caps.contains(Capabilities::DISCARD) => {
                Op::Discard { offset, len }
            }
            Action::Zero { offset, len, unmap } => Op::WriteZeroes { offset, len, unmap },
            Action::Discard { .. } | Action::Flush => Op::Flush,
        };
        q.submit(Request { tag: i as u64, op })
            .map_err(|_| TestCaseError::fail("queue refused a request below its depth"))?;
    }
    let mut done: Vec<Completion> = Vec::new();
    while done.len() < batch.len() {
        q.wait(Some(Duration::from_secs(30))).map_err(fail)?;
        q.reap(&mut done);
    }
    done.sort_by_key(|c| c.tag);
    for c in done {
        let a = &batch[c.tag as usize];
        if let Err(e) = &c.result {
            return Err(TestCaseError::fail(format!("{a:?} failed: {e}")));
        }
        match *a {
            Action::Write { offset, len, seed } => {
                model[offset as usize..offset as usize + len]
                    .copy_from_slice(&pattern(offset, len, seed));
            }
            Action::Read { offset, len } => {
                let got = c.buf.expect("read returns its buffer").to_vec();
                if got != model[offset as usize..offset as usize + len] {
                    return Err(TestCaseError::fail(format!(
                        "{a:?} returned data that differs from the model"
                    )));
                }
            }
            Action::Discard { offset, len } if caps.contains(Capabilities::DISCARD) => {
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Action::Zero { offset, len, .. } => {
                model[offset as usize..(offset + len) as usize].fill(0)
            }
            Action::Discard { .. } | Action::Flush => {}
        }
    }
    Ok(())
}

fn blocking(dev: &Arc<dyn BlockDevice>) -> BlockingQueue {
    BlockingQueue::open(dev.as_ref(), 32).expect("open a queue")
}

/// Reads and writes past the end, or with overflowing offsets, fail and change nothing.
pub fn out_of_range_requests_fail(make: Factory<'_>) {
    let dev = make(1 << 20);
    let size = dev.size();
    let mut q = blocking(&dev);
    for (offset, len) in [(size, 1usize), (size - 512, 1024), (u64::MAX - 10, 512)] {
        let r = q.read_at(offset, len);
        assert!(
            r.is_err(),
            "conformance: a read of {len} at {offset} on a {size}-byte device succeeded"
        );
        let w = q.write_at(offset, &vec![1u8; len]);
        assert!(
            w.is_err(),
            "conformance: a write of {len} at {offset} on a {size}-byte device succeeded"
        );
    }
    assert!(
        q.discard(u64::MAX - 1, 4096).is_err(),
        "conformance: an overflowing discard succeeded"
    );
    assert_eq!(
        q.read_at(size - 512, 512).unwrap(),
        vec![0u8; 512],
        "conformance: a refused write changed data"
    );
}

/// Zero-length reads, writes and discards succeed with 0 bytes.
pub fn zero_length_requests_succeed(make: Factory<'_>) {
    let dev = make(1 << 20);
    let mut q = blocking(&dev);
    assert_eq!(
        q.run(Op::Read {
            offset: 4096,
            buf: IoBuf::empty()
        })
        .result
        .unwrap(),
        0
    );
    assert_eq!(
        q.run(Op::Write {
            offset: 4096,
            buf: IoBuf::empty()
        })
        .result
        .unwrap(),
        0
    );
    q.discard(0, 0).unwrap();
    q.write_zeroes(0, 0, false).unwrap();
}

/// Buffers at odd addresses, odd offsets and odd lengths round-trip (bounced where needed).
pub fn unaligned_requests_round_trip(make: Factory<'_>) {
    let dev = make(1 << 20);
    let mut q = blocking(&dev);
    for (offset, len, shift) in [
        (1u64, 1usize, 0usize),
        (4095, 2, 1),
        (511, 1027, 3),
        (8192, 4096, 1),
        (70_001, 65_537, 7),
    ] {
        let data = pattern(offset, len, 0x33);
        // A buffer that starts `shift` bytes into an aligned allocation.
        let mut parent = IoBuf::new(len + shift);
        parent.copy_from_slice(shift, &data);
        let parent = Arc::new(parent);
        // SAFETY: the only view of `parent`, which is not touched until the write completed.
        let view = unsafe { IoBuf::view(&parent, shift, len) };
        let c = q.run(Op::Write { offset, buf: view });
        c.result.as_ref().unwrap_or_else(|e| {
            panic!("conformance: unaligned write ({offset}, {len}, +{shift}) failed: {e}")
        });
        drop(c);
        let back = Arc::new(IoBuf::new(len + shift));
        let c = q.run(Op::Read {
            offset,
            // SAFETY: the only view of `back`, unwrapped after the read completed.
            buf: unsafe { IoBuf::view(&back, shift, len) },
        });
        c.result
            .as_ref()
            .unwrap_or_else(|e| panic!("conformance: unaligned read failed: {e}"));
        drop(c);
        let back = Arc::try_unwrap(back).expect("views are dropped");
        assert_eq!(
            &back.to_vec()[shift..],
            &data[..],
            "conformance: unaligned round trip ({offset}, {len}, +{shift})"
        );
        // Neighbouring bytes are untouched.
        if offset > 0 {
            assert_eq!(
                q.read_at(offset - 1, 1).unwrap(),
                vec![0],
                "conformance: byte before an unaligned write changed"
            );
        }
        q.write_zeroes(offset, len as u64, false).unwrap();
    }
}

/// Vectored requests with more segments than one system call accepts (and segments of mixed
/// sizes) round-trip.
pub fn huge_vectored_requests_round_trip(make: Factory<'_>) {
    let dev = make(16 << 20);
    let mut q = blocking(&dev);
    let seg_lens: Vec<usize> = (0..2500)
        .map(|i| if i % 3 == 0 { 512 } else { 4096 })
        .collect();
    let total: usize = seg_lens.iter().sum();
    let store = Arc::new(IoBuf::new(total));
    let data = pattern(4096, total, 0x77);
    let views = |store: &Arc<IoBuf>| -> IoBuf {
        let mut at = 0usize;
        let mut segs = Vec::new();
        for &l in &seg_lens {
            let s = store.segments()[0].ptr().wrapping_add(at);
            segs.push((s, l));
            at += l;
        }
        // SAFETY: every segment lies inside `store`, which the returned buffer keeps alive; the
        // segments are disjoint and the test reads `store` only after the request completes.
        unsafe { IoBuf::from_raw_segments(&segs, store.clone()) }
    };
    let mut w = views(&store);
    w.copy_from_slice(0, &data);
    let c = q.run(Op::Write {
        offset: 4096,
        buf: w,
    });
    assert_eq!(
        *c.result
            .as_ref()
            .unwrap_or_else(|e| panic!("conformance: vectored write failed: {e}")),
        total as u64
    );
    drop(c);
    let r = views(&store);
    let mut r_owned = r;
    r_owned.fill_zero(0, total);
    let c = q.run(Op::Read {
        offset: 4096,
        buf: r_owned,
    });
    assert_eq!(
        c.result
            .unwrap_or_else(|e| panic!("conformance: vectored read failed: {e}")),
        total as u64
    );
    assert_eq!(
        c.buf.unwrap().to_vec(),
        data,
        "conformance: vectored round trip"
    );
}

/// Submitting beyond the depth returns the request instead of queueing it.
pub fn queue_applies_back_pressure(make: Factory<'_>) {
    let dev = make(1 << 20);
    let depth = 4;
    let mut q = dev.open_queue(&QueueOptions::with_depth(depth)).unwrap();
    for i in 0..depth as u64 {
        q.submit(Request::read(i, i * 4096, IoBuf::new(4096)))
            .unwrap();
    }
    let extra = q.submit(Request::read(99, 0, IoBuf::new(4096)));
    let back = extra.expect_err("conformance: a queue accepted more than its depth");
    assert_eq!(
        back.0.tag, 99,
        "conformance: back-pressure must hand the request back"
    );
    let mut done = Vec::new();
    while done.len() < depth {
        q.wait(Some(Duration::from_secs(30))).unwrap();
        q.reap(&mut done);
    }
    assert_eq!(q.in_flight(), 0);
    q.submit(back.0)
        .expect("conformance: the queue accepts again after reaping");
    q.wait(None).unwrap();
}

/// A full queue of writes and then reads completes each request exactly once, with its data.
pub fn many_requests_in_flight_complete_once(make: Factory<'_>) {
    let dev = make(8 << 20);
    let depth = 64usize;
    let mut q = dev.open_queue(&QueueOptions::with_depth(depth)).unwrap();
    let run = |q: &mut Box<dyn IoQueue>, reqs: Vec<Request>| -> Vec<Completion> {
        let n = reqs.len();
        for r in reqs {
            q.submit(r).unwrap();
        }
        q.commit().unwrap();
        let mut done = Vec::new();
        while done.len() < n {
            q.wait(Some(Duration::from_secs(30))).unwrap();
            q.reap(&mut done);
        }
        done
    };
    let writes = (0..depth as u64)
        .map(|i| {
            Request::write(
                i,
                i * 65536,
                IoBuf::from_slice(&pattern(i * 65536, 65536, 9)),
            )
        })
        .collect();
    let mut done = run(&mut q, writes);
    done.sort_by_key(|c| c.tag);
    assert_eq!(
        done.iter().map(|c| c.tag).collect::<Vec<_>>(),
        (0..depth as u64).collect::<Vec<_>>()
    );
    assert!(
        done.iter().all(|c| c.result.is_ok()),
        "conformance: a write in a full queue failed"
    );
    let reads = (0..depth as u64)
        .map(|i| Request::read(i, i * 65536, IoBuf::new(65536)))
        .collect();
    for c in run(&mut q, reads) {
        let got = c.buf.unwrap().to_vec();
        assert_eq!(
            got,
            pattern(c.tag * 65536, 65536, 9),
            "conformance: read {} in a full queue",
            c.tag
        );
    }
}

/// A queue opened with an eventfd signals it when completions are ready, for every kind of
/// request — including those a device finishes without lower I/O (a discard of unwritten space,
/// a zero-length read), which an event-driven consumer would otherwise wait for forever.
pub fn eventfd_is_signalled(make: Factory<'_>) {
    let dev = make(1 << 20);
    let efd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut q = dev
        .open_queue(&QueueOptions::with_depth(8).notify(efd.clone()))
        .unwrap();
    let mut fds = [libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(efd.as_ref()),
        events: libc::POLLIN,
        revents: 0,
    }];
    let ops = [
        Request::write(1, 0, IoBuf::from_slice(&[7u8; 4096])),
        Request::read(2, 0, IoBuf::new(4096)),
        Request::discard(3, 512 << 10, 256 << 10),
        Request::write_zeroes(4, 256 << 10, 128 << 10, true),
        Request::flush(5),
        Request::read(6, 0, IoBuf::empty()),
    ];
    for req in ops {
        let (tag, name) = (req.tag, req.op.name());
        q.submit(req).unwrap();
        q.commit().unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, 30_000) };
            assert!(
                r > 0,
                "conformance: the eventfd was not signalled within 30 s after a {name}"
            );
            let _ = efd.read();
            q.reap(&mut done);
        }
        let c = done.pop().unwrap();
        assert_eq!(c.tag, tag);
        c.result
            .unwrap_or_else(|e| panic!("conformance: {name} failed: {e}"));
    }
}
