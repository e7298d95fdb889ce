//! `strata image check` for VHDXs, reported as `qemu-img check` reports.
//!
//! Opening verifies the headers, the region table, the metadata and the BAT (states, bounds, no
//! overlaps). The check adds: both region table copies must be valid and equal, and a log that
//! needs replaying is a corruption that `-r all` repairs by replaying it (qemu-img's advice too).

use std::path::Path;

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::qcow2::check::{CheckReport, Repair};
use crate::format::vhdx::bat::Payload;
use crate::format::vhdx::header::read_current_header;
use crate::format::vhdx::header::{parse_regions, REGION_OFFSETS, REGION_TABLE_LEN};
use crate::format::vhdx::log::find_replay;
use crate::format::{open_host_file, ImageFormat, OpenOptions};
use crate::io::file::CacheMode;

/// Checks the VHDX at `path`; `Repair::All` replays a pending log and rewrites a damaged region
/// table copy.
pub fn check_file(path: &Path, repair: Repair) -> Result<CheckReport> {
    let fix = repair == Repair::All;
    let opts = OpenOptions {
        format: Some(ImageFormat::Vhdx),
        read_only: !fix,
        cache: CacheMode::Writeback,
        ..OpenOptions::default()
    };
    let mut r = CheckReport {
        filename: path.display().to_string(),
        format: "vhdx".into(),
        ..CheckReport::default()
    };
    let file: SharedFile = open_host_file(path, &opts)?;
    if !fix {
        let (h, _) = read_current_header(file.as_ref())?;
        if let Some(p) = find_replay(file.as_ref(), &h)? {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR the VHDX log holds {} entries that were not replayed (repair with -r all)",
                p.entries
            ));
            return Ok(r);
        }
    }
    let img = super::open(file.clone(), Some(path), &opts)?;
    if img.replayed_entries() > 0 {
        r.corruptions_fixed += 1;
        r.messages.push(format!(
            "Replayed {} VHDX log entries",
            img.replayed_entries()
        ));
    }
    let mut tables = Vec::new();
    for at in REGION_OFFSETS {
        let mut b = vec![0u8; REGION_TABLE_LEN];
        file.read_exact_at(at, &mut b)?;
        let ok = parse_regions(&b, &r.filename, file.len()).is_ok();
        tables.push((at, b, ok));
    }
    if tables[0].1 != tables[1].1 {
        let good = tables.iter().find(|t| t.2).map(|t| t.1.clone());
        match good {
            Some(g) if fix => {
                for (at, b, _) in &tables {
                    if *b != g {
                        file.write_all_at(*at, &g)?;
                    }
                }
                file.sync_data()?;
                r.corruptions_fixed += 1;
                r.messages.push("Rewrote the VHDX region table copy".into());
            }
            _ => {
                r.corruptions += 1;
                r.messages
                    .push("ERROR the two VHDX region table copies differ".into());
            }
        }
    }
    let bat = &img.inner.bat;
    r.total_clusters = bat.data_blocks();
    let mut last: Option<u64> = None;
    for b in 0..bat.data_blocks() {
        if let Payload::Full(at) | Payload::Partial(at) = bat.lookup(b)? {
            r.allocated_clusters += 1;
            if last.is_some_and(|l| l + bat.block_size() != at) {
                r.fragmented_clusters += 1;
            }
            last = Some(at);
        }
    }
    r.image_end_offset = file.len();
    if r.corruptions > 0 && fix {
        return Err(StorageError::corrupt(
            &r.filename,
            "the VHDX could not be repaired",
        ));
    }
    Ok(r)
}
