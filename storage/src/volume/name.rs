//! Names of volume groups and logical volumes, and identifiers.
//!
//! Names appear in paths (`lv:VG/NAME`), in the devices file and in metadata, so they are held
//! to a small alphabet: ASCII letters, digits and `+ _ . -`, not starting with `-`, not `.` or
//! `..`, at most [`MAX_NAME_LEN`] bytes. Suffixes that name a thin pool's hidden parts are
//! reserved.

use crate::error::{Result, StorageError};

/// Longest name accepted, in bytes (LVM's limit is 127; ours fits a thin device table entry).
pub const MAX_NAME_LEN: usize = 100;

/// Suffix of a thin pool's hidden data volume.
pub const POOL_DATA_SUFFIX: &str = "_tdata";
/// Suffix of a thin pool's hidden metadata volume.
pub const POOL_META_SUFFIX: &str = "_tmeta";

/// What a name is for, in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    /// A volume group.
    VolumeGroup,
    /// A logical volume.
    LogicalVolume,
    /// A dirty bitmap.
    Bitmap,
}

impl NameKind {
    fn noun(self) -> &'static str {
        match self {
            NameKind::VolumeGroup => "Volume group name",
            NameKind::LogicalVolume => "Logical volume name",
            NameKind::Bitmap => "Bitmap name",
        }
    }
}

/// Checks a name; the error says what is wrong with it.
pub fn check_name(name: &str, kind: NameKind) -> Result<()> {
    let bad = |why: &str| {
        Err(StorageError::InvalidInput(format!(
            "{} '{}' {why}",
            kind.noun(),
            name.escape_debug()
        )))
    };
    if name.is_empty() {
        return Err(StorageError::InvalidInput(format!(
            "{} must not be empty",
            kind.noun()
        )));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorageError::InvalidInput(format!(
            "{} is {} bytes long; the limit is {MAX_NAME_LEN}",
            kind.noun(),
            name.len()
        )));
    }
    if name == "." || name == ".." {
        return bad("is reserved");
    }
    if name.contains('/') {
        return bad("must not contain '/'");
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return bad(&format!("contains the control character {:?}", c));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')))
    {
        return bad(&format!(
            "contains '{c}' (allowed: letters, digits and + _ . -)"
        ));
    }
    if name.starts_with('-') {
        return bad("must not start with '-'");
    }
    if kind == NameKind::LogicalVolume
        && (name.ends_with(POOL_DATA_SUFFIX) || name.ends_with(POOL_META_SUFFIX))
    {
        return bad(&format!(
            "ends with {POOL_DATA_SUFFIX} or {POOL_META_SUFFIX}, which are reserved for thin pools"
        ));
    }
    Ok(())
}

/// Splits `VG/NAME` into its parts, checking both.
pub fn split_lv_path(path: &str) -> Result<(&str, &str)> {
    let (vg, lv) = path.split_once('/').ok_or_else(|| {
        StorageError::InvalidInput(format!(
            "'{}' is not a volume path: expected VG/NAME",
            path.escape_debug()
        ))
    })?;
    check_name(vg, NameKind::VolumeGroup)?;
    check_name(lv, NameKind::LogicalVolume)?;
    Ok((vg, lv))
}

/// A new random identifier: 32 lowercase hex digits.
pub fn new_uuid() -> String {
    let hi = fastrand::u64(..);
    let lo = fastrand::u64(..);
    format!("{hi:016x}{lo:016x}")
}

/// Whether `s` looks like an identifier made by [`new_uuid`].
pub fn is_uuid(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Seconds since the epoch, for creation times.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_pass() {
        for n in ["vg0", "vm-100-disk-0", "a.b_c+d", "X"] {
            check_name(n, NameKind::LogicalVolume).unwrap();
        }
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for (n, why) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("..", "reserved"),
            (".", "reserved"),
            ("-x", "start with"),
            ("a\nb", "control"),
            ("a b", "' '"),
            ("é", "'é'"),
            (long.as_str(), "limit"),
            ("pool_tdata", "reserved"),
        ] {
            let e = check_name(n, NameKind::LogicalVolume)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{n:?}: {e}");
        }
    }

    #[test]
    fn lv_paths_split() {
        assert_eq!(split_lv_path("vg/lv").unwrap(), ("vg", "lv"));
        assert!(split_lv_path("vg").is_err());
        assert!(split_lv_path("vg/a/b").is_err());
        assert!(split_lv_path("../x").is_err());
    }

    #[test]
    fn uuids_are_hex() {
        let u = new_uuid();
        assert!(is_uuid(&u), "{u}");
        assert_ne!(u, new_uuid());
    }
}
