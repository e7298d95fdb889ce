//! `strata backup …`: the deduplicating datastore (strata-backup) from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use strata_backup::gc::DEFAULT_GRACE_SECS;
use strata_backup::pipeline::PipelineOptions;
use strata_backup::prune::KeepRules;
use strata_backup::restore::RestoreOptions;
use strata_backup::{snapshot, BackupOptions, ChangeTracker, Changes, Datastore, Progress};
use strata_storage::format::{ImageFormat, OpenOptions};
use strata_storage::io::engine::EngineChoice;
use strata_storage::io::file::CacheMode;
use strata_storage::source::{open_source, Source};
use strata_storage::util::format_size;

use super::image::{CacheArg, FormatArg};
use super::Output;

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Create an empty datastore folder (create also does this on first use).
    Init(super::backup_stores::InitArgs),
    /// Back up an image or volume into a datastore: full the first time, then incremental.
    Create(CreateArgs),
    /// Restore a snapshot to a new image or onto an existing image or volume.
    Restore(RestoreArgs),
    /// List snapshots.
    List(ListArgs),
    /// Show a snapshot's manifest.
    Show(ShowArgs),
    /// Check snapshots and every chunk they reference.
    Verify(VerifyArgs),
    /// Remove snapshots that no keep rule selects.
    Prune(PruneArgs),
    /// Remove chunks no snapshot references (safe while backups run); in an S3 datastore,
    /// delete dead packs and rewrite sparse ones.
    Gc(GcArgs),
    /// Encryption keys for datastores.
    #[command(subcommand)]
    Key(super::backup_stores::KeyCommand),
    /// Copy snapshots from one datastore to another (local to S3, S3 to local), transferring
    /// only the chunks the target lacks.
    Sync(super::backup_stores::SyncArgs),
}

#[derive(Debug, Args)]
pub struct KeyArg {
    /// Key file of an encrypted datastore (`strata backup key create`).
    #[arg(long, value_name = "FILE")]
    pub(super) key: Option<PathBuf>,
    /// Passphrase of the key file (first line of this file).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub(super) passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StoreArg {
    /// The datastore folder (for an S3 datastore: its local cache folder).
    #[arg(long = "store", short = 's')]
    pub(super) store: PathBuf,
    #[command(flatten)]
    pub(super) key: KeyArg,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// What to back up: an image file, or lv:VG/NAME.
    source: String,
    #[command(flatten)]
    store: StoreArg,
    /// Snapshot group, e.g. volume/vg0/vm-100-disk-0 (default: derived from the source).
    #[arg(long)]
    id: Option<String>,
    /// Dirty byte ranges since a snapshot ('base ID/TIME' line, then 'OFFSET LENGTH' lines):
    /// only the chunks they touch are read.
    #[arg(long, value_name = "FILE")]
    dirty_ranges: Option<PathBuf>,
    /// zstd level, 0 for no compression.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(0..=19))]
    compress_level: i32,
    /// Hash/compress threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Chunk reads in flight.
    #[arg(long, default_value_t = 8)]
    read_depth: usize,
    /// Page cache use when reading the source.
    #[arg(short = 't', long = "cache", value_enum, default_value = "none")]
    cache: CacheArg,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot (ID/TIME), or a group ID for its latest snapshot.
    snapshot: String,
    #[command(flatten)]
    store: StoreArg,
    /// The target: a new image file, an existing image with --existing, or lv:VG/NAME (an
    /// existing volume of the snapshot's size).
    target: PathBuf,
    /// Format of the new image.
    #[arg(short = 'O', long = "target-format", value_enum, default_value = "raw")]
    target_format: FormatArg,
    /// Write onto an existing image or volume of the snapshot's size (like qemu-img convert -n).
    #[arg(short = 'n', long)]
    existing: bool,
    /// Worker threads loading, checking and writing chunks (default: 4 per core; the work is
    /// mostly waiting for the disk).
    #[arg(long)]
    threads: Option<usize>,
    /// For benchmarks (benches/restore.sh): each chunk read into a new vector, decoded into
    /// another and copied into the write buffer, as restores did before they decoded straight
    /// into the buffer they write.
    #[arg(long, hide = true)]
    copied_chunks: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Only this group.
    #[arg(long)]
    id: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The snapshot (ID/TIME), or a group ID for its latest snapshot.
    snapshot: String,
    #[command(flatten)]
    store: StoreArg,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Snapshots (ID/TIME, or a group ID for its latest).
    snapshots: Vec<String>,
    #[command(flatten)]
    store: StoreArg,
    /// Every snapshot in the datastore.
    #[arg(long)]
    all: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Only these groups (default: all).
    #[arg(long)]
    id: Vec<String>,
    /// Keep the N newest snapshots.
    #[arg(long, default_value_t = 0)]
    keep_last: usize,
    /// Keep the newest snapshot of each of the last N days.
    #[arg(long, default_value_t = 0)]
    keep_daily: usize,
    /// Keep the newest snapshot of each of the last N ISO weeks.
    #[arg(long, default_value_t = 0)]
    keep_weekly: usize,
    /// Keep the newest snapshot of each of the last N months.
    #[arg(long, default_value_t = 0)]
    keep_monthly: usize,
    /// Only say what would be removed.
    #[arg(long)]
    dry_run: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Seconds an unreferenced chunk must be older than the oldest running backup to be removed.
    #[arg(long, default_value_t = DEFAULT_GRACE_SECS)]
    grace: u64,
    /// In an S3 datastore: rewrite packs whose live bytes are below this fraction.
    #[arg(long, default_value_t = strata_backup::remote::DEFAULT_REPACK_BELOW)]
    repack_below: f64,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
}

pub fn run(cmd: BackupCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BackupCommand::Init(a) => super::backup_stores::init(a),
        BackupCommand::Key(k) => super::backup_stores::key_command(k),
        BackupCommand::Sync(a) => super::backup_stores::sync(a),
        BackupCommand::Create(a) => create(a),
        BackupCommand::Restore(a) => restore(a),
        BackupCommand::List(a) => list(a),
        BackupCommand::Show(a) => show(a),
        BackupCommand::Verify(a) => verify(a),
        BackupCommand::Prune(a) => prune(a),
        BackupCommand::Gc(a) => gc(a),
    }
}

/// Progress on stderr with indicatif; hidden when stderr is not a terminal or output is JSON.
pub(super) struct Bar(ProgressBar);

impl Bar {
    /// Also routes Ctrl-C to the operation (see [`super::interrupt`]).
    pub(super) fn new(hidden: bool) -> Bar {
        super::interrupt::install();
        let pb = ProgressBar::with_draw_target(
            Some(0),
            if hidden || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                ProgressDrawTarget::hidden()
            } else {
                ProgressDrawTarget::stderr()
            },
        );
        Bar(pb)
    }
}

impl Progress for Bar {
    fn begin(&self, phase: &str, total: u64) {
        let template = if phase == "gc" {
            "{msg:>8} [{bar:40}] {pos}/{len} folders"
        } else {
            "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            self.0.set_style(style.progress_chars("=> "));
        }
        self.0.set_message(phase.to_string());
        self.0.set_length(total);
        self.0.set_position(0);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
    fn cancelled(&self) -> bool {
        super::interrupt::requested()
    }
}

fn open_store(a: &StoreArg) -> anyhow::Result<Datastore> {
    let store = Datastore::open(&a.store)?;
    with_key(store, &a.key)
}

pub(super) fn with_key(store: Datastore, k: &KeyArg) -> anyhow::Result<Datastore> {
    Ok(match &k.key {
        Some(f) => store.with_key(super::backup_stores::load_key(
            f,
            k.passphrase_file.as_deref(),
        )?)?,
        None => store,
    })
}

/// Opens a source or target by name (`FILE` or `lv:VG/NAME`).
fn open_named(spec: &str, read_only: bool, cache: CacheArg) -> anyhow::Result<Source> {
    let opts = OpenOptions {
        format: None,
        read_only,
        cache: cache.into(),
        engine: EngineChoice::Auto,
        references: Default::default(),
    };
    // A volume under restore is refused (a backup would take a partial restore for whole).
    super::refuse_volume_under_restore(spec)?;
    let source = open_source(spec, &opts, &super::data_dir())
        .with_context(|| format!("Could not open {spec}"))?;
    Ok(source)
}

/// The source's format name and, for a volume, its change tracker for this datastore and
/// group: a dirty bitmap for a local volume, RBD snapshots and fast-diff for an RBD volume.
fn tracker_for(
    source: &Source,
    store: &Datastore,
    id: &str,
) -> anyhow::Result<(String, Option<Box<dyn ChangeTracker + Send>>)> {
    match source {
        Source::Image { image, .. } => Ok((image.format().to_string(), None)),
        Source::Volume { vg, name, .. } => {
            let lv = name.split_once('/').map_or(name.as_str(), |(_, lv)| lv);
            let tracker =
                strata_backup::changes::volume_tracker(vg, lv, store, id, format!("lv:{name}"))?;
            Ok(("volume".into(), Some(tracker)))
        }
    }
}

fn create(a: CreateArgs) -> anyhow::Result<ExitCode> {
    let store = Datastore::open_or_create(&a.store.store)?;
    let store = with_key(store, &a.store.key)?;
    let source = open_named(&a.source, true, a.cache)?;
    let id =
        a.id.clone()
            .unwrap_or_else(|| snapshot::default_id(&a.source));
    let (source_format, tracker) = tracker_for(&source, &store, &id)?;
    let changes = match &a.dirty_ranges {
        Some(p) => {
            const MAX_RANGES_FILE: u64 = 512 << 20;
            let len = std::fs::metadata(p)
                .with_context(|| format!("Could not read {}", p.display()))?
                .len();
            if len > MAX_RANGES_FILE {
                bail!(
                    "{} is {len} bytes; dirty-ranges files are limited to {MAX_RANGES_FILE}",
                    p.display()
                );
            }
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("Could not read {}", p.display()))?;
            Changes::parse_ranges_file(&text, &format!("dirty-ranges {}", p.display()))?
        }
        None => Changes::Untracked,
    };
    let mut pipeline = PipelineOptions {
        read_depth: a.read_depth,
        compress_level: a.compress_level,
        ..Default::default()
    };
    if let Some(t) = a.threads {
        pipeline.workers = t.max(1);
    }
    let use_tracker = a.dirty_ranges.is_none();
    let opts = BackupOptions {
        id,
        source_label: a.source.clone(),
        source_format,
        changes,
        pipeline,
    };
    let bar = Bar::new(a.quiet || a.output == Output::Json);
    let dev = source.device();
    let out = match tracker {
        Some(mut t) if use_tracker => {
            strata_backup::create_tracked(&store, dev, &opts, t.as_mut(), &bar)?
        }
        _ => strata_backup::create(&store, dev, &opts, &bar)?,
    };
    let m = &out.manifest;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(m)?),
        Output::Human => {
            let s = &m.stats;
            if let Some(r) = &m.change_tracking.fallback_reason {
                println!("Full read: {r}");
            }
            println!("Snapshot {} ({})", out.snapshot, m.change_tracking.mode);
            println!(
                "read {} in {:.2} s ({:.0} MiB/s of source); chunks: {} new, {} reused, {} from parent, {} zero; stored {} (dedup ratio {:.1})",
                format_size(s.bytes_read),
                s.duration_secs,
                s.throughput_mib_s,
                s.chunks_new,
                s.chunks_reused,
                s.chunks_from_parent,
                s.chunks_zero,
                format_size(s.bytes_stored),
                s.dedup_ratio.unwrap_or(0.0)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn restore(a: RestoreArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let name = store.resolve(&a.snapshot)?;
    let target_str = a.target.display().to_string();
    let fmt: ImageFormat = a.target_format.into();
    let bar = Bar::new(a.quiet || a.output == Output::Json);
    let mut opts = RestoreOptions::default();
    if let Some(t) = a.threads {
        opts.workers = t.clamp(1, strata_backup::restore::MAX_WORKERS);
    }
    if a.copied_chunks {
        opts.path = strata_backup::restore::ChunkPath::Copied;
    }
    // A volume always exists already: restore onto it.
    let existing = a.existing || target_str.starts_with("lv:");
    let result = if existing {
        opts.fresh_target = false;
        let target = open_named(&target_str, false, CacheArg::None)?;
        strata_backup::restore::restore(&store, &name, target.device(), opts, &bar)
            .with_context(|| format!("Restore failed; {target_str} is partly written"))
    } else {
        let open = OpenOptions {
            format: Some(fmt),
            read_only: false,
            cache: CacheMode::None,
            engine: EngineChoice::Auto,
            references: Default::default(),
        };
        let r = strata_backup::restore::restore_into_new_image(
            &store, &name, &a.target, &open, opts, &bar,
        )
        .with_context(|| format!("Could not restore into {target_str}"));
        r
    };
    let stats = result?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
        Output::Human => println!(
            "Restored {} to {target_str}: {} written in {:.2} s ({:.0} MiB/s), {} zero chunks left sparse",
            stats.snapshot,
            format_size(stats.bytes_written),
            stats.duration_secs,
            stats.throughput_mib_s,
            stats.chunks_zero
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn list(a: ListArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let names = match &a.id {
        Some(id) => store.list_group(id)?,
        None => store.list()?,
    };
    let mut rows = Vec::new();
    for n in &names {
        let m = store.read_manifest(n);
        rows.push((n.to_string(), m));
    }
    match a.output {
        Output::Json => {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .map(|(n, m)| match m {
                    Ok(m) => serde_json::json!({
                        "snapshot": n, "size": m.size, "mode": m.change_tracking.mode,
                        "bytes-stored": m.stats.bytes_stored, "source": m.source,
                    }),
                    Err(e) => serde_json::json!({"snapshot": n, "error": e.to_string()}),
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Human => {
            for (n, m) in rows {
                match m {
                    Ok(m) => println!(
                        "{n}  {}  {}  stored {}",
                        format_size(m.size),
                        m.change_tracking.mode,
                        format_size(m.stats.bytes_stored)
                    ),
                    Err(e) => println!("{n}  DAMAGED: {e}"),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show(a: ShowArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let name = store.resolve(&a.snapshot)?;
    let m = store.read_manifest(&name)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&m)?),
        Output::Human => {
            println!("snapshot: {}", m.snapshot);
            println!("source: {} ({})", m.source, m.source_format);
            println!("size: {} ({} bytes)", format_size(m.size), m.size);
            println!(
                "chunks: {} of {}",
                m.chunk_count,
                format_size(m.chunk_size as u64)
            );
            println!("parent: {}", m.parent.as_deref().unwrap_or("-"));
            println!("mode: {}", m.change_tracking.mode);
            if let Some(b) = &m.change_tracking.bitmap {
                println!("change tracking: {b}");
            }
            if let Some(r) = &m.change_tracking.fallback_reason {
                println!("full read because: {r}");
            }
            println!("{}", serde_json::to_string_pretty(&m.stats)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let names = if a.all {
        if !a.snapshots.is_empty() {
            bail!("Give either --all or snapshot names, not both");
        }
        store.list()?
    } else {
        if a.snapshots.is_empty() {
            bail!("Name the snapshots to verify, or give --all");
        }
        a.snapshots
            .iter()
            .map(|s| store.resolve(s))
            .collect::<Result<Vec<_>, _>>()?
    };
    // Reading chunks is mostly waiting for the disk: several workers per core.
    let workers = 4 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let bar = Bar::new(a.quiet || a.output == Output::Json);
    let report = strata_backup::verify::verify(&store, &names, workers, &bar)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => {
            for s in &report.snapshots {
                if s.ok {
                    println!("{}: ok", s.snapshot);
                } else {
                    println!("{}: FAILED", s.snapshot);
                    for e in &s.errors {
                        println!("  {e}");
                    }
                    for c in &s.bad_chunks {
                        println!("  bad chunk {c}");
                    }
                }
            }
            for c in &report.bad_chunks {
                println!(
                    "chunk {}: {} (used by {})",
                    c.digest,
                    c.error,
                    c.snapshots.join(", ")
                );
            }
            println!(
                "{} snapshots, {} chunks ({}) checked",
                report.snapshots.len(),
                report.chunks_checked,
                format_size(report.bytes_checked)
            );
        }
    }
    if report.ok() {
        Ok(ExitCode::SUCCESS)
    } else {
        let bad = report.snapshots.iter().filter(|s| !s.ok).count();
        eprintln!("strata: verification failed: {bad} damaged snapshot(s)");
        Ok(ExitCode::FAILURE)
    }
}

fn prune(a: PruneArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let rules = KeepRules {
        last: a.keep_last,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
    };
    let decisions = strata_backup::prune::prune(&store, &a.id, rules, a.dry_run)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&decisions)?),
        Output::Human => {
            for d in &decisions {
                let what = match (&d.keep, &d.skipped, a.dry_run) {
                    (true, _, _) => format!("keep ({})", d.rule),
                    (false, Some(why), _) => format!("not removed: {why}"),
                    (false, None, true) => "would remove".to_string(),
                    (false, None, false) => "removed".to_string(),
                };
                println!("{}  {what}", d.snapshot);
            }
        }
    }
    if decisions.iter().any(|d| d.skipped.is_some()) {
        eprintln!("strata: some snapshots were in use and were not removed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn gc(a: GcArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&a.store)?;
    let bar = Bar::new(a.output == Output::Json);
    if !(0.0..=1.0).contains(&a.repack_below) {
        bail!("--repack-below is a fraction from 0 to 1");
    }
    let stats = strata_backup::gc::gc_with(&store, a.grace, a.repack_below, &bar)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
        Output::Human => println!(
            "{} snapshots reference {} chunks; removed {} chunks ({}), kept {} recent, rescued {}, cleaned {} leftovers",
            stats.snapshots,
            stats.chunks_referenced,
            stats.chunks_removed,
            format_size(stats.bytes_removed),
            stats.chunks_recent,
            stats.chunks_rescued,
            stats.leftovers_removed
        ),
    }
    if let (Some(p), Output::Human) = (&stats.packs, a.output) {
        println!(
            "packs: {} before, {} removed, {} rewritten ({} chunks moved), {} orphan indexes removed",
            p.packs, p.packs_removed, p.packs_repacked, p.chunks_moved, p.orphan_indexes_removed
        );
    }
    Ok(ExitCode::SUCCESS)
}
