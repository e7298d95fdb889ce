//! Crash tests: random sequences of create, write, flush, snapshot, clone, discard, resize and
//! remove on thin and linear volumes of a group on a fault-injecting PV, with the power cut at
//! every flush point in turn (unflushed writes dropped, or torn and reordered). After each cut
//! the group is reopened from what survived; `vg check` must be clean (which includes the
//! leak and double-ownership checks of every pool), every volume must exist exactly when the
//! model says it must, and every sector must hold a value the model allows: after a completed
//! flush only the last value written, before it also any later unflushed one.

mod volume_util;

use std::collections::BTreeMap;
use std::sync::Arc;

use strata_storage::io::blocking::BlockingQueue;
use strata_storage::io::fault::{
    fault_seeds, Fault, FaultController, FaultDevice, LossMode, OpKind,
};
use strata_storage::volume::label::PE_START;
use strata_storage::volume::thin::AllocPolicy;
use strata_storage::volume::vg::format_pv;
use strata_storage::volume::{LvType, PvHandle, Vg, VgOptions};
use strata_storage::{BlockDevice, SharedFile, StorageError};
use volume_util::pattern;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const EXTENT: u64 = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Thin,
    Snapshot,
    Linear,
}

#[derive(Clone, Debug)]
enum Action {
    CreateThin {
        name: String,
        size: u64,
    },
    CreateLinear {
        name: String,
        size: u64,
    },
    Write {
        name: String,
        page: u64,
        pages: u64,
        id: u32,
    },
    Discard {
        name: String,
        page: u64,
        pages: u64,
    },
    Flush {
        name: String,
    },
    Snapshot {
        origin: String,
        name: String,
    },
    Clone {
        snap: String,
        name: String,
    },
    Resize {
        name: String,
        size: u64,
    },
    Remove {
        name: String,
    },
}

/// Plans a valid random sequence (valid when nothing fails).
fn plan(seed: u64, len: usize) -> Vec<Action> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut vols: BTreeMap<String, (Kind, u64)> = BTreeMap::new();
    let mut out = Vec::new();
    let mut n = 0;
    let mut id = 0u32;
    while out.len() < len {
        n += 1;
        let fresh = format!("v{n}");
        let writable: Vec<(String, u64, Kind)> = vols
            .iter()
            .filter(|(_, v)| v.0 != Kind::Snapshot)
            .map(|(k, v)| (k.clone(), v.1, v.0))
            .collect();
        let thin: Vec<String> = vols
            .iter()
            .filter(|(_, v)| v.0 == Kind::Thin)
            .map(|(k, _)| k.clone())
            .collect();
        let snaps: Vec<String> = vols
            .iter()
            .filter(|(_, v)| v.0 == Kind::Snapshot)
            .map(|(k, _)| k.clone())
            .collect();
        let a = match rng.u32(0..100) {
            0..=9 => {
                let size = rng.u64(2..6) * (256 << 10);
                vols.insert(fresh.clone(), (Kind::Thin, size));
                Action::CreateThin { name: fresh, size }
            }
            10..=13 => {
                let size = rng.u64(1..4) * EXTENT;
                vols.insert(fresh.clone(), (Kind::Linear, size));
                Action::CreateLinear { name: fresh, size }
            }
            14..=55 if !writable.is_empty() => {
                let (name, size, _) = &writable[rng.usize(..writable.len())];
                let total = size / PAGE;
                let page = rng.u64(..total);
                let pages = rng.u64(1..=8).min(total - page);
                id += 1;
                Action::Write {
                    name: name.clone(),
                    page,
                    pages,
                    id,
                }
            }
            56..=62 if !writable.is_empty() => {
                let (name, size, _) = &writable[rng.usize(..writable.len())];
                let total = size / PAGE;
                let page = rng.u64(..total);
                let pages = rng.u64(1..=32).min(total - page);
                Action::Discard {
                    name: name.clone(),
                    page,
                    pages,
                }
            }
            63..=72 if !writable.is_empty() => {
                let (name, _, _) = &writable[rng.usize(..writable.len())];
                Action::Flush { name: name.clone() }
            }
            73..=80 if !thin.is_empty() => {
                let origin = thin[rng.usize(..thin.len())].clone();
                let size = vols[&origin].1;
                vols.insert(fresh.clone(), (Kind::Snapshot, size));
                Action::Snapshot {
                    origin,
                    name: fresh,
                }
            }
            81..=85 if !snaps.is_empty() => {
                let snap = snaps[rng.usize(..snaps.len())].clone();
                let size = vols[&snap].1;
                vols.insert(fresh.clone(), (Kind::Thin, size));
                Action::Clone { snap, name: fresh }
            }
            86..=91 if !writable.is_empty() => {
                let (name, _, kind) = writable[rng.usize(..writable.len())].clone();
                let unit = if kind == Kind::Linear {
                    EXTENT
                } else {
                    64 << 10
                };
                let size = rng.u64(1..24) * unit;
                if let Some(v) = vols.get_mut(&name) {
                    v.1 = size;
                }
                Action::Resize { name, size }
            }
            92..=99 if !vols.is_empty() => {
                let names: Vec<&String> = vols.keys().collect();
                let name = names[rng.usize(..names.len())].clone();
                vols.remove(&name);
                Action::Remove { name }
            }
            _ => continue,
        };
        out.push(a);
    }
    out
}

/// What one 4 KiB page may read as: 0 for zeros, else the id of a write.
#[derive(Clone, Debug)]
struct Page {
    /// Every value it may hold after a power cut.
    cands: Vec<u32>,
    /// The values it may hold now (one, unless a write to it failed).
    cur: Vec<u32>,
}

impl Page {
    fn zero() -> Page {
        Page {
            cands: vec![0],
            cur: vec![0],
        }
    }

    fn written(&mut self, id: u32, ok: bool) {
        if !self.cands.contains(&id) {
            self.cands.push(id);
        }
        if ok {
            self.cur = vec![id];
        } else if !self.cur.contains(&id) {
            self.cur.push(id);
        }
    }
}

/// What a volume may hold.
#[derive(Clone, Debug)]
struct Vol {
    kind: Kind,
    pages: Vec<Page>,
}

impl Vol {
    fn new(kind: Kind, size: u64) -> Vol {
        Vol {
            kind,
            pages: vec![Page::zero(); (size / PAGE) as usize],
        }
    }

    fn collapse(&mut self) {
        for p in &mut self.pages {
            p.cands = p.cur.clone();
        }
    }

    fn current(&self) -> Vol {
        let mut v = self.clone();
        v.collapse();
        v
    }

    fn resized(&self, size: u64) -> Vol {
        let mut v = self.clone();
        v.pages.resize((size / PAGE) as usize, Page::zero());
        v
    }
}

fn page_data(id: u32, page: u64) -> Vec<u8> {
    if id == 0 {
        vec![0u8; PAGE as usize]
    } else {
        pattern(u64::from(id) * 1_000_003 + page, PAGE as usize)
    }
}

/// The model: volumes that certainly exist, and the alternatives the last, interrupted
/// operation allows.
#[derive(Clone, Debug, Default)]
struct Model {
    vols: BTreeMap<String, Vol>,
    /// Volumes that may exist or not, with what they hold if they do.
    maybe: BTreeMap<String, Vol>,
    /// A volume whose size may have changed: its contents if it did.
    maybe_resized: Option<(String, Vol)>,
}

impl Model {
    fn commit_pool(&mut self) {
        for v in self.vols.values_mut().filter(|v| v.kind != Kind::Linear) {
            v.collapse();
        }
    }
}

struct Run {
    vg: Vg,
    ctl: FaultController,
    open: BTreeMap<String, (Arc<dyn BlockDevice>, BlockingQueue)>,
}

/// How an action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    /// Refused for lack of space (nothing else may fail without a power cut).
    Refused,
    Crashed,
}

impl Run {
    fn q(&mut self, name: &str) -> strata_storage::Result<&mut BlockingQueue> {
        if !self.open.contains_key(name) {
            let d = self.vg.open_lv(name, false)?;
            let q = BlockingQueue::open(d.as_ref(), 8)?;
            self.open.insert(name.to_string(), (d, q));
        }
        Ok(&mut self.open.get_mut(name).expect("opened above").1)
    }

    fn outcome<T>(&self, r: strata_storage::Result<T>) -> Outcome {
        match r {
            Ok(_) => Outcome::Done,
            Err(_) if self.ctl.crashed() => Outcome::Crashed,
            // An injected failure: the power goes at once, and the action counts as cut.
            Err(_) if self.ctl.injected().is_some() => {
                self.ctl.power_loss();
                Outcome::Crashed
            }
            Err(StorageError::OutOfSpace(_)) => Outcome::Refused,
            Err(e) => panic!("an operation failed without a power cut: {e}"),
        }
    }

    /// Runs one action and updates the model: exactly when it is done, with alternatives when
    /// the power cut interrupted it.
    fn step(&mut self, a: &Action, m: &mut Model) -> Outcome {
        match a {
            Action::CreateThin { name, size } => {
                let r = self.vg.create_thin("pool", name, *size);
                self.created(m, name, Vol::new(Kind::Thin, *size), r, true)
            }
            Action::CreateLinear { name, size } => {
                let r = self.vg.create_linear(name, *size, &[]);
                let v = Vol::new(Kind::Linear, size.div_ceil(EXTENT) * EXTENT);
                self.created(m, name, v, r, false)
            }
            Action::Write {
                name,
                page,
                pages,
                id,
            } => {
                if !m.vols.contains_key(name) {
                    return Outcome::Done;
                }
                let mut data = Vec::new();
                for p in *page..page + pages {
                    data.extend(page_data(*id, p));
                }
                let r = self.q(name).and_then(|q| q.write_at(page * PAGE, &data));
                let out = self.outcome(r);
                let v = m.vols.get_mut(name).expect("checked above");
                for p in *page..page + pages {
                    v.pages[p as usize].written(*id, out == Outcome::Done);
                }
                out
            }
            Action::Discard { name, page, pages } => {
                if !m.vols.contains_key(name) {
                    return Outcome::Done;
                }
                let r = self
                    .q(name)
                    .and_then(|q| q.discard(page * PAGE, pages * PAGE));
                let out = self.outcome(r);
                let v = m.vols.get_mut(name).expect("checked above");
                for p in *page..page + pages {
                    v.pages[p as usize].written(0, out == Outcome::Done);
                }
                out
            }
            Action::Flush { name } => {
                let Some(kind) = m.vols.get(name).map(|v| v.kind) else {
                    return Outcome::Done;
                };
                let r = self.q(name).and_then(|q| q.flush());
                let out = self.outcome(r);
                if out == Outcome::Done {
                    if kind == Kind::Linear {
                        if let Some(v) = m.vols.get_mut(name) {
                            v.collapse();
                        }
                    } else {
                        m.commit_pool();
                    }
                }
                out
            }
            Action::Snapshot { origin, name } | Action::Clone { snap: origin, name } => {
                let Some(src) = m.vols.get(origin) else {
                    return Outcome::Done;
                };
                let snapshot = matches!(a, Action::Snapshot { .. });
                let mut v = src.current();
                v.kind = if snapshot { Kind::Snapshot } else { Kind::Thin };
                let r = if snapshot {
                    self.vg.snapshot(origin, name)
                } else {
                    self.vg.clone_lv(origin, name)
                };
                self.created(m, name, v, r, true)
            }
            Action::Resize { name, size } => {
                let Some(kind) = m.vols.get(name).map(|v| v.kind) else {
                    return Outcome::Done;
                };
                let real = if kind == Kind::Linear {
                    size.div_ceil(EXTENT) * EXTENT
                } else {
                    *size
                };
                let r = self.vg.resize_lv(name, *size);
                let out = self.outcome(r);
                let mut resized = m.vols[name].resized(real);
                match out {
                    Outcome::Done => {
                        if kind != Kind::Linear {
                            m.commit_pool();
                            resized.collapse();
                        }
                        m.vols.insert(name.clone(), resized);
                    }
                    Outcome::Crashed => m.maybe_resized = Some((name.clone(), resized)),
                    Outcome::Refused => {}
                }
                out
            }
            Action::Remove { name } => {
                if !m.vols.contains_key(name) {
                    return Outcome::Done;
                }
                self.open.remove(name);
                let r = self.vg.remove_lv(name);
                let out = self.outcome(r);
                match out {
                    Outcome::Done => {
                        let v = m.vols.remove(name).expect("checked above");
                        if v.kind != Kind::Linear {
                            m.commit_pool();
                        }
                    }
                    Outcome::Crashed => {
                        let v = m.vols.remove(name).expect("checked above");
                        m.maybe.insert(name.clone(), v);
                    }
                    Outcome::Refused => {}
                }
                out
            }
        }
    }

    fn created(
        &self,
        m: &mut Model,
        name: &str,
        v: Vol,
        r: strata_storage::Result<()>,
        pool: bool,
    ) -> Outcome {
        let out = self.outcome(r);
        match out {
            Outcome::Done => {
                if pool {
                    m.commit_pool();
                }
                m.vols.insert(name.to_string(), v);
            }
            Outcome::Crashed => {
                m.maybe.insert(name.to_string(), v);
            }
            Outcome::Refused => {}
        }
        out
    }
}

/// Sizes of the group under test.
#[derive(Clone, Copy, Debug)]
struct Config {
    pool: u64,
    block: u64,
    metadata: u64,
    policy: AllocPolicy,
}

/// Roomy: nothing runs out.
const ROOMY: Config = Config {
    pool: 24 * MIB,
    block: 0,
    metadata: 0,
    policy: AllocPolicy::NextFit,
};
/// Tight: freed data and metadata blocks are reused within a few operations, and writes meet
/// a full pool.
const TIGHT: Config = Config {
    pool: 256 << 10,
    block: 16 << 10,
    metadata: 512 << 10,
    policy: AllocPolicy::LowestFirst,
};

fn new_group(cfg: Config) -> (Vg, Arc<FaultDevice>, FaultController) {
    let (d, ctl) = FaultDevice::new(PE_START + 96 * MIB);
    format_pv(d.as_ref()).unwrap();
    let vg = Vg::create(
        "vg",
        vec![PvHandle::new(d.clone() as SharedFile)],
        EXTENT,
        VgOptions::default(),
    )
    .unwrap();
    vg.create_pool("pool", cfg.pool, cfg.block, cfg.metadata)
        .unwrap();
    vg.pool("pool").unwrap().set_allocation_policy(cfg.policy);
    (vg, d, ctl)
}

fn read_all(dev: &Arc<dyn BlockDevice>) -> Vec<u8> {
    BlockingQueue::open(dev.as_ref(), 4)
        .unwrap()
        .read_at(0, dev.size() as usize)
        .unwrap()
}

/// Whether the contents allowed by `v` match `data`, sector by sector.
fn matches(v: &Vol, data: &[u8]) -> Result<(), String> {
    if data.len() as u64 != v.pages.len() as u64 * PAGE {
        return Err(format!(
            "size {} where {} was expected",
            data.len(),
            v.pages.len() as u64 * PAGE
        ));
    }
    for (i, page) in v.pages.iter().enumerate() {
        let got = &data[i * PAGE as usize..(i + 1) * PAGE as usize];
        let options: Vec<Vec<u8>> = page
            .cands
            .iter()
            .map(|&id| page_data(id, i as u64))
            .collect();
        for s in 0..8 {
            let r = s * 512..(s + 1) * 512;
            if !options.iter().any(|o| o[r.clone()] == got[r.clone()]) {
                return Err(format!(
                    "page {i} sector {s} holds none of the values {:?}",
                    page.cands
                ));
            }
        }
    }
    Ok(())
}

/// Writes a few bytes into every free block a new volume gets (up to 64) and reads it back:
/// blocks the pool takes for never written (so it skips writing zeros around a first write)
/// must really hold zeros.
fn probe_free_blocks(vg: &Vg, context: &str) {
    let block = vg.pool("pool").unwrap().block_size();
    let n = 64;
    vg.create_thin("pool", "probe", n * block).unwrap();
    let dev = vg.open_lv("probe", false).unwrap();
    let mut q = BlockingQueue::open(dev.as_ref(), 4).unwrap();
    let mut written = 0;
    for i in 0..n {
        match q.write_at(i * block + 100, &[0xee; 512]) {
            Ok(()) => written += 1,
            Err(StorageError::OutOfSpace(_)) => break,
            Err(e) => panic!("{context}: probe write: {e}"),
        }
    }
    for i in 0..written {
        let got = q.read_at(i * block, block as usize).unwrap();
        let mut want = vec![0u8; block as usize];
        want[100..612].fill(0xee);
        assert!(
            got == want,
            "{context}: a first write into a free block shows old data around it (block {i})"
        );
    }
    drop((q, dev));
    vg.remove_lv("probe").unwrap();
}

fn verify(vg: &Vg, m: &Model, context: &str) {
    let check = vg.check().unwrap();
    assert!(check.is_clean(), "{context}: vg check: {check:?}");
    let lvs = vg.list_lvs().unwrap();
    let present: BTreeMap<String, LvType> = lvs
        .iter()
        .filter(|l| l.kind != LvType::ThinPool)
        .map(|l| (l.name.clone(), l.kind))
        .collect();
    for (name, v) in &m.vols {
        assert!(present.contains_key(name), "{context}: {name} is gone");
        let dev = vg.open_lv(name, true).unwrap();
        let data = read_all(&dev);
        let mut r = matches(v, &data);
        if let (Err(_), Some((n, alt))) = (&r, &m.maybe_resized) {
            if n == name {
                r = matches(alt, &data);
            }
        }
        if let Err(e) = r {
            panic!("{context}: {name}: {e}");
        }
    }
    for name in present.keys() {
        if m.vols.contains_key(name) {
            continue;
        }
        let alt = m
            .maybe
            .get(name)
            .unwrap_or_else(|| panic!("{context}: {name} should not exist"));
        let dev = vg.open_lv(name, true).unwrap();
        if let Err(e) = matches(alt, &read_all(&dev)) {
            panic!("{context}: {name} (interrupted operation): {e}");
        }
    }
}

/// Where the power is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    Never,
    /// At the Nth flush.
    Flush(u64),
    /// At the Nth operation of any kind.
    Op(u64),
    /// Right after the first error the workload sees, with this failure injected at the Nth
    /// operation of a kind.
    Error(OpKind, u64, Fault),
}

/// What the device counted in a run: flushes, operations, and operations of each kind.
struct Counts {
    flushes: u64,
    ops: u64,
    kinds: Vec<(OpKind, u64)>,
}

const KINDS: [OpKind; 4] = [OpKind::Read, OpKind::Write, OpKind::Flush, OpKind::Discard];

/// Runs `actions`, cutting the power as `cut` says, with the device's queues completing late and
/// out of order if `async_seed` is set; returns the model, what the device counted, and what
/// survived. Without a cut, the live pool is checked too.
fn run_with(
    cfg: Config,
    actions: &[Action],
    cut: Cut,
    loss: LossMode,
    async_seed: Option<u64>,
) -> (
    Model,
    Counts,
    Option<strata_storage::io::fault::DurableImage>,
) {
    let (vg, _dev, ctl) = new_group(cfg);
    ctl.set_loss_mode(loss);
    if let Some(s) = async_seed {
        ctl.async_completions(s);
    }
    let start = ctl.flushes();
    let ops_start = ctl.ops();
    let kinds_start: Vec<u64> = KINDS.iter().map(|&k| ctl.ops_of(k)).collect();
    let crash_at = match cut {
        Cut::Never => 0,
        Cut::Flush(k) => {
            ctl.crash_at_flush(k);
            k
        }
        Cut::Op(k) => {
            ctl.crash_at_op(k);
            k
        }
        Cut::Error(kind, n, fault) => {
            ctl.fail_nth(kind, n, fault);
            n
        }
    };
    let mut r = Run {
        vg,
        ctl: ctl.clone(),
        open: BTreeMap::new(),
    };
    let mut m = Model::default();
    let mut refused = 0;
    for a in actions {
        match r.step(a, &mut m) {
            Outcome::Done => {}
            Outcome::Refused => refused += 1,
            Outcome::Crashed => break,
        }
    }
    if crash_at == 0 {
        let live = r.vg.check().unwrap();
        assert!(
            live.is_clean(),
            "live check after the whole sequence: {live:?}"
        );
        let _ = refused;
    }
    let counts = Counts {
        flushes: ctl.flushes() - start,
        ops: ctl.ops() - ops_start,
        kinds: KINDS
            .iter()
            .zip(&kinds_start)
            .map(|(&k, b)| (k, ctl.ops_of(k) - b))
            .collect(),
    };
    // A cut that came after the end (or an injected failure nobody saw): cut now.
    let image = match cut {
        Cut::Never => ctl.durable_image(),
        _ => Some(ctl.durable_image().unwrap_or_else(|| ctl.power_loss())),
    };
    (m, counts, image)
}

fn run(
    cfg: Config,
    actions: &[Action],
    crash_at: u64,
    loss: LossMode,
) -> (Model, u64, Option<strata_storage::io::fault::DurableImage>) {
    let cut = if crash_at == 0 {
        Cut::Never
    } else {
        Cut::Flush(crash_at)
    };
    let (m, counts, image) = run_with(cfg, actions, cut, loss, None);
    (m, counts.flushes, image)
}

/// Opens the group on what survived a cut and checks it against the model.
fn reopen_and_verify(image: &strata_storage::io::fault::DurableImage, m: &Model, context: &str) {
    let (dev, _) = FaultDevice::from_durable(image);
    let vg = Vg::open(
        vec![PvHandle::new(dev as SharedFile)],
        "vg",
        VgOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{context}: reopen: {e}"));
    verify(&vg, m, context);
}

fn crash_everywhere(cfg: Config, seed: u64, len: usize, loss: LossMode) {
    let actions = plan(seed, len);
    let (_, flushes, _) = run(cfg, &actions, 0, LossMode::DropUnflushed);
    assert!(flushes > 10, "seed {seed}: only {flushes} flush points");
    for k in 1..=flushes {
        let (m, _, image) = run(cfg, &actions, k, loss);
        let context = format!("seed {seed}, crash at flush {k} of {flushes}");
        reopen_and_verify(&image.expect("the power was cut"), &m, &context);
    }
}

/// Where the new fault modes cut a run.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// At a sample of flushes.
    Flushes,
    /// At a sample of operations of any kind.
    AnyOp,
    /// After an injected failure at the Nth operation of a kind.
    Errors,
}

/// Crash points per run of a new fault mode: a sample in CI, more in a long run.
fn fault_points() -> u64 {
    if std::env::var_os("STRATA_FAULT_SEEDS").is_some() {
        160
    } else {
        40
    }
}

/// The new fault modes: the device's queues complete late and out of order (seeded), and the
/// power is cut at a seeded sample of points of `mode`, in both loss modes.
fn crash_sampled(cfg: Config, plan_seed: u64, len: usize, seed: u64, mode: Mode) {
    let actions = plan(plan_seed, len);
    let (_, counts, _) = run_with(
        cfg,
        &actions,
        Cut::Never,
        LossMode::DropUnflushed,
        Some(seed),
    );
    assert!(
        counts.flushes > 10,
        "seed {plan_seed}: only {} flush points",
        counts.flushes
    );
    eprintln!(
        "plan {plan_seed}: {} flushes, {} operations {:?} ({mode:?}, seed {seed})",
        counts.flushes, counts.ops, counts.kinds
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cut_short = 0;
    for i in 0..fault_points() {
        let cut = match mode {
            Mode::Flushes => Cut::Flush(rng.u64(1..=counts.flushes)),
            Mode::AnyOp => Cut::Op(rng.u64(1..=counts.ops)),
            Mode::Errors => {
                let kinds: Vec<(OpKind, u64)> = counts
                    .kinds
                    .iter()
                    .copied()
                    .filter(|&(_, n)| n > 0)
                    .collect();
                let (kind, n) = kinds[rng.usize(..kinds.len())];
                let fault = match kind {
                    OpKind::Read | OpKind::Write => {
                        [Fault::Eio, Fault::NoSpace, Fault::ShortThenPowerLoss][rng.usize(..3)]
                    }
                    _ => [Fault::Eio, Fault::NoSpace][rng.usize(..2)],
                };
                Cut::Error(kind, rng.u64(1..=n), fault)
            }
        };
        let loss = if i % 2 == 0 {
            LossMode::DropUnflushed
        } else {
            LossMode::TearAndReorder { seed: seed ^ i }
        };
        let (m, c, image) = run_with(cfg, &actions, cut, loss, Some(seed ^ i));
        cut_short += u64::from(c.ops < counts.ops);
        let context = format!("plan {plan_seed}, fault seed {seed}, {cut:?}, {loss:?}, async");
        reopen_and_verify(&image.expect("the power was cut"), &m, &context);
    }
    assert!(cut_short > 0, "no cut interrupted the workload");
}

/// Runs `mode` on a roomy and a tight pool (plans `plans`) for every fault seed.
fn both_pools(mode: Mode, plans: [u64; 2]) {
    for s in fault_seeds(&[0x5eed]) {
        crash_sampled(ROOMY, plans[0], 45, s, mode);
        crash_sampled(TIGHT, plans[1], 60, s ^ 1, mode);
    }
}

/// Late, out-of-order completions on the PV, power cut at flushes.
#[test]
fn power_loss_at_flushes_with_late_out_of_order_completions() {
    both_pools(Mode::Flushes, [41, 42]);
}

/// Power cut at operations of any kind, with late, out-of-order completions.
#[test]
fn power_loss_at_any_operation() {
    both_pools(Mode::AnyOp, [43, 44]);
}

/// EIO, ENOSPC or a short transfer cut by power loss at the Nth read, write, flush or discard
/// (the pool and group metadata included), then the power goes: the group reopens clean and
/// the interrupted action counts as done or not.
#[test]
fn injected_errors_then_power_loss() {
    both_pools(Mode::Errors, [45, 46]);
}

#[test]
fn power_loss_at_every_flush_point_drop_unflushed() {
    for seed in [1, 2, 3] {
        crash_everywhere(ROOMY, seed, 45, LossMode::DropUnflushed);
    }
}

#[test]
fn power_loss_at_every_flush_point_torn_and_reordered() {
    for seed in [11, 12, 13] {
        crash_everywhere(ROOMY, seed, 45, LossMode::TearAndReorder { seed });
    }
}

#[test]
fn power_loss_at_every_flush_point_in_a_tight_pool() {
    for seed in [31, 32, 33, 34] {
        crash_everywhere(TIGHT, seed, 60, LossMode::DropUnflushed);
        crash_everywhere(TIGHT, seed, 60, LossMode::TearAndReorder { seed });
    }
}

#[test]
fn a_clean_run_reopens_with_everything() {
    for (cfg, seed) in [(ROOMY, 21), (ROOMY, 22), (TIGHT, 23)] {
        let actions = plan(seed, 60);
        let (vg, dev, ctl) = new_group(cfg);
        let mut r = Run {
            vg,
            ctl: ctl.clone(),
            open: BTreeMap::new(),
        };
        let mut m = Model::default();
        for a in &actions {
            assert_ne!(r.step(a, &mut m), Outcome::Crashed, "{a:?}");
        }
        // Flush everything still open, then cut the power: all of it must survive.
        for name in r.open.keys().cloned().collect::<Vec<_>>() {
            r.q(&name).unwrap().flush().unwrap();
            if m.vols[&name].kind == Kind::Linear {
                if let Some(v) = m.vols.get_mut(&name) {
                    v.collapse();
                }
            } else {
                m.commit_pool();
            }
        }
        let live = r.vg.check().unwrap();
        assert!(live.is_clean(), "{live:?}");
        drop(r);
        let image = ctl.power_loss();
        drop(dev);
        let (dev, _) = FaultDevice::from_durable(&image);
        let vg = Vg::open(
            vec![PvHandle::new(dev as SharedFile)],
            "vg",
            VgOptions::default(),
        )
        .unwrap();
        verify(&vg, &m, &format!("seed {seed}, clean"));
    }
}

/// A first write into a never-written block writes only its own bytes; the pool must have
/// committed that the block is no longer "never written" before the data can reach the disk,
/// or after a crash the block would be handed out again as zeros while holding data.
#[test]
fn never_written_blocks_are_committed_as_used_before_their_data_lands() {
    let (vg, dev, ctl) = new_group(ROOMY);
    vg.create_thin("pool", "x", 4 * MIB).unwrap();
    let x = vg.open_lv("x", false).unwrap();
    let mut q = BlockingQueue::open(x.as_ref(), 4).unwrap();
    q.write_at(4096, &[0xaa; 4096]).unwrap();
    // The disk writes everything out, but the mapping is never committed.
    strata_storage::HostFile::sync_data(dev.as_ref()).unwrap();
    let image = ctl.power_loss();
    drop((q, x, vg));
    let (d, _) = FaultDevice::from_durable(&image);
    let vg = Vg::open(
        vec![PvHandle::new(d as SharedFile)],
        "vg",
        VgOptions::default(),
    )
    .unwrap();
    probe_free_blocks(&vg, "after the crash");
    assert!(vg.check().unwrap().is_clean());
}

/// A block freed by a discard must not take new data before the discard is committed: if it
/// did, a power cut would bring back the old mapping pointing at someone else's data. Any write
/// may reach the disk before a flush, so the test makes the new data durable on its own.
#[test]
fn freed_blocks_are_not_reused_before_the_free_is_durable() {
    let (vg, dev, ctl) = new_group(TIGHT);
    vg.pool("pool")
        .unwrap()
        .set_allocation_policy(AllocPolicy::LowestFirst);
    vg.create_thin("pool", "x", 256 << 10).unwrap();
    vg.create_thin("pool", "y", 256 << 10).unwrap();
    let x = vg.open_lv("x", false).unwrap();
    let y = vg.open_lv("y", false).unwrap();
    let (mut qx, mut qy) = (
        BlockingQueue::open(x.as_ref(), 4).unwrap(),
        BlockingQueue::open(y.as_ref(), 4).unwrap(),
    );
    qx.write_at(0, &[0xaa; 32768]).unwrap();
    qx.flush().unwrap();
    qx.discard(0, 16384).unwrap();
    // Some I/O completes in between (which lets drained blocks go back to the pool).
    assert_eq!(qx.read_at(16384, 16384).unwrap(), vec![0xaa; 16384]);
    qy.write_at(0, &[0xcc; 16384]).unwrap();
    // The disk happens to write everything out, but no commit happened.
    strata_storage::HostFile::sync_data(dev.as_ref()).unwrap();
    let image = ctl.power_loss();
    drop((qx, qy, x, y, vg));
    let (d, _) = FaultDevice::from_durable(&image);
    let vg = Vg::open(
        vec![PvHandle::new(d as SharedFile)],
        "vg",
        VgOptions::default(),
    )
    .unwrap();
    let got = read_all(&vg.open_lv("x", true).unwrap());
    assert!(
        got[..16384].iter().all(|&b| b == 0xaa) || got[..16384].iter().all(|&b| b == 0),
        "x shows another volume's data"
    );
    assert!(vg.check().unwrap().is_clean());
}
