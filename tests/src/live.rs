//! A volume under live restore for the tiers' live-restore rows: an image backed up into a
//! datastore, and a fresh thin volume restored from it live.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use strata_backup::live::{LiveOptions, LiveRestore, RestorePaths};
use strata_backup::{BackupOptions, Changes, Datastore, NoProgress};
use strata_storage::format::{open_image, OpenOptions};
use strata_storage::BlockDevice;

/// A volume under live restore and what it needs kept alive.
#[derive(Debug)]
pub struct LiveVolume {
    /// The live-restore device: what the guest gets.
    pub live: LiveRestore,
    /// The thin volume underneath (for the host's checks once the restore has finished).
    pub volume: Arc<dyn BlockDevice>,
    /// The group holding the volume.
    pub group: strata_storage::volume::Vg,
}

/// Backs up image `source` (any format, opened read-only) into a datastore of `chunk_size`
/// chunks in `dir`, and starts a live restore of it onto a new thin volume of the same size.
/// The background copy is paused, so the guest's reads find chunks not yet restored and are
/// served by fetching them first; [`LiveRestore::copy_to_end`] continues it.
pub fn volume_under_live_restore(dir: &Path, source: &Path, chunk_size: u32) -> Result<LiveVolume> {
    let store = Datastore::create_with_chunk_size(&dir.join("datastore"), chunk_size)?;
    let src = open_image(
        source,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )?;
    let size = src.size();
    let opts = BackupOptions {
        id: "image/tier-source".into(),
        source_label: source.display().to_string(),
        source_format: "raw".into(),
        changes: Changes::Untracked,
        pipeline: Default::default(),
    };
    let snap = strata_backup::create(&store, src, &opts, &NoProgress)?.snapshot;
    let (group, volume) = crate::thin_volume(dir, size)?;
    let paths = RestorePaths::of(&dir.join("data"), "vmtest", "disk");
    let live = LiveRestore::start(
        &store,
        &snap,
        volume.clone(),
        "lv:vmtest/disk",
        &paths,
        LiveOptions {
            workers: 2,
            background: false,
        },
    )?;
    Ok(LiveVolume {
        live,
        volume,
        group,
    })
}

/// Finishes the restore and checks that every byte outside `changed` (ranges the guest wrote)
/// equals `source`.
pub fn finish_and_compare(lv: &LiveVolume, source: &Path, changed: &[(u64, u64)]) -> Result<()> {
    let st = lv.live.copy_to_end(&NoProgress)?;
    anyhow::ensure!(st.finished, "the live restore did not finish: {st:?}");
    let want = std::fs::read(source)?;
    let got = crate::read_device(lv.volume.as_ref(), 0, want.len())?;
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        let i = i as u64;
        if a != b && !changed.iter().any(|&(off, len)| i >= off && i < off + len) {
            anyhow::bail!("byte {i} of the restored volume differs from the backed-up image");
        }
    }
    Ok(())
}
