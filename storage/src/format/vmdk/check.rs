//! `strata image check` for vmdk: every sparse extent's grain directory and grain tables, their
//! redundant copies, the grains they point at and overlaps between all of these; flat extents
//! against the length of their files. Findings are counted as qemu-img counts them (corruptions,
//! check errors), in a [`CheckReport`].
//!
//! qemu-img's own vmdk check stops at the first grain that lies past the end of its file
//! ("Check failed"); this one goes on and also reports what it does not look at: tables past
//! the end of the file, grains in the metadata, grains or tables that overlap, redundant tables
//! that differ from the primary ones, and stream markers that name the wrong grain.
//!
//! Repairs (`-r all`; qemu-img repairs nothing in a vmdk) use the redundant copy the format
//! keeps for this. A table is *sound* when every entry can be a grain (unallocated, zeroed, or
//! a sector past the metadata inside the file). A redundant table that is missing or unusable,
//! or merely behind a sound primary (entries the primary has and it lacks: what a crash between
//! the two write-backs leaves), is rewritten from the primary; a primary table that is unusable
//! or unsound while its redundant copy is sound is restored from the copy (written at the end
//! of the file, then the directory entry, each synced). Two sound tables that map a grain
//! differently are reported and both kept, as is a grain entry that points at the wrong place:
//! guessing could only lose data.

use crate::error::Result;
use crate::format::qcow2::check::{CheckReport, Repair};
use crate::format::vmdk::header::{parse_grain_marker, SECTOR};
use crate::format::vmdk::image::Backing;
use crate::format::vmdk::sparse::{read_u32s, SparseExtent};
use crate::format::vmdk::VmdkImage;

/// Most grains and tables whose places are compared for overlaps (16 bytes each).
const MAX_REGIONS: usize = 32 << 20;
/// Most findings listed one by one; the counts include the rest.
const MAX_MESSAGES: usize = 1000;

/// What occupies a range of an extent file.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Header,
    Descriptor,
    Directory,
    RedundantDirectory,
    Table(u32),
    RedundantTable(u32),
    Grain(u64),
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Header => write!(f, "the header"),
            Kind::Descriptor => write!(f, "the embedded descriptor"),
            Kind::Directory => write!(f, "the grain directory"),
            Kind::RedundantDirectory => write!(f, "the redundant grain directory"),
            Kind::Table(i) => write!(f, "grain table {i}"),
            Kind::RedundantTable(i) => write!(f, "redundant grain table {i}"),
            Kind::Grain(g) => write!(f, "grain {g}"),
        }
    }
}

struct Findings<'r> {
    r: &'r mut CheckReport,
    file: String,
    /// Count findings without listing them.
    quiet: bool,
}

impl Findings<'_> {
    fn corrupt(&mut self, what: String) {
        self.r.corruptions += 1;
        self.say(format!("ERROR {}: {what}", self.file));
    }

    fn fixed(&mut self, what: String) {
        self.r.corruptions_fixed += 1;
        self.say(format!("Repairing {}: {what}", self.file));
    }

    fn say(&mut self, line: String) {
        if !self.quiet && self.r.messages.len() < MAX_MESSAGES {
            self.r.messages.push(line);
        }
    }
}

/// Checks `img` and repairs what `repair` asks for (see the module documentation). Repairs
/// need the image opened writable; streamOptimized images are never writable.
pub fn check(img: &VmdkImage, repair: Repair) -> Result<CheckReport> {
    let inner = &img.inner;
    let mut r = CheckReport {
        filename: inner.name.clone(),
        format: "vmdk".into(),
        ..CheckReport::default()
    };
    for (i, placed) in inner.extents.iter().enumerate() {
        match &placed.backing {
            Backing::Sparse { ext, .. } => check_sparse(ext, repair, &mut r)?,
            Backing::Flat { file, base } => {
                let Some(f) = inner.files.get(*file) else {
                    continue;
                };
                let need = base.saturating_add(placed.len);
                if f.len() < need {
                    let mut out = Findings {
                        file: f.name().to_string(),
                        r: &mut r,
                        quiet: false,
                    };
                    out.corrupt(format!(
                        "flat extent {i} needs {need} bytes; the file has {}",
                        f.len()
                    ));
                }
            }
            Backing::Zero => {}
        }
    }
    Ok(r)
}

/// A table's place if the directory entry `sector` names a usable one: inside the file and
/// not in the header. `Err` says why not.
fn table_place(ext: &SparseExtent, sector: u32) -> std::result::Result<Option<u64>, String> {
    if sector == 0 {
        return Ok(None);
    }
    let h = ext.header();
    let at = u64::from(sector) * SECTOR;
    if at + h.gt_bytes() > ext.file().len() {
        return Err(format!("lies beyond the end of the file (sector {sector})"));
    }
    Ok(Some(at))
}

fn read_table(ext: &SparseExtent, at: u64) -> Result<Vec<u32>> {
    read_u32s(ext.file(), at, u64::from(ext.header().gtes_per_gt))
}

/// One directory entry's tables after checking (and perhaps repairing) them.
struct Pair {
    primary: Option<(u64, Vec<u32>)>,
    redundant: Option<(u64, Vec<u32>)>,
}

fn check_sparse(ext: &SparseExtent, repair: Repair, r: &mut CheckReport) -> Result<()> {
    let h = ext.header().clone();
    let file_len = ext.file().len();
    let mut out = Findings {
        file: ext.file().name().to_string(),
        r,
        quiet: false,
    };
    let fix = repair == Repair::All;
    let grains = (h.capacity * SECTOR).div_ceil(h.grain_bytes().max(1));
    out.r.total_clusters += grains;
    let mut regions: Vec<(u64, u64, Kind)> = vec![(0, SECTOR, Kind::Header)];
    if h.descriptor_offset != 0 {
        let at = h.descriptor_offset * SECTOR;
        regions.push((at, at + h.descriptor_size * SECTOR, Kind::Descriptor));
    }
    let gd_bytes = h.gd_bytes();
    regions.push((
        h.gd_offset * SECTOR,
        h.gd_offset * SECTOR + gd_bytes,
        Kind::Directory,
    ));
    if h.redundant_gd() {
        let at = h.rgd_offset * SECTOR;
        regions.push((at, at + gd_bytes, Kind::RedundantDirectory));
    }
    let (gd, rgd) = ext.directories()?;
    let mut truncated = false;
    for (i, &sector) in gd.iter().enumerate() {
        let pair = check_pair(ext, &mut out, i, sector, rgd.get(i).copied(), fix)?;
        let Some((at, table)) = pair.primary else {
            continue;
        };
        regions.push((at, at + h.gt_bytes(), Kind::Table(i as u32)));
        if let Some((rat, _)) = pair.redundant {
            regions.push((rat, rat + h.gt_bytes(), Kind::RedundantTable(i as u32)));
        }
        let listed_before = out.r.messages.len();
        for (j, &e) in table.iter().enumerate() {
            if out.r.messages.len() > listed_before + 8 {
                out.quiet = true;
            }
            let g = i as u64 * u64::from(h.gtes_per_gt) + j as u64;
            if e == 0 || g >= grains {
                continue;
            }
            if e == 1 && h.zeroed_grain() {
                continue;
            }
            out.r.allocated_clusters += 1;
            let at = u64::from(e) * SECTOR;
            if u64::from(e) < h.overhead.max(1) {
                out.corrupt(format!(
                    "grain {g} at sector {e} lies in the metadata before the first grain"
                ));
                continue;
            }
            if at >= file_len {
                out.corrupt(format!(
                    "grain {g} at sector {e} points after the end of the file"
                ));
                continue;
            }
            let end = if h.compressed() {
                out.r.compressed_clusters += 1;
                match compressed_grain_end(ext, at, g) {
                    Ok(end) => end,
                    Err(why) => {
                        out.corrupt(format!("grain {g} at sector {e}: {why}"));
                        continue;
                    }
                }
            } else {
                at + h.grain_bytes()
            };
            if regions.len() >= MAX_REGIONS {
                truncated = true;
                continue;
            }
            regions.push((at, end, Kind::Grain(g)));
        }
        if out.quiet {
            out.quiet = false;
            out.say(format!(
                "ERROR {}: grain table {i} has more bad entries than listed",
                out.file
            ));
        }
    }
    if truncated {
        out.r.check_errors += 1;
        out.say(format!(
            "ERROR {}: more than {MAX_REGIONS} grains; overlaps were not checked",
            out.file
        ));
        return Ok(());
    }
    report_overlaps(&mut out, regions);
    Ok(())
}

/// The end of the compressed grain whose marker is at `at`; checks that the marker names grain
/// `g` and that its data lies inside the file.
fn compressed_grain_end(ext: &SparseExtent, at: u64, g: u64) -> std::result::Result<u64, String> {
    let h = ext.header();
    let mut m = [0u8; 12];
    ext.file()
        .read_exact_at(at, &mut m)
        .map_err(|e| format!("its marker cannot be read: {e}"))?;
    let (lba, size) = parse_grain_marker(&m);
    if lba != g * h.grain_sectors {
        return Err(format!(
            "its marker names sector {lba}, not {}",
            g * h.grain_sectors
        ));
    }
    let end = at + 12 + u64::from(size);
    if size == 0 || end > ext.file().len() {
        return Err(format!(
            "its {size} compressed bytes run past the end of the file"
        ));
    }
    Ok(end)
}

/// Whether every entry of `table` can be a grain: unallocated, a zeroed grain, or a sector
/// past the metadata and inside the file. A table read from the wrong place (another table, a
/// grain, the descriptor) almost never is.
fn sound(ext: &SparseExtent, table: &[u32]) -> bool {
    let h = ext.header();
    let sectors = ext.file().len().div_ceil(SECTOR);
    table.iter().all(|&e| {
        e == 0
            || (e == 1 && h.zeroed_grain())
            || (u64::from(e) >= h.overhead.max(1) && u64::from(e) < sectors)
    })
}

/// Checks directory entry `i` of the primary directory (`sector`) and of the redundant one,
/// and repairs one table from the other where `fix` allows: the primary wins when both are
/// sound; a sound table replaces an unusable or unsound one.
fn check_pair(
    ext: &SparseExtent,
    out: &mut Findings<'_>,
    i: usize,
    sector: u32,
    redundant_sector: Option<u32>,
    fix: bool,
) -> Result<Pair> {
    let mut primary = None;
    let mut primary_bad = false;
    match table_place(ext, sector) {
        Ok(Some(at)) => primary = Some((at, read_table(ext, at)?)),
        Ok(None) => {}
        Err(why) => {
            primary_bad = true;
            out.corrupt(format!("grain table {i} {why}"));
        }
    }
    let Some(rsector) = redundant_sector else {
        return Ok(Pair {
            primary,
            redundant: None,
        });
    };
    let mut redundant = None;
    let mut redundant_bad = false;
    match table_place(ext, rsector) {
        Ok(Some(at)) if primary.as_ref().is_some_and(|(p, _)| *p == at) => {
            redundant_bad = true;
            out.corrupt(format!(
                "redundant grain table {i} is the primary table itself"
            ));
        }
        Ok(Some(at)) => redundant = Some((at, read_table(ext, at)?)),
        Ok(None) => {}
        Err(why) => {
            redundant_bad = true;
            out.corrupt(format!("redundant grain table {i} {why}"));
        }
    }
    let primary_sound = primary.as_ref().is_some_and(|(_, t)| sound(ext, t));
    let redundant_sound = redundant.as_ref().is_some_and(|(_, t)| sound(ext, t));
    match (&primary, &redundant) {
        (Some((_, t)), Some((rat, rt))) if t != rt => {
            // The redundant copy is written after the primary one: a crash can leave it
            // behind (entries still unallocated), never ahead or different.
            let behind = t.iter().zip(rt.iter()).all(|(&a, &b)| a == b || b == 0);
            if primary_sound && behind {
                if fix {
                    ext.repair_table_in_place(*rat, t)?;
                    out.fixed(format!(
                        "redundant grain table {i} differed from the primary; rewritten from it"
                    ));
                    redundant = Some((*rat, t.clone()));
                } else {
                    out.corrupt(format!(
                        "redundant grain table {i} differs from the primary"
                    ));
                }
            } else if redundant_sound {
                if fix {
                    ext.repair_table_appended(false, i, rt)?;
                    out.fixed(format!(
                        "grain table {i} was damaged; restored from its redundant copy"
                    ));
                    primary = Some((table_at(ext, false, i)?, rt.clone()));
                } else {
                    out.corrupt(format!(
                        "grain table {i} is damaged and differs from its sound redundant copy"
                    ));
                }
            } else {
                out.corrupt(format!(
                    "grain table {i} and its redundant copy map grains differently"
                ));
            }
        }
        (Some((_, t)), None) => {
            if !redundant_bad {
                out.corrupt(format!("the redundant grain directory has no table {i}"));
            }
            if fix && primary_sound {
                ext.repair_table_appended(true, i, t)?;
                out.r.corruptions -= 1;
                out.fixed(format!(
                    "redundant grain table {i} written from the primary"
                ));
                redundant = Some((table_at(ext, true, i)?, t.clone()));
            }
        }
        (None, Some((_, rt))) if primary_bad && fix && redundant_sound => {
            ext.repair_table_appended(false, i, rt)?;
            out.r.corruptions -= 1;
            out.fixed(format!("grain table {i} restored from its redundant copy"));
            primary = Some((table_at(ext, false, i)?, rt.clone()));
        }
        (None, Some(_)) if primary_bad => {}
        (None, Some(_)) => out.corrupt(format!(
            "the redundant grain directory has table {i}, the primary has none"
        )),
        _ => {}
    }
    Ok(Pair { primary, redundant })
}

/// Where directory entry `i` of the primary (or redundant) directory now points.
fn table_at(ext: &SparseExtent, redundant: bool, i: usize) -> Result<u64> {
    let (gd, rgd) = ext.directories()?;
    let dir = if redundant { rgd } else { gd };
    Ok(dir.get(i).map_or(0, |&s| u64::from(s) * SECTOR))
}

/// Reports every region that starts inside an earlier one.
fn report_overlaps(out: &mut Findings<'_>, mut regions: Vec<(u64, u64, Kind)>) {
    regions.sort_unstable_by_key(|&(start, end, _)| (start, end));
    let mut reach: Option<(u64, Kind)> = None;
    for (start, end, kind) in regions {
        if let Some((until, other)) = reach {
            if start < until {
                out.corrupt(format!("{kind} at byte {start:#x} overlaps {other}"));
                if end > until {
                    reach = Some((end, kind));
                }
                continue;
            }
        }
        reach = Some((end, kind));
    }
}
