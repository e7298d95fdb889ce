//! Error paths of thin-pool allocation: an EIO injected at every operation of a workload on a
//! thin volume of a group on a fault-injecting PV — first writes into new blocks (whole and
//! partial, so the rest of a block is zeroed), overwrites, a snapshot and copy-on-write of the
//! blocks it shares, a discard that frees blocks, flushes. After each injected error:
//! - the error reaches the caller (a request, a flush or the snapshot fails). A pool whose
//!   metadata commit failed stops by design (every later request fails with "reopen it", as
//!   dm-thin's fail mode); a failed data write does not stop it;
//! - the group, reopened from the same PV (no power loss), checks clean (`vg check`: no leaked or
//!   doubly owned block, metadata consistent), and later I/O works: a write into a new block and
//!   a flush succeed, a new volume can be created;
//! - every page reads back as the model says, except in the ranges of failed requests, where
//!   each sector is either what was there before or what the request wrote.

mod volume_util;

use std::collections::BTreeMap;
use std::sync::Arc;

use strata_storage::io::blocking::BlockingQueue;
use strata_storage::io::fault::{FaultController, FaultDevice, OpKind};
use strata_storage::volume::label::PE_START;
use strata_storage::volume::vg::format_pv;
use strata_storage::volume::{PvHandle, Vg, VgOptions};
use strata_storage::{BlockDevice, SharedFile};
use volume_util::pattern;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;
const VOL: u64 = 4 * MIB;

#[derive(Clone, Copy, Debug)]
enum Step {
    Write {
        vol: &'static str,
        offset: u64,
        len: u64,
        seed: u64,
    },
    Discard {
        vol: &'static str,
        offset: u64,
        len: u64,
    },
    Flush {
        vol: &'static str,
    },
    Snapshot,
}

fn workload() -> Vec<Step> {
    use Step::*;
    vec![
        Write {
            vol: "t",
            offset: 0,
            len: BLOCK,
            seed: 1,
        },
        Write {
            vol: "t",
            offset: 3 * BLOCK + 4096,
            len: 8192,
            seed: 2,
        },
        Write {
            vol: "t",
            offset: 6 * BLOCK - 4096,
            len: 8192,
            seed: 3,
        },
        Flush { vol: "t" },
        Write {
            vol: "t",
            offset: 4096,
            len: 4096,
            seed: 4,
        },
        Snapshot,
        // Copy-on-write: both blocks are shared with the snapshot now.
        Write {
            vol: "t",
            offset: 8192,
            len: 4096,
            seed: 5,
        },
        Write {
            vol: "t",
            offset: 3 * BLOCK,
            len: BLOCK,
            seed: 6,
        },
        Write {
            vol: "t",
            offset: 20 * BLOCK,
            len: 2 * BLOCK,
            seed: 7,
        },
        Discard {
            vol: "t",
            offset: 20 * BLOCK,
            len: BLOCK,
        },
        Flush { vol: "t" },
    ]
}

struct Group {
    vg: Vg,
    dev: Arc<FaultDevice>,
    ctl: FaultController,
    queues: BTreeMap<&'static str, (Arc<dyn BlockDevice>, BlockingQueue)>,
}

impl Group {
    fn new() -> Group {
        let (d, ctl) = FaultDevice::new(PE_START + 64 * MIB);
        format_pv(d.as_ref()).unwrap();
        let vg = Vg::create(
            "vg",
            vec![PvHandle::new(d.clone() as SharedFile)],
            256 << 10,
            VgOptions::default(),
        )
        .unwrap();
        vg.create_pool("pool", 32 * MIB, BLOCK, MIB).unwrap();
        vg.create_thin("pool", "t", VOL).unwrap();
        Group {
            vg,
            dev: d,
            ctl,
            queues: BTreeMap::new(),
        }
    }

    /// Closes everything and opens the group again from the same PV.
    fn reopen(self, what: &str) -> Group {
        let Group {
            vg,
            dev,
            ctl,
            queues,
        } = self;
        drop(queues);
        drop(vg);
        let vg = Vg::open(
            vec![PvHandle::new(dev.clone() as SharedFile)],
            "vg",
            VgOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{what}: reopening the group: {e}"));
        Group {
            vg,
            dev,
            ctl,
            queues: BTreeMap::new(),
        }
    }

    fn q(&mut self, vol: &'static str) -> &mut BlockingQueue {
        if !self.queues.contains_key(vol) {
            let d = self.vg.open_lv(vol, false).unwrap();
            let q = BlockingQueue::open(d.as_ref(), 8).unwrap();
            self.queues.insert(vol, (d, q));
        }
        &mut self.queues.get_mut(vol).expect("opened above").1
    }

    /// Runs one step; the model is updated when it succeeds. Returns the failed step's range
    /// and what it would have written.
    fn step(
        &mut self,
        s: Step,
        model: &mut BTreeMap<&'static str, Vec<u8>>,
    ) -> Option<Option<(&'static str, u64, Vec<u8>)>> {
        let (r, effect) = match s {
            Step::Write {
                vol,
                offset,
                len,
                seed,
            } => {
                let data = pattern(seed * 7919 + offset, len as usize);
                (
                    self.q(vol).write_at(offset, &data),
                    Some((vol, offset, data)),
                )
            }
            Step::Discard { vol, offset, len } => (
                self.q(vol).discard(offset, len),
                Some((vol, offset, vec![0u8; len as usize])),
            ),
            Step::Flush { vol } => (self.q(vol).flush(), None),
            Step::Snapshot => {
                let r = self.vg.snapshot("t", "s");
                if r.is_ok() {
                    let t = model["t"].clone();
                    model.insert("s", t);
                }
                (r, None)
            }
        };
        match r {
            Ok(()) => {
                if let Some((vol, offset, data)) = effect {
                    let m = model.get_mut(vol).expect("volume in the model");
                    m[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                }
                None
            }
            Err(_) => Some(effect),
        }
    }
}

fn eio_at_every_operation_of_thin_allocation() {
    let steps = workload();
    let total = {
        let mut g = Group::new();
        let start = g.ctl.ops();
        let mut model = BTreeMap::from([("t", vec![0u8; VOL as usize])]);
        for &s in &steps {
            assert!(
                g.step(s, &mut model).is_none(),
                "{s:?} failed without a fault"
            );
        }
        g.ctl.ops() - start
    };
    assert!(total > 20, "only {total} operations");
    let only: Option<u64> = std::env::var("EIO_AT").ok().and_then(|v| v.parse().ok());
    for n in (1..=total).filter(|n| only.is_none_or(|o| o == *n)) {
        let mut g = Group::new();
        let mut model = BTreeMap::from([("t", vec![0u8; VOL as usize])]);
        g.ctl.fail_nth_op(n);
        let mut what = format!("EIO at operation {n} of {total}");
        let mut errors = 0;
        // Failed steps: what each would have written, and the volume's bytes before it.
        let mut failed: Vec<(&'static str, u64, Vec<u8>, Vec<u8>)> = Vec::new();
        // Writes since the last completed flush: a failed flush leaves them uncertain too.
        let mut unflushed: Vec<(&'static str, u64, Vec<u8>, Vec<u8>)> = Vec::new();
        for &s in &steps {
            let snapshot = model.clone();
            if let Some(effect) = g.step(s, &mut model) {
                errors += 1;
                if errors == 1 {
                    what = format!("{what} ({s:?} failed first)");
                }
                if let Some((vol, offset, data)) = effect {
                    failed.push((vol, offset, data, snapshot[vol].clone()));
                } else {
                    failed.append(&mut unflushed);
                }
            } else if let Step::Write {
                vol, offset, len, ..
            }
            | Step::Discard { vol, offset, len } = s
            {
                let data = model[vol][offset as usize..(offset + len) as usize].to_vec();
                unflushed.push((vol, offset, data, snapshot[vol].clone()));
            } else if let Step::Flush { .. } = s {
                unflushed.clear();
            }
            if matches!(s, Step::Snapshot) && model.contains_key("s") {
                // The snapshot holds whatever the origin's uncertain ranges held.
                let for_snapshot = |list: &Vec<(&'static str, u64, Vec<u8>, Vec<u8>)>| {
                    list.iter()
                        .filter(|f| f.0 == "t")
                        .map(|(_, o, d, b)| ("s", *o, d.clone(), b.clone()))
                        .collect::<Vec<_>>()
                };
                let (a, b) = (for_snapshot(&failed), for_snapshot(&unflushed));
                failed.extend(a);
                unflushed.extend(b);
            }
        }
        let injected = g.ctl.injected();
        if injected != Some(OpKind::Discard) {
            assert!(
                errors >= 1,
                "{what} ({injected:?}): the error did not reach the caller"
            );
        }
        // Reopening may drop what no completed flush committed, as a power cut would.
        failed.append(&mut unflushed);
        let mut g = g.reopen(&what);
        let check = g.vg.check().unwrap();
        assert!(
            check.is_clean(),
            "{what}: vg check after reopening: {check:?}"
        );
        // Later I/O works, and so does creating a volume.
        let late = pattern(99, BLOCK as usize);
        g.q("t")
            .write_at(40 * BLOCK, &late)
            .unwrap_or_else(|e| panic!("{what}: a later write failed: {e}"));
        g.q("t")
            .flush()
            .unwrap_or_else(|e| panic!("{what}: a later flush failed: {e}"));
        model.get_mut("t").expect("t")[40 * BLOCK as usize..41 * BLOCK as usize]
            .copy_from_slice(&late);
        g.vg.create_thin("pool", "later", MIB)
            .unwrap_or_else(|e| panic!("{what}: creating a volume failed: {e}"));
        let check = g.vg.check().unwrap();
        assert!(
            check.is_clean(),
            "{what}: vg check after later I/O: {check:?}"
        );
        for (vol, want) in &model {
            let got = g.q(vol).read_at(0, VOL as usize).unwrap();
            for (k, (a, b)) in got.chunks(512).zip(want.chunks(512)).enumerate() {
                if a == b {
                    continue;
                }
                let at = (k * 512) as u64;
                let r = at as usize..at as usize + 512;
                let ok = failed.iter().any(|(v, o, d, before)| {
                    *v == *vol
                        && at >= *o
                        && at < o + d.len() as u64
                        && (a == &d[(at - o) as usize..(at - o) as usize + 512]
                            || a == &before[r.clone()])
                });
                assert!(
                    ok,
                    "{what}: {vol} sector at {at:#x} holds neither old nor new data"
                );
            }
        }
    }
}

strata_testkit::main!(eio_at_every_operation_of_thin_allocation);
