//! The text descriptor of a vmdk: header keys (`version`, `CID`, `parentCID`, `createType`,
//! `parentFileNameHint`), extent lines and the disk database (`ddb.*`).
//!
//! The parser takes untrusted bytes: it copes with comments, CRLF line ends, quoted and unquoted
//! values and blank lines; it bounds the text (1 MiB), the number of extents and every number it
//! reads, and never panics. Extent file names are resolved by [`resolve_extent_path`], which
//! refuses names that would leave the descriptor's folder.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError};
use crate::format::vmdk::header::{MAX_CAPACITY_BYTES, SECTOR};

/// Largest descriptor accepted.
pub const MAX_DESCRIPTOR_BYTES: usize = 1 << 20;
/// Most extents one descriptor may list.
pub const MAX_EXTENTS: usize = 4096;

/// The layouts (`createType`) this implementation reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse extent holding its own descriptor.
    MonolithicSparse,
    /// A descriptor file and one flat extent.
    MonolithicFlat,
    /// A descriptor file and sparse extents of at most 2 GiB.
    TwoGbMaxExtentSparse,
    /// A descriptor file and flat extents of at most 2 GiB.
    TwoGbMaxExtentFlat,
    /// One sparse extent of compressed grains with markers, written as a stream.
    StreamOptimized,
    /// ESXi's flat layout (`vmfs`): a descriptor and one flat extent.
    Vmfs,
}

impl Subformat {
    /// The `createType` name.
    pub fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
            Subformat::Vmfs => "vmfs",
        }
    }

    /// Parses a `createType` (case-insensitively, as VMware does); unknown and unsupported
    /// layouts are refused by name.
    pub fn parse(s: &str) -> Result<Subformat> {
        let all = [
            Subformat::MonolithicSparse,
            Subformat::MonolithicFlat,
            Subformat::TwoGbMaxExtentSparse,
            Subformat::TwoGbMaxExtentFlat,
            Subformat::StreamOptimized,
            Subformat::Vmfs,
        ];
        all.into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                StorageError::Unsupported(format!(
                    "vmdk createType '{}' (supported: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized, vmfs)",
                    s.escape_debug()
                ))
            })
    }

    /// Whether the layout's extents are flat files.
    pub fn is_flat(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat | Subformat::Vmfs
        )
    }

    /// Whether the descriptor lives inside the (only) sparse extent.
    pub fn embeds_descriptor(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicSparse | Subformat::StreamOptimized
        )
    }
}

/// Access named on an extent line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read-write.
    ReadWrite,
    /// Read-only.
    ReadOnly,
    /// No access.
    NoAccess,
}

/// The type of an extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentType {
    /// A flat file (`FLAT`, or `VMFS` on ESXi).
    Flat,
    /// A hosted sparse extent (`SPARSE`).
    Sparse,
    /// Reads as zeros (`ZERO`).
    Zero,
}

/// One extent line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size in sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentType,
    /// File name relative to the descriptor's folder (empty for `ZERO`).
    pub file: String,
    /// Start of the data within a flat file, in sectors.
    pub offset: u64,
}

/// A parsed descriptor. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Descriptor version (1 to 3).
    pub version: u32,
    /// Content ID, changed whenever the disk is written.
    pub cid: u32,
    /// The parent's content ID (`ffffffff`: no parent).
    pub parent_cid: u32,
    /// The layout.
    pub create_type: Subformat,
    /// The parent's file name, relative to this descriptor's folder.
    pub parent_hint: Option<String>,
    /// Extents in order.
    pub extents: Vec<ExtentLine>,
    /// Disk database entries (`ddb.*`) in order, values unquoted.
    pub ddb: Vec<(String, String)>,
}

/// `parentCID` of a disk without a parent.
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

fn bad(detail: impl Into<String>) -> StorageError {
    StorageError::corrupt("vmdk descriptor", detail)
}

/// Splits a line into tokens: runs of non-blank characters or double-quoted strings (quotes
/// removed). A `#` outside quotes starts a comment. An unterminated quote is an error.
fn tokens(line: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '#' {
            break;
        } else if c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some(ch) => s.push(ch),
                    None => {
                        return Err(bad(format!(
                            "unterminated quote in line '{}'",
                            line.escape_debug()
                        )))
                    }
                }
            }
            out.push(s);
        } else if c == '=' {
            chars.next();
            out.push("=".into());
        } else {
            let mut s = String::new();
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() || ch == '"' || ch == '=' || ch == '#' {
                    break;
                }
                s.push(ch);
                chars.next();
            }
            out.push(s);
        }
    }
    Ok(out)
}

fn parse_hex_cid(v: &str, key: &str) -> Result<u32> {
    u32::from_str_radix(v.trim(), 16).map_err(|_| {
        bad(format!(
            "{key} '{}' is not a 32-bit hexadecimal number",
            v.escape_debug()
        ))
    })
}

fn parse_number(v: &str, what: &str) -> Result<u64> {
    v.parse::<u64>()
        .map_err(|_| bad(format!("{what} '{}' is not a number", v.escape_debug())))
}

fn parse_extent(t: &[String], line: &str) -> Result<ExtentLine> {
    let access = match t[0].to_ascii_uppercase().as_str() {
        "RW" => Access::ReadWrite,
        "RDONLY" => Access::ReadOnly,
        "NOACCESS" => Access::NoAccess,
        _ => return Err(bad(format!("unknown line '{}'", line.escape_debug()))),
    };
    if t.len() < 3 {
        return Err(bad(format!(
            "extent line '{}' is incomplete",
            line.escape_debug()
        )));
    }
    let sectors = parse_number(&t[1], "extent size")?;
    if sectors == 0 {
        return Err(bad("an extent has size zero"));
    }
    let kind = match t[2].to_ascii_uppercase().as_str() {
        "FLAT" | "VMFS" => ExtentType::Flat,
        "SPARSE" => ExtentType::Sparse,
        "ZERO" => ExtentType::Zero,
        other => {
            return Err(StorageError::Unsupported(format!(
                "vmdk extent type {other} (supported: FLAT, VMFS, SPARSE, ZERO)"
            )))
        }
    };
    let (file, offset) = match kind {
        ExtentType::Zero => (String::new(), 0),
        _ => {
            let file = t
                .get(3)
                .ok_or_else(|| {
                    bad(format!(
                        "extent line '{}' names no file",
                        line.escape_debug()
                    ))
                })?
                .clone();
            if file.is_empty() {
                return Err(bad("an extent's file name is empty"));
            }
            let offset = match (kind, t.get(4)) {
                (ExtentType::Flat, Some(o)) => parse_number(o, "extent offset")?,
                _ => 0,
            };
            (file, offset)
        }
    };
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

impl Descriptor {
    /// Parses descriptor text (trailing NUL padding of an embedded descriptor is ignored).
    pub fn parse(bytes: &[u8]) -> Result<Descriptor> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(bad("descriptor is larger than 1 MiB"));
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text =
            std::str::from_utf8(&bytes[..end]).map_err(|_| bad("descriptor is not UTF-8 text"))?;
        let mut version = None;
        let mut cid = None;
        let mut parent_cid = None;
        let mut create_type = None;
        let mut parent_hint = None;
        let mut extents = Vec::new();
        let mut ddb = Vec::new();
        let mut total_sectors: u64 = 0;
        for raw in text.split('\n') {
            let line = raw.trim_end_matches('\r').trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let t = tokens(line)?;
            if t.is_empty() {
                continue;
            }
            if t.len() >= 2 && t[1] == "=" {
                let key = t[0].as_str();
                let value = t.get(2).cloned().unwrap_or_default();
                if t.len() > 3 {
                    return Err(bad(format!(
                        "line '{}' has extra words",
                        line.escape_debug()
                    )));
                }
                match key {
                    "version" => version = Some(parse_number(&value, "version")?),
                    "CID" => cid = Some(parse_hex_cid(&value, "CID")?),
                    "parentCID" => parent_cid = Some(parse_hex_cid(&value, "parentCID")?),
                    "createType" => create_type = Some(Subformat::parse(&value)?),
                    "parentFileNameHint" => parent_hint = Some(value),
                    "encoding" | "isNativeSnapshot" => {}
                    k if k.starts_with("ddb.") => {
                        if ddb.len() >= 1024 {
                            return Err(bad("more than 1024 disk database entries"));
                        }
                        ddb.push((k.to_string(), value));
                    }
                    other => {
                        tracing::debug!(key = other, "ignoring unknown vmdk descriptor key");
                    }
                }
            } else {
                if extents.len() >= MAX_EXTENTS {
                    return Err(bad(format!("more than {MAX_EXTENTS} extents")));
                }
                let e = parse_extent(&t, line)?;
                total_sectors = total_sectors
                    .checked_add(e.sectors)
                    .filter(|&s| s <= MAX_CAPACITY_BYTES / SECTOR)
                    .ok_or_else(|| bad("the extents add up to more than 64 TiB"))?;
                extents.push(e);
            }
        }
        let version = version.ok_or_else(|| bad("no version line"))?;
        if !(1..=3).contains(&version) {
            return Err(StorageError::Unsupported(format!(
                "vmdk descriptor version {version}"
            )));
        }
        let create_type = create_type.ok_or_else(|| bad("no createType line"))?;
        if extents.is_empty() {
            return Err(bad("no extents"));
        }
        Ok(Descriptor {
            version: version as u32,
            cid: cid.unwrap_or(0),
            parent_cid: parent_cid.unwrap_or(NO_PARENT_CID),
            create_type,
            parent_hint,
            extents,
            ddb,
        })
    }

    /// Total size of the extents in bytes.
    pub fn size(&self) -> u64 {
        self.extents.iter().map(|e| e.sectors).sum::<u64>() * SECTOR
    }

    /// Whether the disk has a parent (a delta disk).
    pub fn has_parent(&self) -> bool {
        self.parent_cid != NO_PARENT_CID || self.parent_hint.is_some()
    }

    /// A `ddb.*` value.
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Renders the descriptor in the layout qemu-img and VMware write.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Disk DescriptorFile");
        let _ = writeln!(s, "version={}", self.version);
        let _ = writeln!(s, "CID={:08x}", self.cid);
        let _ = writeln!(s, "parentCID={:08x}", self.parent_cid);
        let _ = writeln!(s, "createType=\"{}\"", self.create_type.name());
        if let Some(p) = &self.parent_hint {
            let _ = writeln!(s, "parentFileNameHint=\"{p}\"");
        }
        let _ = writeln!(s, "\n# Extent description");
        for e in &self.extents {
            let access = match e.access {
                Access::ReadWrite => "RW",
                Access::ReadOnly => "RDONLY",
                Access::NoAccess => "NOACCESS",
            };
            match e.kind {
                ExtentType::Zero => {
                    let _ = writeln!(s, "{access} {} ZERO", e.sectors);
                }
                ExtentType::Sparse => {
                    let _ = writeln!(s, "{access} {} SPARSE \"{}\"", e.sectors, e.file);
                }
                ExtentType::Flat => {
                    let _ = writeln!(s, "{access} {} FLAT \"{}\" {}", e.sectors, e.file, e.offset);
                }
            }
        }
        let _ = writeln!(s, "\n# The Disk Data Base\n#DDB\n");
        for (k, v) in &self.ddb {
            let _ = writeln!(s, "{k} = \"{v}\"");
        }
        s
    }
}

/// Resolves an extent or parent file name against the descriptor's folder, refusing absolute
/// names, `..` components and (for existing files) symbolic links that lead out of the folder.
pub fn resolve_extent_path(dir: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('\0') {
        return Err(bad("an extent file name is empty or contains NUL"));
    }
    crate::format::resolve_in_folder(dir, name, "vmdk extent path")
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: &str = "# Disk DescriptorFile\nversion=1\nCID=8d95d71f\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\n# Extent description\nRW 4194304 SPARSE \"a-s001.vmdk\"\nRW 2097152 SPARSE \"a-s002.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses_what_qemu_writes() {
        let d = Descriptor::parse(QEMU.as_bytes()).unwrap();
        assert_eq!(d.cid, 0x8d95d71f);
        assert_eq!(d.parent_cid, NO_PARENT_CID);
        assert_eq!(d.create_type, Subformat::TwoGbMaxExtentSparse);
        assert_eq!(d.extents.len(), 2);
        assert_eq!(d.extents[1].file, "a-s002.vmdk");
        assert_eq!(d.size(), 6291456 * 512);
        assert_eq!(d.ddb("ddb.adapterType"), Some("ide"));
        assert_eq!(Descriptor::parse(d.render().as_bytes()).unwrap(), d);
    }

    #[test]
    fn copes_with_crlf_comments_quotes_and_padding() {
        let text = "# Disk DescriptorFile\r\nversion = 1 # trailing comment\r\nCID=00000001\r\nparentCID=0000abcd\r\ncreateType = monolithicFlat\r\nparentFileNameHint=\"my base.vmdk\"\r\n\r\nRW 2048 FLAT \"disk #1-flat.vmdk\" 0\r\nddb.adapterType=lsilogic\r\n\0\0\0";
        let d = Descriptor::parse(text.as_bytes()).unwrap();
        assert_eq!(d.create_type, Subformat::MonolithicFlat);
        assert_eq!(d.extents[0].file, "disk #1-flat.vmdk");
        assert_eq!(d.parent_hint.as_deref(), Some("my base.vmdk"));
        assert_eq!(d.parent_cid, 0xabcd);
        assert_eq!(d.ddb("ddb.adapterType"), Some("lsilogic"));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        for (text, want) in [
            (&b"\xff\xfe garbage"[..], "UTF-8"),
            (b"version=1\ncreateType=\"monolithicFlat\"\n", "no extents"),
            (b"version=1\nRW 10 FLAT \"x\" 0\n", "createType"),
            (
                b"version=1\ncreateType=\"monolithicFlat\"\nRW 10 FLAT \"x\n",
                "unterminated",
            ),
            (
                b"version=1\ncreateType=\"monolithicFlat\"\nRW ten FLAT \"x\"\n",
                "not a number",
            ),
            (
                b"version=1\ncreateType=\"monolithicFlat\"\nhello world\n",
                "unknown line",
            ),
            (
                b"version=1\ncreateType=\"custom\"\nRW 1 FLAT \"x\"\n",
                "createType 'custom'",
            ),
            (
                b"version=1\ncreateType=\"monolithicFlat\"\nRW 99999999999999999 FLAT \"x\"\n",
                "64 TiB",
            ),
            (
                b"version=1\nCID=xyz\ncreateType=\"monolithicFlat\"\nRW 1 FLAT \"x\"\n",
                "hexadecimal",
            ),
        ] {
            let e = Descriptor::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }

    #[test]
    fn extent_paths_may_not_leave_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert!(resolve_extent_path(dir.path(), "a-flat.vmdk").is_ok());
        assert!(resolve_extent_path(dir.path(), "./sub/a.vmdk").is_ok());
        for evil in ["../x.vmdk", "/etc/passwd", "sub/../../x", ""] {
            assert!(resolve_extent_path(dir.path(), evil).is_err(), "{evil}");
        }
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        std::fs::write(outside.path().join("f"), b"x").unwrap();
        assert!(resolve_extent_path(dir.path(), "link/f").is_err());
    }
}
