//! The API's wire types as the OpenAPI document describes them.
//!
//! The service layer has no HTTP or OpenAPI concerns; its request and response types are plain
//! serde types. This module mirrors each of them, field for field, with the schema derive, and
//! the handlers' annotations name these mirrors. Values of other crates that the API passes
//! through (volume and group facts, manifests) are documented as objects.
//!
//! The mirrors cannot drift: the `From` conversions below (compiled with the tests) destructure
//! every service type without `..`, so a field added to or removed from a service type fails
//! the build until its mirror follows; and a test serializes live service values through their
//! mirrors and compares the JSON.

#![allow(missing_docs)]

use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

/// Where a job is in its life.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Working.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Stopped on request; what it had made was removed.
    Cancelled,
}

/// A job as reported to clients.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// What kind of operation (convert, import, backup, restore, verify, gc, ...).
    pub kind: String,
    /// What it works on, for people.
    pub description: String,
    /// Current state.
    pub state: JobState,
    /// Bytes processed so far.
    pub bytes_done: u64,
    /// Bytes to process in all (0 while unknown).
    pub bytes_total: u64,
    /// Progress in percent (0–100).
    pub progress: f64,
    /// Start time, seconds since the Unix epoch.
    pub started: u64,
    /// End time, once finished.
    pub finished: Option<u64>,
    /// The result of a successful job.
    #[schema(value_type = Object)]
    pub result: Option<serde_json::Value>,
    /// The error of a failed job.
    pub error: Option<String>,
}

/// An image as listed.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageSummary {
    /// Name (the file name in the image folder).
    pub name: String,
    /// Format (raw, qcow2, vmdk, vhd, vhdx).
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    /// Format-specific facts.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// A request to create an image.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreateImage {
    /// Name of the new image.
    pub name: String,
    /// Format: raw, qcow2, vmdk, vhd or vhdx.
    #[serde(default)]
    pub format: String,
    /// Virtual size, bytes or with a suffix ("10G").
    pub size: String,
    /// Format options, as with `strata image create -o`.
    #[serde(default)]
    pub options: String,
}

/// A token as listed: never includes the secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenInfo {
    /// Public id (the part before the dot).
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// May manage tokens (create, list, revoke). Other tokens use everything else. Tokens
    /// stored before roles existed count as admin tokens.
    #[serde(default)]
    pub admin: bool,
}

/// A volume group with its pools' usage, for `GET /api/storage`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StorageGroup {
    /// Group facts: name, size, free bytes, extent size, PVs.
    #[schema(value_type = Object)]
    pub group: serde_json::Value,
    /// Thin pools: virtual total vs pool size vs used (overcommit).
    #[schema(value_type = Vec<Object>)]
    pub pools: Vec<serde_json::Value>,
}

/// The result of checking a group.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupCheck {
    /// No errors found.
    pub clean: bool,
    /// Errors, warnings and per-pool findings.
    #[schema(value_type = Object)]
    pub check: serde_json::Value,
}

/// A request to create a volume.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreateVolume {
    /// Volume group.
    pub vg: String,
    /// Name of the new volume.
    pub name: String,
    /// Virtual size ("10G").
    pub size: String,
    /// A thin pool in the same group for a thin volume; none: a linear (thick) volume.
    pub pool: Option<String>,
}

/// A request to add a volume group on a Ceph RBD pool (its volumes are RBD images).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreateRbdGroup {
    /// Name of the new group.
    pub name: String,
    /// The Ceph configuration file, a server path in an import folder.
    pub conf: String,
    /// The Ceph user, without `client.` (default admin).
    #[serde(default)]
    pub user: String,
    /// A keyring file (a server path in an import folder), when the configuration names none.
    #[serde(default)]
    pub keyring: Option<String>,
    /// The RBD pool.
    pub pool: String,
}

/// An image made outside Strata, to take in as a volume.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdoptVolume {
    /// The image's name in the group's pool.
    pub image: String,
}

/// Who may use an export.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum ExportAccess {
    /// Every client that reaches the server (over TLS unless on loopback).
    Open,
    /// Only clients that know the export's name: a long random one made by the server, shown
    /// once and never listed.
    Secret,
    /// Only TLS clients presenting one of these certificates (SHA-256 fingerprints), which
    /// must chain to the client CA given to `strata serve --nbd-client-ca`.
    Certificates {
        /// Fingerprints, `AB:CD:…` or plain hex.
        fingerprints: Vec<String>,
    },
}

/// A request to export something over NBD.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreateExport {
    /// `lv:VG/NAME` (a volume or snapshot), `image:NAME`, or `backup:ID/TIME` (`backup:ID` for
    /// the group's latest).
    pub source: String,
    /// The export's name (default: the source's name); none for a secret export.
    #[serde(default)]
    pub name: Option<String>,
    /// Refuse writes (snapshots and backups always do).
    #[serde(default)]
    pub read_only: bool,
    /// Who may connect (default open).
    #[serde(default)]
    pub access: ExportAccess,
}

/// A client connected to an export.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExportClient {
    /// Its address.
    pub peer: String,
    /// Whether it speaks TLS.
    pub tls: bool,
    /// Its certificate's fingerprint, if it gave one.
    pub certificate: Option<String>,
}

/// An NBD export.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExportSummary {
    /// Identifier for removal: the name, or `secret-…` for a secret export.
    pub id: String,
    /// The name clients ask for; a secret export's only at creation.
    pub name: Option<String>,
    /// What is exported.
    pub source: String,
    /// Whether writes are refused.
    pub read_only: bool,
    /// open, secret or certificates.
    pub access: String,
    /// Size in bytes (0 while it could not be opened).
    pub size: u64,
    /// Dirty bitmaps exposed as `qemu:dirty-bitmap:NAME`.
    pub bitmaps: Vec<String>,
    /// Connected clients.
    pub clients: Vec<ExportClient>,
    /// Where clients connect (`nbd://HOST:PORT/NAME`), once the server runs.
    pub uri: Option<String>,
    /// Why it is not served (it failed to open when the server started).
    pub error: Option<String>,
}

/// A new size.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResizeVolume {
    /// New virtual size ("20G").
    pub size: String,
    /// Allow a smaller size: the data past the new end is lost (as `qemu-img resize --shrink`).
    #[serde(default)]
    pub shrink: bool,
}

/// A name for a snapshot or clone.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewName {
    /// Name of the new volume.
    pub name: String,
}

/// A volume as listed.
#[derive(Debug, Serialize, ToSchema)]
pub struct VolumeSummary {
    /// Facts: name, group, type, size, pool, origin, template, mapped bytes.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub info: serde_json::Value,
    /// The source name other operations take: `lv:VG/NAME`.
    pub source: String,
    /// What has it open now (VMs, jobs, downloads): it cannot be resized or removed meanwhile.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held_by: Vec<String>,
    /// A restore that has not finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreInfo>,
}

/// How a volume is being restored.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    /// A plain restore: the volume is not usable until it ends.
    Full,
    /// A live restore: the volume is usable meanwhile.
    Live,
}

/// A volume's restore that has not finished.
#[derive(Debug, Serialize, ToSchema)]
pub struct RestoreInfo {
    /// `live` or `full`.
    pub mode: RestoreMode,
    /// The snapshot being restored.
    pub snapshot: String,
    /// Start, seconds since the Unix epoch.
    pub started: u64,
    /// `running` (a job or an open device works on it) or `stopped` (a plain restore that
    /// failed or was interrupted: restore again; a live one continues when the volume is
    /// opened or the server starts).
    pub state: String,
    /// Chunks in the snapshot.
    pub chunks_total: u64,
    /// Chunks on the volume (a live restore open in this server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks_done: Option<u64>,
    /// Chunks the datastore could not give (a live restore open in this server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks_lost: Option<u64>,
    /// The job working on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// A request to convert (import, export, copy) disk contents.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConvertRequest {
    /// `lv:VG/NAME`, `image:NAME`, or an absolute path on the server.
    pub source: String,
    /// `image:NAME` (a new image) or `lv:VG/NAME` (an existing volume at least as large).
    pub target: String,
    /// Format of a new image (raw, qcow2, vmdk, vhd, vhdx); default qcow2.
    pub format: Option<String>,
    /// Format options of a new image, as with `strata image create -o`.
    #[serde(default)]
    pub options: String,
    /// Write a compressed image (qcow2, or streamOptimized vmdk).
    #[serde(default)]
    pub compress: bool,
    /// Format of a source given as a server path (raw, qcow2, vmdk, vhd, vhdx); probed when absent.
    /// Appliance images and volumes have a recorded format and take none.
    #[serde(default)]
    pub source_format: Option<String>,
}

/// A request to back up a source.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreateBackup {
    /// `lv:VG/NAME`, `image:NAME`, or an absolute path on the server.
    pub source: String,
    /// Snapshot group, e.g. `volume/strata/vm-100-disk-0` (derived from the source if absent).
    pub id: Option<String>,
    /// The datastore (default `local`; see `backups store add`).
    pub store: Option<String>,
}

/// A request to restore a snapshot.
#[derive(Debug, Serialize, ToSchema)]
pub struct RestoreBackup {
    /// Snapshot name (`ID/TIME`) or a group id (its latest snapshot).
    pub snapshot: String,
    /// `image:NAME` (a new image) or `lv:VG/NAME` (an existing volume of the same size).
    pub target: String,
    /// Format of a new image (raw, qcow2, vmdk, vhd, vhdx); default raw.
    pub format: Option<String>,
    /// Live restore onto a volume: the volume is usable at once (VMs, NBD exports), chunks
    /// being fetched as they are read and copied in the background.
    #[serde(default)]
    pub live: bool,
    /// With `live`: whether this job runs the background copy to its end (default). `false`
    /// only sets the restore up; the copy then runs wherever the volume is opened, or when the
    /// server starts.
    pub copy: Option<bool>,
    /// Workers fetching, checking and writing chunks (default four per core, at most 256).
    pub workers: Option<usize>,
    /// The datastore (default `local`).
    pub store: Option<String>,
}

/// What to verify.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyBackups {
    /// One snapshot (name or group id); all snapshots when absent.
    pub snapshot: Option<String>,
    /// The datastore (default `local`).
    pub store: Option<String>,
}

/// What to collect garbage in.
#[derive(Debug, Serialize, ToSchema)]
pub struct GcBackups {
    /// The datastore (default `local`).
    pub store: Option<String>,
}

/// A request to add a backup datastore: a local folder (`path`) or an S3 bucket.
#[derive(Debug, Serialize, ToSchema)]
pub struct AddStore {
    /// Its name.
    pub name: String,
    /// A local folder on the server.
    pub path: Option<String>,
    /// S3 endpoint URL.
    pub s3: Option<String>,
    /// Bucket.
    pub bucket: Option<String>,
    /// Key prefix in the bucket.
    pub prefix: Option<String>,
    /// Region (default us-east-1).
    pub region: Option<String>,
    /// Path-style requests.
    #[serde(default)]
    pub path_style: bool,
    /// Access key id.
    pub access_key: Option<String>,
    /// Secret access key (kept owner-only on the server, never returned).
    pub secret_key: Option<String>,
    /// The key file's contents (`strata backups key create`).
    pub key: Option<String>,
    /// The key file's passphrase, if it has one.
    pub passphrase: Option<String>,
    /// Allow an S3 datastore without encryption.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Chunk size of a new datastore.
    pub chunk_size: Option<String>,
    /// Pack size target (S3).
    pub pack_size: Option<String>,
    /// Bound of the local chunk cache (S3).
    pub cache_size: Option<String>,
}

/// A backup datastore as listed.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoreSummary {
    /// Its name.
    pub name: String,
    /// `local` or `s3`.
    pub kind: String,
    /// Its folder, or its bucket and cache folder.
    pub location: String,
    /// The key fingerprint when encrypted.
    pub encryption: Option<String>,
    /// Snapshots in it.
    pub snapshots: usize,
}

/// A request to copy snapshots between datastores.
#[derive(Debug, Serialize, ToSchema)]
pub struct SyncBackups {
    /// Source datastore.
    pub from: String,
    /// Target datastore.
    pub to: String,
    /// Only these snapshots (`ID/TIME`, a group id, or a group prefix ending in `/`).
    #[serde(default)]
    pub snapshots: Vec<String>,
}

/// Retention rules.
#[derive(Debug, Serialize, ToSchema)]
pub struct PruneBackups {
    /// Groups to prune (all when empty).
    #[serde(default)]
    pub ids: Vec<String>,
    /// Newest snapshots to keep.
    #[serde(default)]
    pub keep_last: usize,
    /// Days to keep one snapshot of.
    #[serde(default)]
    pub keep_daily: usize,
    /// ISO weeks to keep one snapshot of.
    #[serde(default)]
    pub keep_weekly: usize,
    /// Months to keep one snapshot of.
    #[serde(default)]
    pub keep_monthly: usize,
    /// Only report what would be removed.
    #[serde(default)]
    pub dry_run: bool,
    /// The datastore (default `local`).
    pub store: Option<String>,
}

/// A snapshot as listed.
#[derive(Debug, Serialize, ToSchema)]
pub struct BackupSummary {
    /// Snapshot name, `ID/TIME`.
    pub snapshot: String,
    /// Its manifest: source, time, size, format, parent, change tracking, figures; or the error
    /// reading it.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
    /// Its last verification, if it was verified.
    pub verified: Option<VerifyState>,
}

pub use super::schema_ui::*;

/// What the VM boots.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootKind {
    /// A Linux bzImage through the 64-bit boot protocol, with an optional initramfs and a
    /// command line.
    Linux,
    /// A freestanding 64-bit image, loaded at 1 MiB and entered there in long mode with
    /// identity-mapped page tables (unikernels, test guests). No initrd, no command line.
    Flat,
}

/// A disk of a VM.
#[derive(Debug, Serialize, ToSchema)]
pub struct VmDisk {
    /// `lv:VG/NAME` (a logical volume) or `image:NAME` (an image in the image folder).
    pub source: String,
    /// Present the disk read-only.
    #[serde(default)]
    pub readonly: bool,
    /// The ID string the guest reads (at most 20 bytes of printable ASCII).
    #[serde(default)]
    pub serial: String,
}

/// A NIC as a definition request gives it.
#[derive(Debug, Serialize, ToSchema)]
pub struct NicSpec {
    /// The network.
    pub network: String,
    /// The MAC address (`52:54:00:12:34:56`); generated, and then kept, when not given.
    #[serde(default)]
    pub mac: Option<String>,
    /// A VLAN (1 to 4094) on a VLAN-aware network: the NIC's bridge port carries it untagged.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// A rate limit in MB/s (10^6 bytes per second), each way.
    #[serde(default)]
    pub rate: Option<f64>,
}

/// A NIC of a VM as stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct VmNic {
    /// The network.
    pub network: String,
    /// The MAC address.
    pub mac: String,
    /// The VLAN, if any.
    pub vlan: Option<u16>,
    /// The rate limit in bytes per second each way, if any.
    pub rate_bytes_per_sec: Option<u64>,
}

/// A request to create a network.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreateNetwork {
    /// Name of the network.
    pub name: String,
    /// The bridge (created if missing, adopted if it exists).
    pub bridge: String,
    /// Make a new bridge VLAN-aware (NICs may then name a VLAN).
    #[serde(default)]
    pub vlan_aware: bool,
    /// An interface to make a port of the bridge (the physical uplink).
    #[serde(default)]
    pub uplink: Option<String>,
}

/// A network as stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct NetworkDefinition {
    /// Name of the network.
    pub name: String,
    /// The bridge.
    pub bridge: String,
    /// Whether the bridge is VLAN-aware.
    pub vlan_aware: bool,
    /// The uplink port, if any.
    pub uplink: Option<String>,
    /// Whether Strata created the bridge (and deletes it with the network).
    pub managed: bool,
}

/// A network and its bridge's state now.
#[derive(Debug, Serialize, ToSchema)]
pub struct NetworkInfo {
    /// The definition.
    pub definition: NetworkDefinition,
    /// Whether the bridge exists now.
    pub present: bool,
    /// Whether it is up.
    pub up: bool,
    /// Its ports now (uplink and taps).
    pub ports: Vec<String>,
}

/// A request to define a VM.
#[derive(Debug, Serialize, ToSchema)]
pub struct DefineVm {
    /// Name of the VM.
    pub name: String,
    /// Guest memory ("512M", "2G"; at least 16M, at most the host's RAM).
    #[serde(default)]
    pub memory: String,
    /// Number of vCPUs (1 to 64).
    #[serde(default)]
    pub vcpus: u8,
    /// What `kernel` is.
    #[serde(default)]
    pub boot: BootKind,
    /// Absolute path on the server of the kernel (bzImage) or flat image.
    pub kernel: String,
    /// Absolute path on the server of an initramfs (Linux only).
    #[serde(default)]
    pub initrd: Option<String>,
    /// The kernel command line (Linux only; default `console=ttyS0 reboot=k panic=1`).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Disks in order; the first is /dev/vda in Linux.
    #[serde(default)]
    pub disks: Vec<VmDisk>,
    /// NICs in order.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

/// A VM's definition as stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct VmDefinition {
    /// Name of the VM.
    pub name: String,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// What `kernel` is.
    pub boot: BootKind,
    /// The kernel or flat image on the server.
    pub kernel: String,
    /// The initramfs on the server.
    pub initrd: Option<String>,
    /// The kernel command line (empty for flat images).
    pub cmdline: String,
    /// Disks in order.
    pub disks: Vec<VmDisk>,
    /// NICs in order.
    pub nics: Vec<VmNic>,
}

/// Where a VM is in its life.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Never started.
    Defined,
    /// Running now.
    Running,
    /// Ended normally: the guest powered off or a stop was requested.
    Stopped,
    /// Ended by an error (the VMM failed, or the process running it died).
    Failed,
    /// Running, with its vCPUs paused.
    Paused,
}

/// A VM's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct VmStatus {
    /// Name of the VM.
    pub name: String,
    /// defined, running, stopped or failed.
    pub state: VmState,
    /// When the current or last run started (seconds since the Unix epoch).
    pub started_at: Option<u64>,
    /// When the last run ended (seconds since the Unix epoch).
    pub ended_at: Option<u64>,
    /// Seconds the current run has lasted, or the last run lasted.
    pub uptime_seconds: Option<u64>,
    /// Why the last run ended ("guest powered off", "stopped by request", an error).
    pub exit_reason: Option<String>,
    /// Guest reboots during the current or last run (the VM is rebuilt each time).
    pub reboots: u32,
    /// The process running the VM, while it runs.
    pub pid: Option<u32>,
    /// Bytes the serial console has written in this run (the console log's end offset).
    pub console_bytes: u64,
}

/// A VM: its definition and its status.
#[derive(Debug, Serialize, ToSchema)]
pub struct VmInfo {
    /// The definition.
    pub definition: VmDefinition,
    /// The status.
    pub status: VmStatus,
}

/// A piece of the serial console log.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsoleChunk {
    /// The output, as text (invalid UTF-8 replaced).
    pub data: String,
    /// Offset of the first byte returned.
    pub offset: u64,
    /// Offset after the last byte returned: pass it as `offset` to continue.
    pub next_offset: u64,
    /// The oldest offset still kept (older output was rotated away).
    pub start: u64,
    /// The log's current end offset.
    pub end: u64,
    /// The requested offset was older than `start`; output begins at `start` instead.
    pub truncated: bool,
    /// The VM's state when read.
    pub state: VmState,
}

/// How to stop a VM.
#[derive(Debug, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StopQuery {
    /// Stop hard at once instead of pressing the power button first.
    pub force: Option<bool>,
    /// Seconds to wait for the guest to power off after the power button (default 60, at
    /// most 3600); then the VM is stopped hard.
    pub timeout: Option<u64>,
}

/// Where a live console stream starts.
#[derive(Debug, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Stream from this byte offset (default: the current end).
    pub from: Option<u64>,
}

/// A running VM's counters for one disk.
#[derive(Debug, Serialize, ToSchema)]
pub struct VmDiskStats {
    /// The disk's source (`lv:VG/NAME`, `image:NAME`).
    pub name: String,
    /// Requests the guest made.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Bytes read and written.
    pub bytes: u64,
}

/// Which part of the console log to return.
#[derive(Debug, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// Return output from this byte offset on (a previous answer's `next_offset`, to poll).
    pub offset: Option<u64>,
    /// Return only the last this many bytes (overrides `offset`).
    pub tail: Option<u64>,
    /// Return at most this many bytes (default and maximum 1 MiB).
    pub limit: Option<u64>,
}

#[cfg(test)]
// Every field converts the same way (`.clone()`), Copy or not: it keeps the conversions uniform.
#[allow(clippy::clone_on_copy)]
mod drift {
    //! Each mirror converts from its service type by exhaustive destructuring.

    use super::*;

    mod svc {
        pub use strata_service::backup_stores::{AddStore, StoreSummary, SyncBackups};
        pub use strata_service::backups::{
            BackupSummary, CreateBackup, GcBackups, PruneBackups, RestoreBackup, VerifyBackups,
        };
        pub use strata_service::images::{CreateImage, ImageSummary};
        pub use strata_service::jobs::{JobState, JobStatus};
        pub use strata_service::networks::{CreateNetwork, NetworkDefinition, NetworkInfo};
        pub use strata_service::restores::{RestoreInfo, RestoreMode};
        pub use strata_service::tokens::TokenInfo;
        pub use strata_service::transfer::ConvertRequest;
        pub use strata_service::vms::{
            BootKind, ConsoleChunk, ConsoleQuery, DefineVm, NicSpec, VmDefinition, VmDisk,
            VmDiskStats, VmInfo, VmNic, VmState, VmStatus,
        };
        pub use strata_service::volumes::{
            AdoptVolume, CreateRbdGroup, CreateVolume, GroupCheck, NewName, ResizeVolume,
            StorageGroup, VolumeSummary,
        };
    }

    fn json<T: Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).unwrap_or_default()
    }

    impl From<&svc::CreateRbdGroup> for CreateRbdGroup {
        fn from(v: &svc::CreateRbdGroup) -> Self {
            let svc::CreateRbdGroup {
                name,
                conf,
                user,
                keyring,
                pool,
            } = v;
            CreateRbdGroup {
                name: name.clone(),
                conf: conf.clone(),
                user: user.clone(),
                keyring: keyring.clone(),
                pool: pool.clone(),
            }
        }
    }

    impl From<&svc::AdoptVolume> for AdoptVolume {
        fn from(v: &svc::AdoptVolume) -> Self {
            let svc::AdoptVolume { image } = v;
            AdoptVolume {
                image: image.clone(),
            }
        }
    }

    impl From<&strata_service::exports::ExportAccess> for ExportAccess {
        fn from(v: &strata_service::exports::ExportAccess) -> Self {
            use strata_service::exports::ExportAccess as A;
            match v {
                A::Open => ExportAccess::Open,
                A::Secret => ExportAccess::Secret,
                A::Certificates { fingerprints } => ExportAccess::Certificates {
                    fingerprints: fingerprints.clone(),
                },
            }
        }
    }

    impl From<&strata_service::exports::CreateExport> for CreateExport {
        fn from(v: &strata_service::exports::CreateExport) -> Self {
            let strata_service::exports::CreateExport {
                source,
                name,
                read_only,
                access,
            } = v;
            CreateExport {
                source: source.clone(),
                name: name.clone(),
                read_only: read_only.clone(),
                access: ExportAccess::from(access),
            }
        }
    }

    impl From<&strata_service::exports::ExportClient> for ExportClient {
        fn from(v: &strata_service::exports::ExportClient) -> Self {
            let strata_service::exports::ExportClient {
                peer,
                tls,
                certificate,
            } = v;
            ExportClient {
                peer: peer.clone(),
                tls: tls.clone(),
                certificate: certificate.clone(),
            }
        }
    }

    impl From<&strata_service::exports::ExportSummary> for ExportSummary {
        fn from(v: &strata_service::exports::ExportSummary) -> Self {
            let strata_service::exports::ExportSummary {
                id,
                name,
                source,
                read_only,
                access,
                size,
                bitmaps,
                clients,
                uri,
                error,
            } = v;
            ExportSummary {
                id: id.clone(),
                name: name.clone(),
                source: source.clone(),
                read_only: read_only.clone(),
                access: access.clone(),
                size: size.clone(),
                bitmaps: bitmaps.clone(),
                clients: clients.iter().map(ExportClient::from).collect(),
                uri: uri.clone(),
                error: error.clone(),
            }
        }
    }

    // CONV

    impl From<&svc::JobState> for JobState {
        fn from(v: &svc::JobState) -> Self {
            match v {
                svc::JobState::Running => JobState::Running,
                svc::JobState::Succeeded => JobState::Succeeded,
                svc::JobState::Failed => JobState::Failed,
                svc::JobState::Cancelled => JobState::Cancelled,
            }
        }
    }

    impl From<&svc::JobStatus> for JobStatus {
        fn from(v: &svc::JobStatus) -> Self {
            let svc::JobStatus {
                id,
                kind,
                description,
                state,
                bytes_done,
                bytes_total,
                progress,
                started,
                finished,
                result,
                error,
            } = v;
            JobStatus {
                id: id.clone(),
                kind: kind.clone(),
                description: description.clone(),
                state: JobState::from(state),
                bytes_done: bytes_done.clone(),
                bytes_total: bytes_total.clone(),
                progress: progress.clone(),
                started: started.clone(),
                finished: finished.clone(),
                result: result.as_ref().map(json),
                error: error.clone(),
            }
        }
    }

    impl From<&svc::ImageSummary> for ImageSummary {
        fn from(v: &svc::ImageSummary) -> Self {
            let svc::ImageSummary {
                name,
                format,
                virtual_size,
                actual_size,
                details,
            } = v;
            ImageSummary {
                name: name.clone(),
                format: format.clone(),
                virtual_size: virtual_size.clone(),
                actual_size: actual_size.clone(),
                details: json(details),
            }
        }
    }

    impl From<&svc::CreateImage> for CreateImage {
        fn from(v: &svc::CreateImage) -> Self {
            let svc::CreateImage {
                name,
                format,
                size,
                options,
            } = v;
            CreateImage {
                name: name.clone(),
                format: format.clone(),
                size: size.clone(),
                options: options.clone(),
            }
        }
    }

    impl From<&svc::TokenInfo> for TokenInfo {
        fn from(v: &svc::TokenInfo) -> Self {
            let svc::TokenInfo {
                id,
                name,
                created,
                admin,
            } = v;
            TokenInfo {
                id: id.clone(),
                name: name.clone(),
                created: created.clone(),
                admin: admin.clone(),
            }
        }
    }

    impl From<&svc::StorageGroup> for StorageGroup {
        fn from(v: &svc::StorageGroup) -> Self {
            let svc::StorageGroup { group, pools } = v;
            StorageGroup {
                group: json(group),
                pools: pools.iter().map(json).collect(),
            }
        }
    }

    impl From<&svc::GroupCheck> for GroupCheck {
        fn from(v: &svc::GroupCheck) -> Self {
            let svc::GroupCheck { clean, check } = v;
            GroupCheck {
                clean: clean.clone(),
                check: json(check),
            }
        }
    }

    impl From<&svc::CreateVolume> for CreateVolume {
        fn from(v: &svc::CreateVolume) -> Self {
            let svc::CreateVolume {
                vg,
                name,
                size,
                pool,
            } = v;
            CreateVolume {
                vg: vg.clone(),
                name: name.clone(),
                size: size.clone(),
                pool: pool.clone(),
            }
        }
    }

    impl From<&svc::ResizeVolume> for ResizeVolume {
        fn from(v: &svc::ResizeVolume) -> Self {
            let svc::ResizeVolume { size, shrink } = v;
            ResizeVolume {
                size: size.clone(),
                shrink: shrink.clone(),
            }
        }
    }

    impl From<&svc::NewName> for NewName {
        fn from(v: &svc::NewName) -> Self {
            let svc::NewName { name } = v;
            NewName { name: name.clone() }
        }
    }

    impl From<&svc::VolumeSummary> for VolumeSummary {
        fn from(v: &svc::VolumeSummary) -> Self {
            let svc::VolumeSummary {
                info,
                source,
                held_by,
                restore,
            } = v;
            VolumeSummary {
                info: json(info),
                source: source.clone(),
                held_by: held_by.clone(),
                restore: restore.as_ref().map(RestoreInfo::from),
            }
        }
    }

    impl From<&svc::RestoreMode> for RestoreMode {
        fn from(v: &svc::RestoreMode) -> Self {
            match v {
                svc::RestoreMode::Full => RestoreMode::Full,
                svc::RestoreMode::Live => RestoreMode::Live,
            }
        }
    }

    impl From<&svc::RestoreInfo> for RestoreInfo {
        fn from(v: &svc::RestoreInfo) -> Self {
            let svc::RestoreInfo {
                mode,
                snapshot,
                started,
                state,
                chunks_total,
                chunks_done,
                chunks_lost,
                job,
            } = v;
            RestoreInfo {
                mode: mode.into(),
                snapshot: snapshot.clone(),
                started: *started,
                state: state.clone(),
                chunks_total: *chunks_total,
                chunks_done: *chunks_done,
                chunks_lost: *chunks_lost,
                job: job.clone(),
            }
        }
    }

    impl From<&svc::ConvertRequest> for ConvertRequest {
        fn from(v: &svc::ConvertRequest) -> Self {
            let svc::ConvertRequest {
                source,
                target,
                format,
                options,
                compress,
                source_format,
            } = v;
            ConvertRequest {
                source: source.clone(),
                target: target.clone(),
                format: format.clone(),
                options: options.clone(),
                compress: compress.clone(),
                source_format: source_format.clone(),
            }
        }
    }

    impl From<&svc::CreateBackup> for CreateBackup {
        fn from(v: &svc::CreateBackup) -> Self {
            let svc::CreateBackup { source, id, store } = v;
            CreateBackup {
                source: source.clone(),
                id: id.clone(),
                store: store.clone(),
            }
        }
    }

    impl From<&svc::RestoreBackup> for RestoreBackup {
        fn from(v: &svc::RestoreBackup) -> Self {
            let svc::RestoreBackup {
                snapshot,
                target,
                format,
                live,
                copy,
                workers,
                store,
            } = v;
            RestoreBackup {
                store: store.clone(),
                snapshot: snapshot.clone(),
                target: target.clone(),
                format: format.clone(),
                live: *live,
                copy: *copy,
                workers: *workers,
            }
        }
    }

    impl From<&svc::VerifyBackups> for VerifyBackups {
        fn from(v: &svc::VerifyBackups) -> Self {
            let svc::VerifyBackups { snapshot, store } = v;
            VerifyBackups {
                snapshot: snapshot.clone(),
                store: store.clone(),
            }
        }
    }

    impl From<&svc::GcBackups> for GcBackups {
        fn from(v: &svc::GcBackups) -> Self {
            let svc::GcBackups { store } = v;
            GcBackups {
                store: store.clone(),
            }
        }
    }

    impl From<&svc::SyncBackups> for SyncBackups {
        fn from(v: &svc::SyncBackups) -> Self {
            let svc::SyncBackups {
                from,
                to,
                snapshots,
            } = v;
            SyncBackups {
                from: from.clone(),
                to: to.clone(),
                snapshots: snapshots.clone(),
            }
        }
    }

    impl From<&svc::StoreSummary> for StoreSummary {
        fn from(v: &svc::StoreSummary) -> Self {
            let svc::StoreSummary {
                name,
                kind,
                location,
                encryption,
                snapshots,
            } = v;
            StoreSummary {
                name: name.clone(),
                kind: kind.clone(),
                location: location.clone(),
                encryption: encryption.clone(),
                snapshots: *snapshots,
            }
        }
    }

    impl From<&svc::AddStore> for AddStore {
        fn from(v: &svc::AddStore) -> Self {
            let svc::AddStore {
                name,
                path,
                s3,
                bucket,
                prefix,
                region,
                path_style,
                access_key,
                secret_key,
                key,
                passphrase,
                insecure_plaintext,
                chunk_size,
                pack_size,
                cache_size,
            } = v;
            AddStore {
                name: name.clone(),
                path: path.clone(),
                s3: s3.clone(),
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                region: region.clone(),
                path_style: *path_style,
                access_key: access_key.clone(),
                secret_key: secret_key.clone(),
                key: key.clone(),
                passphrase: passphrase.clone(),
                insecure_plaintext: *insecure_plaintext,
                chunk_size: chunk_size.clone(),
                pack_size: pack_size.clone(),
                cache_size: cache_size.clone(),
            }
        }
    }

    impl From<&svc::PruneBackups> for PruneBackups {
        fn from(v: &svc::PruneBackups) -> Self {
            let svc::PruneBackups {
                ids,
                keep_last,
                keep_daily,
                keep_weekly,
                keep_monthly,
                dry_run,
                store,
            } = v;
            PruneBackups {
                store: store.clone(),
                ids: ids.clone(),
                keep_last: keep_last.clone(),
                keep_daily: keep_daily.clone(),
                keep_weekly: keep_weekly.clone(),
                keep_monthly: keep_monthly.clone(),
                dry_run: dry_run.clone(),
            }
        }
    }

    impl From<&svc::BackupSummary> for BackupSummary {
        fn from(v: &svc::BackupSummary) -> Self {
            let svc::BackupSummary {
                snapshot,
                manifest,
                verified,
            } = v;
            BackupSummary {
                snapshot: snapshot.clone(),
                manifest: json(manifest),
                verified: verified.as_ref().map(VerifyState::from),
            }
        }
    }

    impl From<&svc::BootKind> for BootKind {
        fn from(v: &svc::BootKind) -> Self {
            match v {
                svc::BootKind::Linux => BootKind::Linux,
                svc::BootKind::Flat => BootKind::Flat,
            }
        }
    }

    impl From<&svc::VmDisk> for VmDisk {
        fn from(v: &svc::VmDisk) -> Self {
            let svc::VmDisk {
                source,
                readonly,
                serial,
            } = v;
            VmDisk {
                source: source.clone(),
                readonly: readonly.clone(),
                serial: serial.clone(),
            }
        }
    }

    impl From<&svc::DefineVm> for DefineVm {
        fn from(v: &svc::DefineVm) -> Self {
            let svc::DefineVm {
                name,
                memory,
                vcpus,
                boot,
                kernel,
                initrd,
                cmdline,
                disks,
                nics,
            } = v;
            DefineVm {
                name: name.clone(),
                memory: memory.clone(),
                vcpus: vcpus.clone(),
                boot: BootKind::from(boot),
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
                disks: disks.iter().map(VmDisk::from).collect(),
                nics: nics.iter().map(NicSpec::from).collect(),
            }
        }
    }

    impl From<&svc::NicSpec> for NicSpec {
        fn from(v: &svc::NicSpec) -> Self {
            let svc::NicSpec {
                network,
                mac,
                vlan,
                rate,
            } = v;
            NicSpec {
                network: network.clone(),
                mac: mac.clone(),
                vlan: vlan.clone(),
                rate: rate.clone(),
            }
        }
    }

    impl From<&svc::VmNic> for VmNic {
        fn from(v: &svc::VmNic) -> Self {
            let svc::VmNic {
                network,
                mac,
                vlan,
                rate_bytes_per_sec,
            } = v;
            VmNic {
                network: network.clone(),
                mac: mac.clone(),
                vlan: vlan.clone(),
                rate_bytes_per_sec: rate_bytes_per_sec.clone(),
            }
        }
    }

    impl From<&svc::CreateNetwork> for CreateNetwork {
        fn from(v: &svc::CreateNetwork) -> Self {
            let svc::CreateNetwork {
                name,
                bridge,
                vlan_aware,
                uplink,
            } = v;
            CreateNetwork {
                name: name.clone(),
                bridge: bridge.clone(),
                vlan_aware: vlan_aware.clone(),
                uplink: uplink.clone(),
            }
        }
    }

    impl From<&svc::NetworkDefinition> for NetworkDefinition {
        fn from(v: &svc::NetworkDefinition) -> Self {
            let svc::NetworkDefinition {
                name,
                bridge,
                vlan_aware,
                uplink,
                managed,
            } = v;
            NetworkDefinition {
                name: name.clone(),
                bridge: bridge.clone(),
                vlan_aware: vlan_aware.clone(),
                uplink: uplink.clone(),
                managed: managed.clone(),
            }
        }
    }

    impl From<&svc::NetworkInfo> for NetworkInfo {
        fn from(v: &svc::NetworkInfo) -> Self {
            let svc::NetworkInfo {
                definition,
                present,
                up,
                ports,
            } = v;
            NetworkInfo {
                definition: NetworkDefinition::from(definition),
                present: present.clone(),
                up: up.clone(),
                ports: ports.clone(),
            }
        }
    }

    impl From<&svc::VmDefinition> for VmDefinition {
        fn from(v: &svc::VmDefinition) -> Self {
            let svc::VmDefinition {
                name,
                memory,
                vcpus,
                boot,
                kernel,
                initrd,
                cmdline,
                disks,
                nics,
            } = v;
            VmDefinition {
                name: name.clone(),
                memory: memory.clone(),
                vcpus: vcpus.clone(),
                boot: BootKind::from(boot),
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
                disks: disks.iter().map(VmDisk::from).collect(),
                nics: nics.iter().map(VmNic::from).collect(),
            }
        }
    }

    impl From<&svc::VmState> for VmState {
        fn from(v: &svc::VmState) -> Self {
            match v {
                svc::VmState::Defined => VmState::Defined,
                svc::VmState::Running => VmState::Running,
                svc::VmState::Stopped => VmState::Stopped,
                svc::VmState::Failed => VmState::Failed,
                svc::VmState::Paused => VmState::Paused,
            }
        }
    }

    impl From<&svc::VmStatus> for VmStatus {
        fn from(v: &svc::VmStatus) -> Self {
            let svc::VmStatus {
                name,
                state,
                started_at,
                ended_at,
                uptime_seconds,
                exit_reason,
                reboots,
                pid,
                console_bytes,
            } = v;
            VmStatus {
                name: name.clone(),
                state: VmState::from(state),
                started_at: started_at.clone(),
                ended_at: ended_at.clone(),
                uptime_seconds: uptime_seconds.clone(),
                exit_reason: exit_reason.clone(),
                reboots: reboots.clone(),
                pid: pid.clone(),
                console_bytes: console_bytes.clone(),
            }
        }
    }

    impl From<&svc::VmInfo> for VmInfo {
        fn from(v: &svc::VmInfo) -> Self {
            let svc::VmInfo { definition, status } = v;
            VmInfo {
                definition: VmDefinition::from(definition),
                status: VmStatus::from(status),
            }
        }
    }

    impl From<&svc::ConsoleChunk> for ConsoleChunk {
        fn from(v: &svc::ConsoleChunk) -> Self {
            let svc::ConsoleChunk {
                data,
                offset,
                next_offset,
                start,
                end,
                truncated,
                state,
            } = v;
            ConsoleChunk {
                data: data.clone(),
                offset: offset.clone(),
                next_offset: next_offset.clone(),
                start: start.clone(),
                end: end.clone(),
                truncated: truncated.clone(),
                state: VmState::from(state),
            }
        }
    }

    impl From<&svc::ConsoleQuery> for ConsoleQuery {
        fn from(v: &svc::ConsoleQuery) -> Self {
            let svc::ConsoleQuery {
                offset,
                tail,
                limit,
            } = v;
            ConsoleQuery {
                offset: offset.clone(),
                tail: tail.clone(),
                limit: limit.clone(),
            }
        }
    }

    impl From<&svc::VmDiskStats> for VmDiskStats {
        fn from(v: &svc::VmDiskStats) -> Self {
            let svc::VmDiskStats {
                name,
                requests,
                errors,
                bytes,
            } = v;
            VmDiskStats {
                name: name.clone(),
                requests: requests.clone(),
                errors: errors.clone(),
                bytes: bytes.clone(),
            }
        }
    }

    #[test]
    fn disk_stats_serialize_like_their_mirror() {
        let v = svc::VmDiskStats {
            name: "lv:strata/a".into(),
            requests: 3,
            errors: 1,
            bytes: 4096,
        };
        assert_eq!(json(&v), json(&VmDiskStats::from(&v)));
    }

    /// Live service values serialize exactly as their mirrors do: the schema describes what is
    /// sent.
    #[test]
    fn live_values_serialize_like_their_mirrors() {
        use std::sync::Arc;
        use strata_service::{bootstrap, DataDir, Service};
        fn same<S: Serialize, M: Serialize>(what: &str, v: &S, m: &M) {
            assert_eq!(json(v), json(m), "{what}");
        }
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::at(dir.path());
        bootstrap::ensure_default(
            &data,
            &bootstrap::BootstrapOptions {
                pv: None,
                pv_file_size: 1 << 30,
            },
        )
        .unwrap();
        let svc = Arc::new(Service::open(data).unwrap());
        let (token, _) = svc.tokens.create("t", false).unwrap();
        same("token", &token, &TokenInfo::from(&token));
        let created = svc
            .create_image(&svc::CreateImage {
                name: "a.qcow2".into(),
                format: "qcow2".into(),
                size: "1M".into(),
                options: String::new(),
            })
            .unwrap();
        let strata_service::images::Created::Image(img) = created else {
            panic!("made at once")
        };
        same("image", &img, &ImageSummary::from(&img));
        let vol = svc
            .create_volume(&svc::CreateVolume {
                vg: "strata".into(),
                name: "v".into(),
                size: "4M".into(),
                pool: Some("data".into()),
            })
            .unwrap();
        same("volume", &vol, &VolumeSummary::from(&vol));
        for g in svc.storage_overview().unwrap() {
            same("storage", &g, &StorageGroup::from(&g));
        }
        let check = svc.check_group("strata").unwrap();
        same("check", &check, &GroupCheck::from(&check));
        let job = svc
            .start_backup(svc::CreateBackup {
                source: "lv:strata/v".into(),
                id: None,
                store: None,
            })
            .unwrap();
        let st = job.wait();
        assert_eq!(
            st.state,
            strata_service::jobs::JobState::Succeeded,
            "{st:?}"
        );
        same("job", &st, &JobStatus::from(&st));
        for b in svc.list_backups(None).unwrap() {
            same("backup", &b, &BackupSummary::from(&b));
        }
        for st in svc.list_stores().unwrap() {
            same("store", &st, &StoreSummary::from(&st));
        }
        // A volume under restore lists its restore.
        let mut vol = svc.volume_info("strata", "v").unwrap();
        vol.restore = Some(svc::RestoreInfo {
            mode: svc::RestoreMode::Live,
            snapshot: "volume/strata/v/2026-12-01T00:00:00Z".into(),
            started: 1,
            state: "running".into(),
            chunks_total: 3,
            chunks_done: Some(1),
            chunks_lost: None,
            job: Some("job-1".into()),
        });
        same("volume under restore", &vol, &VolumeSummary::from(&vol));
        let kernel = dir.path().join("import/flat.bin");
        std::fs::write(&kernel, [0xf4u8; 16]).unwrap();
        let vm = svc
            .define_vm(&svc::DefineVm {
                name: "m".into(),
                memory: "32M".into(),
                vcpus: 1,
                boot: svc::BootKind::Flat,
                kernel: kernel.display().to_string(),
                initrd: None,
                cmdline: None,
                disks: vec![svc::VmDisk {
                    source: "lv:strata/v".into(),
                    readonly: true,
                    serial: "s".into(),
                }],
                nics: Vec::new(),
            })
            .unwrap();
        same("vm", &vm, &VmInfo::from(&vm));
        // Networks need root and netlink; their values are built by hand here.
        let net = svc::NetworkInfo {
            definition: svc::NetworkDefinition {
                name: "lan".into(),
                bridge: "br0".into(),
                vlan_aware: true,
                uplink: Some("eth0".into()),
                managed: false,
            },
            present: true,
            up: false,
            ports: vec!["eth0".into()],
        };
        same("network", &net, &NetworkInfo::from(&net));
        let nic = svc::VmNic {
            network: "lan".into(),
            mac: "52:54:00:00:00:01".into(),
            vlan: Some(5),
            rate_bytes_per_sec: Some(1_000_000),
        };
        same("nic", &nic, &VmNic::from(&nic));
        let spec = svc::NicSpec {
            network: "lan".into(),
            mac: None,
            vlan: None,
            rate: Some(12.5),
        };
        same("nic spec", &spec, &NicSpec::from(&spec));
    }
}
