//! The appliance's metrics in the Prometheus text format (`GET /api/metrics`).
//!
//! | family | what |
//! |---|---|
//! | `strata_volume_group_size_bytes`, `…_used_bytes` | each volume group |
//! | `strata_pool_data_bytes`, `…_data_used_bytes`, `…_metadata_bytes`, `…_metadata_used_bytes`, `…_virtual_bytes` | each thin pool |
//! | `strata_volume_reads_total`, `…_read_bytes_total`, `…_writes_total`, `…_written_bytes_total`, `…_flushes_total`, `…_discards_total`, `…_discarded_bytes_total`, `…_io_errors_total` | each volume opened since the start (the block layer's counters, [`super::io_stats`]) |
//! | `strata_datastore_*` | snapshots, logical and stored bytes, chunks, free space, last GC and verify (as of the last usage sample) |
//! | `strata_backup_last_snapshot_timestamp_seconds`, `strata_backup_age_seconds` | each backup group's newest snapshot |
//! | `strata_jobs_running`, `strata_jobs_finished_total`, `strata_job_duration_seconds` | jobs |
//! | `strata_vms` | VMs by state |
//! | `strata_ui_sessions` | signed-in web UI sessions |
//! | `strata_http_*` | written by the HTTP server (request counts and latencies) |
//!
//! Names follow the Prometheus conventions (base units, `_total` counters, `_bytes` and
//! `_seconds` suffixes); `promtool check metrics` checks them in the API's tests.

pub mod histogram;
pub mod jobs;
pub mod text;

use std::collections::BTreeMap;

use strata_storage::volume::LvType;

use self::text::{Kind, MetricWriter};
use super::jobs::JobState;
use super::{Service, ServiceResult};

impl Service {
    /// Writes the appliance's metrics (everything but the HTTP server's own).
    pub fn write_metrics(&self, w: &mut MetricWriter) -> ServiceResult<()> {
        w.family(
            "strata_build_info",
            Kind::Gauge,
            "The Strata version serving, as a label.",
        );
        w.sample(
            "strata_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        self.write_storage_metrics(w)?;
        self.write_volume_io_metrics(w);
        self.write_datastore_metrics(w);
        self.write_job_metrics(w);
        self.write_vm_metrics(w)?;
        w.single(
            "strata_ui_sessions",
            Kind::Gauge,
            "Web UI sessions signed in now.",
            self.sessions.count() as f64,
        );
        Ok(())
    }

    fn write_storage_metrics(&self, w: &mut MetricWriter) -> ServiceResult<()> {
        let overview = self.storage_overview()?;
        let mut groups = Vec::new();
        let mut pools = Vec::new();
        for g in &overview {
            let v = serde_json::to_value(&g.group).unwrap_or_default();
            let name = v["name"].as_str().unwrap_or("").to_string();
            let (size, used) = match (v["size"].as_u64(), v["free"].as_u64()) {
                (Some(size), Some(free)) => (size, size.saturating_sub(free)),
                // An RBD group: its pool's quota (0: none) and use.
                _ => (
                    v["quota_bytes"].as_u64().unwrap_or(0),
                    v["used_bytes"].as_u64().unwrap_or(0),
                ),
            };
            groups.push((name, size, used));
            for p in g.pools.iter().filter(|p| p.kind == LvType::ThinPool) {
                if let Some(u) = &p.usage {
                    pools.push((p.vg.clone(), p.name.clone(), u.clone()));
                }
            }
        }
        type Pick = fn(&strata_storage::volume::PoolUsage) -> u64;
        type GroupPick = fn(&(String, u64, u64)) -> u64;
        let gfam: [(&str, &str, GroupPick); 2] = [
            (
                "strata_volume_group_size_bytes",
                "Bytes a volume group holds (an RBD group: its pool's quota, 0 without one).",
                |g| g.1,
            ),
            (
                "strata_volume_group_used_bytes",
                "Bytes of a volume group allocated to volumes (an RBD group: stored in its pool).",
                |g| g.2,
            ),
        ];
        for (name, help, pick) in gfam {
            w.family(name, Kind::Gauge, help);
            for g in &groups {
                w.sample(name, &[("vg", &g.0)], pick(g) as f64);
            }
        }
        let pfam: [(&str, &str, Pick); 5] = [
            ("strata_pool_data_bytes", "Data bytes of a thin pool.", |u| u.pool_bytes),
            ("strata_pool_data_used_bytes", "Data bytes of a thin pool in use.", |u| u.used_bytes),
            ("strata_pool_metadata_bytes", "Metadata bytes of a thin pool.", |u| {
                u.metadata_blocks * 4096
            }),
            ("strata_pool_metadata_used_bytes", "Metadata bytes of a thin pool in use.", |u| {
                u.used_metadata_blocks * 4096
            }),
            (
                "strata_pool_virtual_bytes",
                "Sum of the virtual sizes of a thin pool's volumes (above the data bytes: overcommitted).",
                |u| u.virtual_bytes,
            ),
        ];
        for (name, help, pick) in pfam {
            w.family(name, Kind::Gauge, help);
            for (vg, pool, u) in &pools {
                w.sample(name, &[("vg", vg), ("pool", pool)], pick(u) as f64);
            }
        }
        Ok(())
    }

    fn write_volume_io_metrics(&self, w: &mut MetricWriter) {
        let counts = self.io_stats.counts();
        type Pick = fn(&strata_storage::io::counted::IoCounts) -> u64;
        let fams: [(&str, &str, Pick); 8] = [
            (
                "strata_volume_reads_total",
                "Read requests to a volume.",
                |c| c.reads,
            ),
            (
                "strata_volume_read_bytes_total",
                "Bytes read from a volume.",
                |c| c.read_bytes,
            ),
            (
                "strata_volume_writes_total",
                "Write requests to a volume.",
                |c| c.writes,
            ),
            (
                "strata_volume_written_bytes_total",
                "Bytes written to a volume.",
                |c| c.written_bytes,
            ),
            ("strata_volume_flushes_total", "Flushes of a volume.", |c| {
                c.flushes
            }),
            (
                "strata_volume_discards_total",
                "Discard and write-zeroes requests to a volume.",
                |c| c.discards,
            ),
            (
                "strata_volume_discarded_bytes_total",
                "Bytes discarded or zeroed on a volume.",
                |c| c.discarded_bytes,
            ),
            (
                "strata_volume_io_errors_total",
                "Requests to a volume that failed.",
                |c| c.errors,
            ),
        ];
        for (name, help, pick) in fams {
            w.family(name, Kind::Counter, help);
            for (volume, c) in &counts {
                let (vg, lv) = volume.split_once('/').unwrap_or(("", volume));
                w.sample(name, &[("vg", vg), ("volume", lv)], pick(c) as f64);
            }
        }
    }

    fn write_datastore_metrics(&self, w: &mut MetricWriter) {
        let Some(ds) = self.usage_report().datastore else {
            return;
        };
        let gauges: [(&str, &str, f64); 6] = [
            (
                "strata_datastore_snapshots",
                "Snapshots in the backup datastore.",
                ds.snapshots as f64,
            ),
            (
                "strata_datastore_logical_bytes",
                "Sum of the source sizes of every snapshot in the datastore.",
                ds.logical_bytes as f64,
            ),
            (
                "strata_datastore_stored_bytes",
                "Bytes of chunk files in the datastore.",
                ds.stored_bytes as f64,
            ),
            (
                "strata_datastore_chunks",
                "Chunk files in the datastore.",
                ds.chunks as f64,
            ),
            (
                "strata_datastore_filesystem_size_bytes",
                "Size of the file system holding the datastore.",
                ds.file_system.size as f64,
            ),
            (
                "strata_datastore_filesystem_available_bytes",
                "Bytes still available on the file system holding the datastore.",
                ds.file_system.available as f64,
            ),
        ];
        for (name, help, v) in gauges {
            w.single(name, Kind::Gauge, help, v);
        }
        if let Some(gc) = &ds.last_gc {
            w.single(
                "strata_datastore_last_gc_timestamp_seconds",
                Kind::Gauge,
                "When garbage collection last ended.",
                gc.at as f64,
            );
        }
        if let Some(v) = &ds.last_verify {
            w.single(
                "strata_datastore_last_verify_timestamp_seconds",
                Kind::Gauge,
                "When verification last ended.",
                v.at as f64,
            );
            w.single(
                "strata_datastore_last_verify_ok",
                Kind::Gauge,
                "Whether the last verification found everything intact (1) or damage (0).",
                if v.ok { 1.0 } else { 0.0 },
            );
        }
        let now = strata_backup::time::now();
        let groups = self.latest_backups().unwrap_or(ds.groups);
        w.family(
            "strata_backup_last_snapshot_timestamp_seconds",
            Kind::Gauge,
            "Time of the newest snapshot of each backup group.",
        );
        for g in &groups {
            w.sample(
                "strata_backup_last_snapshot_timestamp_seconds",
                &[("id", &g.id)],
                g.latest as f64,
            );
        }
        w.family(
            "strata_backup_age_seconds",
            Kind::Gauge,
            "Age of the newest snapshot of each backup group.",
        );
        for g in &groups {
            w.sample(
                "strata_backup_age_seconds",
                &[("id", &g.id)],
                (now - g.latest).max(0) as f64,
            );
        }
    }

    fn write_job_metrics(&self, w: &mut MetricWriter) {
        let mut running: BTreeMap<String, u64> = BTreeMap::new();
        for j in self.jobs.list() {
            if j.state == JobState::Running {
                *running.entry(j.kind).or_default() += 1;
            }
        }
        w.family(
            "strata_jobs_running",
            Kind::Gauge,
            "Jobs running now, by kind.",
        );
        for (kind, n) in &running {
            w.sample("strata_jobs_running", &[("kind", kind)], *n as f64);
        }
        self.jobs.stats.write(w);
    }

    fn write_vm_metrics(&self, w: &mut MetricWriter) -> ServiceResult<()> {
        let mut by_state: BTreeMap<&'static str, u64> =
            ["defined", "running", "paused", "stopped", "failed"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        for vm in self.list_vms()? {
            let s = match vm.status.state {
                super::vms::VmState::Defined => "defined",
                super::vms::VmState::Running => "running",
                super::vms::VmState::Paused => "paused",
                super::vms::VmState::Stopped => "stopped",
                super::vms::VmState::Failed => "failed",
            };
            *by_state.entry(s).or_default() += 1;
        }
        w.family("strata_vms", Kind::Gauge, "VMs by state.");
        for (state, n) in by_state {
            w.sample("strata_vms", &[("state", state)], n as f64);
        }
        Ok(())
    }
}
