//! `strata image check` for VHDs, reported as `qemu-img check` reports (which has no VHD check of
//! its own).
//!
//! Opening already verifies the footer and dynamic header checksums, the BAT's bounds and that no
//! two blocks overlap or land on metadata, and the parent chain. The check adds: the footer copy
//! at offset 0 must equal the footer at the end (repair rewrites the copy), and it counts
//! allocated and fragmented blocks and the end of the used file.

use crate::error::Result;
use crate::format::qcow2::check::{CheckReport, Repair};
use crate::format::vhd::footer::{Footer, SECTOR};
use crate::format::vhd::table::BlockState;
use crate::format::vhd::VhdImage;

impl VhdImage {
    /// Checks the image (see the module documentation); `Repair::All` on a writable image
    /// rewrites a footer copy that disagrees with the footer.
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        let v = &self.inner;
        let mut r = CheckReport {
            filename: v.name.clone(),
            format: "vhd".into(),
            ..CheckReport::default()
        };
        let Some(t) = &v.table else {
            r.image_end_offset = v.file.len();
            return Ok(r);
        };
        let mut copy = [0u8; SECTOR as usize];
        v.file.read_exact_at(0, &mut copy)?;
        let mut end = [0u8; SECTOR as usize];
        v.file.read_exact_at(v.file.len() - SECTOR, &mut end)?;
        let footer = v.footer.render();
        let end_at = v.file.len() - SECTOR;
        for (what, bytes, at) in [
            ("copy at offset 0", copy, 0),
            ("footer at the end", end, end_at),
        ] {
            // Compared by what they say: reserved bytes other writers fill do not matter.
            let same = Footer::parse(&bytes, &v.name).is_ok_and(|f| f == v.footer);
            if same {
                continue;
            }
            if repair == Repair::All && v.writable {
                v.file.write_all_at(at, &footer)?;
                v.file.sync_data()?;
                r.corruptions_fixed += 1;
                r.messages.push(format!("Repaired the VHD footer {what}"));
            } else {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR the VHD footer {what} differs from the footer in use"
                ));
            }
        }
        let blocks = v.size.div_ceil(t.block_size());
        r.total_clusters = blocks;
        let span = t.bitmap_bytes() + t.block_size();
        let mut last: Option<u64> = None;
        let mut image_end = 0;
        for b in 0..blocks {
            if let BlockState::At(at) = t.lookup(b)? {
                r.allocated_clusters += 1;
                if last.is_some_and(|l| l + span != at) {
                    r.fragmented_clusters += 1;
                }
                last = Some(at);
                image_end = image_end.max(at + span);
            }
        }
        r.image_end_offset = image_end.max(v.file.len());
        Ok(r)
    }
}
