//! Snapshot names (`volume/vg0/vm-100-disk-0/2026-11-27T05:00:00Z`: a group id of one or more
//! path components, then a UTC time) and finding snapshots in a datastore.
//!
//! A snapshot exists once its directory `snapshots/ID/TIME/` exists: it is built under a hidden
//! staging name in the same group directory and renamed into place only after its index and
//! manifest are durable, so a listing never sees a partial snapshot.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};

use strata_storage::{Result, StorageError};

use crate::fsutil::io_err;
use crate::time::{self, Epoch};

/// Most components a group id may have.
pub const MAX_ID_COMPONENTS: usize = 8;
/// Longest component.
pub const MAX_COMPONENT_LEN: usize = 128;

/// A snapshot's name: its group id and its time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SnapshotName {
    id: String,
    time: Epoch,
}

impl SnapshotName {
    /// A name from a checked id and a time.
    pub fn new(id: &str, time: Epoch) -> Result<SnapshotName> {
        check_id(id)?;
        Ok(SnapshotName {
            id: id.to_string(),
            time,
        })
    }

    /// Parses `ID/TIME`.
    pub fn parse(text: &str) -> Result<SnapshotName> {
        let (id, t) = text.rsplit_once('/').ok_or_else(|| {
            StorageError::InvalidInput(format!(
                "'{text}' is not a snapshot name like volume/vg0/vm-100-disk-0/2026-11-27T05:00:00Z"
            ))
        })?;
        SnapshotName::new(id, time::parse(t)?)
    }

    /// The group id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The time in seconds since the epoch.
    pub fn time(&self) -> Epoch {
        self.time
    }

    /// The directory of this snapshot under a datastore's `snapshots/` directory.
    pub fn rel_path(&self) -> PathBuf {
        Path::new(&self.id).join(time::format(self.time))
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.id, time::format(self.time))
    }
}

impl PartialOrd for SnapshotName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SnapshotName {
    fn cmp(&self, other: &Self) -> Ordering {
        (&self.id, self.time).cmp(&(&other.id, other.time))
    }
}

fn component_ok(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= MAX_COMPONENT_LEN
        && !c.starts_with('.')
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+' | b':'))
}

/// Checks a group id: 1 to 8 `/`-separated components of letters, digits and `-_.+:`, none
/// starting with a dot, the last not a timestamp.
pub fn check_id(id: &str) -> Result<()> {
    let parts: Vec<&str> = id.split('/').collect();
    let bad = |why: &str| StorageError::InvalidInput(format!("Invalid backup id '{id}': {why}"));
    if parts.len() > MAX_ID_COMPONENTS {
        return Err(bad("too many components"));
    }
    if !parts.iter().all(|c| component_ok(c)) {
        return Err(bad(
            "components are letters, digits and -_.+: and do not start with a dot",
        ));
    }
    if parts.last().is_some_and(|c| time::parse(c).is_ok()) {
        return Err(bad("it ends in a timestamp"));
    }
    Ok(())
}

/// A group id for a source when none is given: `volume/VG/NAME` for `lv:VG/NAME`, else
/// `image/FILENAME` with unsafe characters replaced by `_`.
pub fn default_id(source: &str) -> String {
    let clean = |s: &str| -> String {
        let c: String = s
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | '+') {
                    ch
                } else {
                    '_'
                }
            })
            .collect();
        let c = c.trim_start_matches('.').to_string();
        if c.is_empty() {
            "source".into()
        } else {
            c.chars().take(MAX_COMPONENT_LEN).collect()
        }
    };
    if let Some(lv) = source.strip_prefix("lv:") {
        let mut parts = lv.splitn(2, '/');
        let vg = parts.next().unwrap_or("");
        let name = parts.next().unwrap_or("");
        return format!("volume/{}/{}", clean(vg), clean(name));
    }
    let name = Path::new(source)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("image/{}", clean(&name))
}

/// Every complete snapshot under `snapshots_dir`, sorted by id then time.
pub fn list_all(snapshots_dir: &Path) -> Result<Vec<SnapshotName>> {
    let mut out = Vec::new();
    walk(snapshots_dir, String::new(), 0, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, prefix: String, depth: usize, out: &mut Vec<SnapshotName>) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("Listing", dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| io_err("Listing", dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !ent.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if let (false, Ok(t)) = (prefix.is_empty(), time::parse(&name)) {
            out.push(SnapshotName {
                id: prefix.clone(),
                time: t,
            });
        } else if depth < MAX_ID_COMPONENTS && component_ok(&name) {
            let id = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            walk(&ent.path(), id, depth + 1, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        let n = SnapshotName::parse("volume/vg0/vm-100-disk-0/2026-11-27T05:00:00Z").unwrap();
        assert_eq!(n.id(), "volume/vg0/vm-100-disk-0");
        assert_eq!(
            n.to_string(),
            "volume/vg0/vm-100-disk-0/2026-11-27T05:00:00Z"
        );
        for bad in [
            "2026-11-27T05:00:00Z",
            "a/../b/2026-11-27T05:00:00Z",
            "a//b/2026-11-27T05:00:00Z",
            "a/b",
            "a b/2026-11-27T05:00:00Z",
            "/a/2026-11-27T05:00:00Z",
        ] {
            assert!(SnapshotName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_ids() {
        assert_eq!(
            default_id("lv:vg0/vm-100-disk-0"),
            "volume/vg0/vm-100-disk-0"
        );
        assert_eq!(default_id("/var/lib/x y.qcow2"), "image/x_y.qcow2");
        assert_eq!(default_id("/"), "image/source");
        check_id(&default_id("/tmp/.hidden")).unwrap();
    }

    #[test]
    fn listing_skips_hidden_and_incomplete_names() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        for p in [
            "image/a/2026-11-27T05:00:00Z",
            "image/a/2026-11-28T05:00:00Z",
            "image/a/.tmp-2026-11-29T05:00:00Z-1",
            "volume/vg/b/2026-01-01T00:00:00Z",
        ] {
            std::fs::create_dir_all(s.join(p)).unwrap();
        }
        let names: Vec<String> = list_all(s).unwrap().iter().map(|n| n.to_string()).collect();
        assert_eq!(
            names,
            [
                "image/a/2026-11-27T05:00:00Z",
                "image/a/2026-11-28T05:00:00Z",
                "volume/vg/b/2026-01-01T00:00:00Z"
            ]
        );
    }
}
