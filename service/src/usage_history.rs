//! A usage history of the appliance's storage, for graphs and "estimated full" dates.
//!
//! `strata serve` samples, every few minutes, the used and total bytes of each volume group,
//! each thin pool's data and metadata, the datastore, and the data directory's file system;
//! [`MAX_POINTS`] samples are kept per series (a week at the default five minutes) in
//! `DATA/usage-history.json`, replaced atomically after each sample.
//!
//! The estimate fits a straight line (least squares) through a series' samples of the last
//! [`ESTIMATE_WINDOW_SECS`] and extends it to the capacity. A series that is not growing has no
//! date; one with too few samples (fewer than [`MIN_ESTIMATE_POINTS`], or spanning less than
//! two sampling intervals) has none either — the dashboard says which.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use strata_storage::volume::{GroupInfo, LvType};

use super::datastore_usage::DatastoreUsage;
use super::space::file_system_usage;
use super::{write_atomically, Service, ServiceError, ServiceResult};

/// Samples kept per series.
pub const MAX_POINTS: usize = 2016;
/// Series kept at most (groups and pools come and go).
pub const MAX_SERIES: usize = 256;
/// Samples older than this are left out of the estimate.
pub const ESTIMATE_WINDOW_SECS: u64 = 7 * 86_400;
/// Fewest samples an estimate is made from.
pub const MIN_ESTIMATE_POINTS: usize = 3;
/// The default time between samples.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
/// Largest history file read back.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// One sample: time (seconds since the Unix epoch), bytes used, bytes in all.
pub type Point = [u64; 3];

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Series {
    label: String,
    kind: String,
    points: VecDeque<Point>,
}

/// A series as reported.
#[derive(Clone, Debug, Serialize)]
pub struct SeriesReport {
    /// Stable key: `vg:NAME`, `pool:VG/POOL`, `pool-metadata:VG/POOL`, `datastore`,
    /// `filesystem:data`.
    pub key: String,
    /// For people.
    pub label: String,
    /// `volume-group`, `pool-data`, `pool-metadata`, `datastore`, `filesystem`.
    pub kind: String,
    /// Bytes used at the last sample.
    pub used: u64,
    /// Bytes in all at the last sample (0: unknown, e.g. an RBD pool without a quota).
    pub capacity: u64,
    /// The samples, oldest first.
    pub points: Vec<Point>,
    /// Growth per day from the fitted line (bytes; negative: shrinking).
    pub growth_per_day: Option<f64>,
    /// When the fitted line reaches the capacity, seconds since the Unix epoch.
    pub estimated_full: Option<u64>,
    /// Why there is no date, for people.
    pub estimate_note: Option<String>,
}

/// The history and the last datastore measurement, as reported by `GET /api/usage`.
#[derive(Clone, Debug, Serialize)]
pub struct UsageReport {
    /// Seconds between samples.
    pub interval_secs: u64,
    /// The last sample's time (none before the first).
    pub sampled_at: Option<u64>,
    /// Each series.
    pub series: Vec<SeriesReport>,
    /// The datastore at the last sample.
    pub datastore: Option<DatastoreUsage>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct HistoryFile {
    version: u32,
    series: BTreeMap<String, Series>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct UsageHistory {
    path: PathBuf,
    state: Mutex<HistoryFile>,
    datastore: Mutex<Option<DatastoreUsage>>,
    interval: Mutex<Duration>,
    sampled_at: Mutex<Option<u64>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Fits `used = a + b·t` through the points and returns `(bytes per day, when full)`, or why
/// there is no estimate. `interval` is the sampling interval (the points must span two).
pub fn estimate(
    points: &[Point],
    capacity: u64,
    interval: Duration,
) -> (Option<f64>, Result<u64, String>) {
    let Some(last) = points.last() else {
        return (None, Err("no samples yet".into()));
    };
    let from = last[0].saturating_sub(ESTIMATE_WINDOW_SECS);
    let pts: Vec<&Point> = points.iter().filter(|p| p[0] >= from).collect();
    let span = last[0] - pts.first().map_or(last[0], |p| p[0]);
    if pts.len() < MIN_ESTIMATE_POINTS || span < 2 * interval.as_secs().max(1) {
        return (
            None,
            Err(format!(
                "too few samples yet ({} of at least {MIN_ESTIMATE_POINTS})",
                pts.len()
            )),
        );
    }
    // Least squares on times relative to the last sample, in f64 (bytes fit exactly up to 2^53).
    let n = pts.len() as f64;
    let t0 = last[0] as f64;
    let (mut st, mut su, mut stt, mut stu) = (0.0, 0.0, 0.0, 0.0);
    for p in &pts {
        let t = p[0] as f64 - t0;
        let u = p[1] as f64;
        st += t;
        su += u;
        stt += t * t;
        stu += t * u;
    }
    let denom = n * stt - st * st;
    if denom <= 0.0 {
        return (None, Err("all samples have the same time".into()));
    }
    let slope = (n * stu - st * su) / denom; // bytes per second
    let intercept = (su - slope * st) / n; // fitted use at the last sample
    let per_day = slope * 86_400.0;
    if capacity == 0 {
        return (Some(per_day), Err("the capacity is unknown".into()));
    }
    if last[1] >= capacity {
        return (Some(per_day), Ok(last[0]));
    }
    if slope <= 0.0 {
        return (Some(per_day), Err("not growing".into()));
    }
    let secs = ((capacity as f64 - intercept) / slope).max(0.0);
    if secs > 100.0 * 365.0 * 86_400.0 {
        return (Some(per_day), Err("not within a hundred years".into()));
    }
    (Some(per_day), Ok(last[0] + secs as u64))
}

impl UsageHistory {
    /// The history kept at `path` (read back if it exists; a damaged file starts afresh,
    /// logged).
    pub fn open(path: PathBuf) -> UsageHistory {
        let file = std::fs::metadata(&path)
            .ok()
            .filter(|m| m.len() <= MAX_FILE_BYTES)
            .and_then(|_| std::fs::read(&path).ok())
            .and_then(|text| match serde_json::from_slice::<HistoryFile>(&text) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "usage history is damaged; starting a new one");
                    None
                }
            })
            .unwrap_or_default();
        UsageHistory {
            path,
            state: Mutex::new(file),
            datastore: Mutex::new(None),
            interval: Mutex::new(DEFAULT_INTERVAL),
            sampled_at: Mutex::new(None),
        }
    }

    /// Adds one sample per series (`key`, `label`, `kind`, used, capacity) at `at`.
    fn add(&self, at: u64, samples: Vec<(String, String, &'static str, u64, u64)>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for (key, label, kind, used, cap) in samples {
            if !st.series.contains_key(&key) && st.series.len() >= MAX_SERIES {
                continue;
            }
            let s = st.series.entry(key).or_insert_with(|| Series {
                label: label.clone(),
                kind: kind.to_string(),
                points: VecDeque::new(),
            });
            s.label = label;
            if s.points.back().is_some_and(|p| p[0] >= at) {
                continue; // the clock went back: keep the series ordered
            }
            s.points.push_back([at, used, cap]);
            while s.points.len() > MAX_POINTS {
                s.points.pop_front();
            }
        }
        st.version = 1;
    }

    /// Writes the history to its file.
    fn save(&self) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match serde_json::to_vec(&*st) {
            Ok(text) => {
                if let Err(e) = write_atomically(&self.path, &text) {
                    tracing::warn!(error = %e, "could not save the usage history");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode the usage history"),
        }
    }

    /// The history with estimates.
    pub fn report(&self) -> UsageReport {
        let interval = *self.interval.lock().unwrap_or_else(|p| p.into_inner());
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let series = st
            .series
            .iter()
            .map(|(key, s)| {
                let points: Vec<Point> = s.points.iter().copied().collect();
                let last = points.last().copied().unwrap_or_default();
                let (growth, full) = estimate(&points, last[2], interval);
                let (estimated_full, estimate_note) = match full {
                    Ok(t) => (Some(t), None),
                    Err(why) => (None, Some(why)),
                };
                SeriesReport {
                    key: key.clone(),
                    label: s.label.clone(),
                    kind: s.kind.clone(),
                    used: last[1],
                    capacity: last[2],
                    points,
                    growth_per_day: growth,
                    estimated_full,
                    estimate_note,
                }
            })
            .collect();
        UsageReport {
            interval_secs: interval.as_secs(),
            sampled_at: *self.sampled_at.lock().unwrap_or_else(|p| p.into_inner()),
            series,
            datastore: self
                .datastore
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

impl Service {
    /// Samples the usage of every group, pool, the datastore and the data file system now.
    pub fn sample_usage(&self) -> ServiceResult<()> {
        let mut samples = Vec::new();
        for g in self.storage_overview()? {
            match &g.group {
                GroupInfo::Local(vg) => {
                    samples.push((
                        format!("vg:{}", vg.name),
                        format!("Volume group {}", vg.name),
                        "volume-group",
                        vg.size.saturating_sub(vg.free),
                        vg.size,
                    ));
                }
                // An RBD group (a variant only with the block layer's `rbd` feature): its pool's
                // use against its quota, read from its listing.
                #[allow(unreachable_patterns)]
                other => {
                    let v = serde_json::to_value(other).unwrap_or_default();
                    let name = v["name"].as_str().unwrap_or("?").to_string();
                    samples.push((
                        format!("vg:{name}"),
                        format!(
                            "RBD group {name} (pool {})",
                            v["pool"].as_str().unwrap_or("?")
                        ),
                        "volume-group",
                        v["used_bytes"].as_u64().unwrap_or(0),
                        v["quota_bytes"].as_u64().unwrap_or(0),
                    ));
                }
            }
            for p in g.pools.iter().filter(|p| p.kind == LvType::ThinPool) {
                let Some(u) = &p.usage else { continue };
                let name = format!("{}/{}", p.vg, p.name);
                samples.push((
                    format!("pool:{name}"),
                    format!("Thin pool {name} data"),
                    "pool-data",
                    u.used_bytes,
                    u.pool_bytes,
                ));
                samples.push((
                    format!("pool-metadata:{name}"),
                    format!("Thin pool {name} metadata"),
                    "pool-metadata",
                    u.used_metadata_blocks * 4096,
                    u.metadata_blocks * 4096,
                ));
            }
        }
        match self.measure_datastore() {
            Ok(ds) => {
                samples.push((
                    "datastore".into(),
                    "Backup datastore".into(),
                    "datastore",
                    ds.stored_bytes,
                    ds.stored_bytes.saturating_add(ds.file_system.available),
                ));
                *self
                    .usage
                    .datastore
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(ds);
            }
            Err(e) => tracing::warn!(error = %e, "measuring the datastore failed"),
        }
        let fs = file_system_usage(self.data().root())?;
        samples.push((
            "filesystem:data".into(),
            "Data directory file system".into(),
            "filesystem",
            fs.size.saturating_sub(fs.available),
            fs.size,
        ));
        let at = now();
        self.usage.add(at, samples);
        self.usage.save();
        *self
            .usage
            .sampled_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(at);
        Ok(())
    }

    /// The usage history with estimates and the last datastore measurement.
    pub fn usage_report(&self) -> UsageReport {
        self.usage.report()
    }

    /// Samples usage now and then every `every` on a thread of its own, until the service is
    /// dropped.
    pub fn start_usage_sampler(self: &Arc<Self>, every: Duration) -> ServiceResult<()> {
        *self
            .usage
            .interval
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = every;
        let svc: Weak<Service> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("strata-usage".into())
            .spawn(move || loop {
                let Some(s) = svc.upgrade() else { return };
                if let Err(e) = s.sample_usage() {
                    tracing::warn!(error = %e, "sampling usage failed");
                }
                drop(s);
                std::thread::sleep(every);
            })
            .map(|_| ())
            .map_err(|e| ServiceError::internal(format!("Starting the usage sampler: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_steady_growth_reaches_the_capacity_where_the_line_says() {
        // 1 GiB a day on a 10 GiB pool holding 4 GiB: full in six days.
        let g = 1u64 << 30;
        let pts: Vec<Point> = (0..=24)
            .map(|h| [1_000_000 + h * 3600, 3 * g + g * h / 24, 10 * g])
            .collect();
        let (per_day, full) = estimate(&pts, 10 * g, MIN);
        let per_day = per_day.unwrap();
        assert!((per_day - g as f64).abs() < g as f64 * 1e-6, "{per_day}");
        let last = pts.last().unwrap()[0];
        let full = full.unwrap();
        assert!(
            full.abs_diff(last + 6 * 86_400) < 60,
            "{full} vs {}",
            last + 6 * 86_400
        );
    }

    #[test]
    fn no_date_without_growth_enough_samples_or_a_capacity() {
        let flat: Vec<Point> = (0..10).map(|i| [i * 600, 500, 1000]).collect();
        assert_eq!(estimate(&flat, 1000, MIN).1.unwrap_err(), "not growing");
        let few: Vec<Point> = (0..2).map(|i| [i * 600, 500 + i, 1000]).collect();
        assert!(estimate(&few, 1000, MIN).1.unwrap_err().contains("too few"));
        let quick: Vec<Point> = (0..5).map(|i| [i, 500 + i, 1000]).collect();
        assert!(
            estimate(&quick, 1000, MIN).1.is_err(),
            "spans less than two intervals"
        );
        let grow: Vec<Point> = (0..5).map(|i| [i * 600, 500 + i, 0]).collect();
        assert_eq!(
            estimate(&grow, 0, MIN).1.unwrap_err(),
            "the capacity is unknown"
        );
        let full: Vec<Point> = (0..5).map(|i| [i * 600, 1000, 1000]).collect();
        assert_eq!(estimate(&full, 1000, MIN).1.unwrap(), 2400);
        assert!(estimate(&[], 1000, MIN).1.is_err());
    }

    #[test]
    fn the_history_is_bounded_ordered_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage-history.json");
        let h = UsageHistory::open(path.clone());
        for i in 0..(MAX_POINTS as u64 + 10) {
            h.add(
                100 + i,
                vec![("vg:a".into(), "A".into(), "volume-group", i, 10_000)],
            );
        }
        h.add(
            50,
            vec![("vg:a".into(), "A".into(), "volume-group", 1, 10_000)],
        );
        h.save();
        let r = UsageHistory::open(path).report();
        assert_eq!(r.series.len(), 1);
        let s = &r.series[0];
        assert_eq!(s.points.len(), MAX_POINTS);
        assert!(s.points.windows(2).all(|w| w[0][0] < w[1][0]));
        assert_eq!(s.used, MAX_POINTS as u64 + 9);
    }
}
