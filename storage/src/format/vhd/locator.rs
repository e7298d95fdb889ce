//! Parent locators of differencing VHDs: decoding the platform-specific path and resolving it
//! inside the child's folder.
//!
//! | code | data | written by |
//! |---|---|---|
//! | `W2ru` | relative Windows path, UTF-16LE (`.\base.vhd`) | Hyper-V, Strata |
//! | `W2ku` | absolute Windows path, UTF-16LE (`C:\vms\base.vhd`) | Hyper-V, Strata |
//! | `MacX` | UTF-8 file URL or path (`file://./base.vhd`) | XenServer (blktap), Strata |
//!
//! Paths are untrusted: a relative one must stay inside the child's folder (no `..`, no symbolic
//! link leading out), an absolute one is accepted only when it names a file in that folder, and
//! a Windows path with a drive letter cannot name a file here and is skipped. The parent's unique
//! ID in the child's header is checked after opening, so a wrong file is refused, not read.

use std::path::{Path, PathBuf};

use crate::device::HostFile;
use crate::error::{Result, StorageError};
use crate::format::resolve_in_folder;
use crate::format::vhd::dynamic::{DynamicHeader, MAX_LOCATOR_BYTES};

/// A decoded locator: what it says and how to treat it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    /// A path relative to the child's folder.
    Relative(String),
    /// An absolute path on this host.
    Absolute(String),
    /// A path that cannot name a file on this host (a Windows drive path).
    Foreign(String),
}

/// Decodes one locator's data by its platform code; `None` for codes we do not read.
pub fn decode(code: &[u8; 4], data: &[u8]) -> Option<Result<Located>> {
    let text = match code {
        b"W2ku" | b"W2ru" => {
            if data.len() % 2 != 0 {
                return Some(Err(StorageError::corrupt(
                    "VHD parent locator",
                    "UTF-16 data of odd length",
                )));
            }
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            match String::from_utf16(&units) {
                Ok(s) => s,
                Err(_) => {
                    return Some(Err(StorageError::corrupt(
                        "VHD parent locator",
                        "invalid UTF-16",
                    )))
                }
            }
        }
        b"MacX" => match std::str::from_utf8(data) {
            Ok(s) => s.to_string(),
            Err(_) => {
                return Some(Err(StorageError::corrupt(
                    "VHD parent locator",
                    "invalid UTF-8 in a MacX locator",
                )))
            }
        },
        _ => return None,
    };
    let text = text.trim_end_matches('\0').to_string();
    Some(Ok(classify(code, &text)))
}

fn classify(code: &[u8; 4], text: &str) -> Located {
    if code == b"MacX" {
        let path = text
            .strip_prefix("file://localhost")
            .or_else(|| text.strip_prefix("file://"))
            .unwrap_or(text);
        return if path.starts_with('/') {
            Located::Absolute(path.to_string())
        } else {
            Located::Relative(path.to_string())
        };
    }
    classify_windows_path(text)
}

/// Classifies a Windows-style path (backslashes, maybe a drive letter or a UNC name).
pub fn classify_windows_path(text: &str) -> Located {
    let unix = text.replace('\\', "/");
    let b = text.as_bytes();
    if b.len() >= 2 && b[1] == b':' || text.starts_with("\\\\") {
        Located::Foreign(text.to_string())
    } else if unix.starts_with('/') {
        Located::Absolute(unix)
    } else {
        Located::Relative(unix)
    }
}

/// Resolves a decoded locator inside `dir`; `Ok(None)` when it cannot name a file here.
pub fn resolve(dir: &Path, loc: &Located) -> Result<Option<PathBuf>> {
    const WHAT: &str = "VHD parent locator";
    match loc {
        Located::Foreign(_) => Ok(None),
        Located::Relative(p) => resolve_in_folder(dir, p, WHAT).map(Some),
        Located::Absolute(p) => {
            let path = Path::new(p);
            let inside = match (path.canonicalize(), dir.canonicalize()) {
                (Ok(real), Ok(real_dir)) => real.parent() == Some(real_dir.as_path()),
                _ => false,
            };
            if !inside {
                return Err(StorageError::InvalidInput(format!(
                    "{WHAT} '{}' leaves the image's folder {} (or does not exist)",
                    p.escape_debug(),
                    dir.display()
                )));
            }
            Ok(Some(path.to_path_buf()))
        }
    }
}

/// The candidates for the parent of a differencing disk, best first: relative locators, then
/// MacX, then absolute ones, then the parent's name from the header; each resolved inside `dir`.
/// A locator that tries to leave the folder is an error, not skipped.
pub fn parent_candidates(
    file: &dyn HostFile,
    header: &DynamicHeader,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let name = file.name().to_string();
    let mut found: Vec<(u8, PathBuf)> = Vec::new();
    for l in header.locators.iter().filter(|l| l.used()) {
        if l.len == 0 {
            continue;
        }
        if l.len > MAX_LOCATOR_BYTES {
            return Err(StorageError::corrupt(
                &name,
                format!(
                    "parent locator data of {} bytes (at most {MAX_LOCATOR_BYTES})",
                    l.len
                ),
            ));
        }
        let end = l.offset.checked_add(l.len as u64);
        if end.is_none_or(|e| e > file.len()) {
            return Err(StorageError::corrupt(
                &name,
                "a parent locator points beyond the end of the file",
            ));
        }
        let mut data = vec![0u8; l.len as usize];
        file.read_exact_at(l.offset, &mut data)?;
        let Some(loc) = decode(&l.code, &data) else {
            continue;
        };
        let loc = loc.map_err(|e| match e {
            StorageError::Corrupt { detail, .. } => {
                StorageError::corrupt(&name, format!("parent locator: {detail}"))
            }
            other => other,
        })?;
        let rank = match (&l.code, &loc) {
            (_, Located::Relative(_)) => 0,
            (b"MacX", _) => 1,
            _ => 2,
        };
        if let Some(p) = resolve(dir, &loc)? {
            found.push((rank, p));
        }
    }
    if !header.parent_name.is_empty() {
        let n = header.parent_name.replace('\\', "/");
        let base = n.rsplit('/').next().unwrap_or(&n).to_string();
        if !base.is_empty() {
            found.push((3, resolve_in_folder(dir, &base, "VHD parent name")?));
        }
    }
    found.sort_by_key(|(r, _)| *r);
    let mut out: Vec<PathBuf> = Vec::new();
    for (_, p) in found {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// Encodes `text` as UTF-16LE for a `W2ru`/`W2ku` locator.
pub fn utf16le(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_platform() {
        let w = utf16le(".\\base.vhd");
        assert_eq!(
            decode(b"W2ru", &w).unwrap().unwrap(),
            Located::Relative("./base.vhd".into())
        );
        let k = utf16le("C:\\vms\\base.vhd");
        assert!(matches!(
            decode(b"W2ku", &k).unwrap().unwrap(),
            Located::Foreign(_)
        ));
        assert_eq!(
            decode(b"MacX", b"file://./b.vhd").unwrap().unwrap(),
            Located::Relative("./b.vhd".into())
        );
        assert_eq!(
            decode(b"MacX", b"file:///srv/b.vhd\0\0").unwrap().unwrap(),
            Located::Absolute("/srv/b.vhd".into())
        );
        assert!(decode(b"Wi2r", b"x").is_none());
        assert!(decode(b"W2ku", b"abc").unwrap().is_err());
    }

    #[test]
    fn paths_outside_the_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sr");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(dir.path().join("secret.vhd"), b"x").unwrap();
        std::fs::write(sub.join("base.vhd"), b"x").unwrap();
        for loc in [
            Located::Relative("../secret.vhd".into()),
            Located::Absolute(dir.path().join("secret.vhd").display().to_string()),
            Located::Absolute("/etc/passwd".into()),
        ] {
            let e = resolve(&sub, &loc).unwrap_err().to_string();
            assert!(e.contains("leaves the image's folder"), "{e}");
        }
        let abs = Located::Absolute(sub.join("base.vhd").display().to_string());
        assert!(resolve(&sub, &abs).unwrap().is_some());
        assert_eq!(
            resolve(&sub, &Located::Foreign("D:\\x.vhd".into())).unwrap(),
            None
        );
    }
}
