//! Parsing the OVF descriptor: the file references and the virtual disks (capacity, file).
//!
//! OVF 1.x and 2.x put their attributes in the `ovf:` namespace (whose URI differs between
//! versions); elements and attributes are matched by local name so both read alike.

use crate::error::{Result, StorageError};

/// Largest OVF descriptor read (real ones are a few KiB to a few hundred).
pub const MAX_OVF_BYTES: u64 = 8 << 20;
/// Most disks or files one OVF may list.
const MAX_ITEMS: usize = 1024;

/// A `References/File`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvfFile {
    /// `ovf:id`.
    pub id: String,
    /// `ovf:href`: the file's name inside the OVA.
    pub href: String,
    /// `ovf:size`, when given.
    pub size: Option<u64>,
}

/// A `DiskSection/Disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvfDisk {
    /// `ovf:diskId`.
    pub disk_id: String,
    /// The referenced file (`ovf:fileRef` resolved), or `None` for a blank disk.
    pub file: Option<OvfFile>,
    /// Capacity in bytes (`ovf:capacity` times `ovf:capacityAllocationUnits`).
    pub capacity: u64,
    /// `ovf:format`: a URI naming the disk format.
    pub format: Option<String>,
}

/// What an OVF says about its disks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ovf {
    /// Every referenced file.
    pub files: Vec<OvfFile>,
    /// Every virtual disk.
    pub disks: Vec<OvfDisk>,
}

fn bad(detail: impl Into<String>) -> StorageError {
    StorageError::corrupt("OVF descriptor", detail)
}

fn attr<'a>(node: &roxmltree::Node<'a, '_>, local: &str) -> Option<&'a str> {
    node.attributes()
        .find(|a| a.name() == local)
        .map(|a| a.value())
}

/// Parses `capacityAllocationUnits`: `byte`, `byte * 2^N`, or the common `KB`/`MB`/`GB`.
fn units(text: &str) -> Result<u64> {
    let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let t = t.to_ascii_lowercase();
    let shift = match t.as_str() {
        "byte" | "bytes" | "" => 0,
        "kb" | "kilobytes" => 10,
        "mb" | "megabytes" => 20,
        "gb" | "gigabytes" => 30,
        _ => match t.strip_prefix("byte*2^") {
            Some(n) => n
                .parse::<u32>()
                .ok()
                .filter(|&n| n < 64)
                .ok_or_else(|| bad(format!("unsupported capacity unit '{text}'")))?,
            None => return Err(bad(format!("unsupported capacity unit '{text}'"))),
        },
    };
    Ok(1u64 << shift)
}

/// Parses OVF XML.
pub fn parse(xml: &str) -> Result<Ovf> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| bad(format!("not XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" {
        return Err(bad(format!(
            "the root element is <{}>, not <Envelope>",
            root.tag_name().name()
        )));
    }
    let mut files = Vec::new();
    let mut disks = Vec::new();
    for node in root.descendants().filter(|n| n.is_element()) {
        match node.tag_name().name() {
            "File"
                if node
                    .parent_element()
                    .is_some_and(|p| p.tag_name().name() == "References") =>
            {
                if files.len() >= MAX_ITEMS {
                    return Err(bad("too many files"));
                }
                let id = attr(&node, "id")
                    .ok_or_else(|| bad("a File has no id"))?
                    .to_string();
                let href = attr(&node, "href")
                    .ok_or_else(|| bad(format!("File {id} has no href")))?
                    .to_string();
                if let Some(c) =
                    attr(&node, "compression").filter(|c| !c.is_empty() && *c != "identity")
                {
                    return Err(StorageError::Unsupported(format!(
                        "OVF file {href} compressed with '{c}'"
                    )));
                }
                if attr(&node, "chunkSize").is_some() {
                    return Err(StorageError::Unsupported(format!(
                        "OVF file {href} split into chunks"
                    )));
                }
                let size = match attr(&node, "size") {
                    Some(s) => Some(
                        s.trim()
                            .parse::<u64>()
                            .map_err(|_| bad(format!("File {id} has size '{s}'")))?,
                    ),
                    None => None,
                };
                files.push(OvfFile { id, href, size });
            }
            "Disk"
                if node
                    .parent_element()
                    .is_some_and(|p| p.tag_name().name() == "DiskSection") =>
            {
                if disks.len() >= MAX_ITEMS {
                    return Err(bad("too many disks"));
                }
                let disk_id = attr(&node, "diskId")
                    .ok_or_else(|| bad("a Disk has no diskId"))?
                    .to_string();
                let cap_text = attr(&node, "capacity")
                    .ok_or_else(|| bad(format!("Disk {disk_id} has no capacity")))?;
                let cap: u64 = cap_text
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("Disk {disk_id} has capacity '{cap_text}' (a property reference or not a number)")))?;
                let unit = units(attr(&node, "capacityAllocationUnits").unwrap_or("byte"))?;
                let capacity = cap
                    .checked_mul(unit)
                    .filter(|&c| c > 0 && c <= 64 << 40)
                    .ok_or_else(|| bad(format!("Disk {disk_id} has an absurd capacity")))?;
                disks.push((
                    disk_id,
                    attr(&node, "fileRef").map(str::to_string),
                    capacity,
                    attr(&node, "format").map(str::to_string),
                ));
            }
            _ => {}
        }
    }
    let disks = disks
        .into_iter()
        .map(|(disk_id, file_ref, capacity, format)| {
            let file = match file_ref {
                None => None,
                Some(r) => Some(files.iter().find(|f| f.id == r).cloned().ok_or_else(|| {
                    bad(format!(
                        "Disk {disk_id} refers to file '{r}', which References does not list"
                    ))
                })?),
            };
            Ok(OvfDisk {
                disk_id,
                file,
                capacity,
                format,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if disks.is_empty() {
        return Err(bad("no disks in the DiskSection"));
    }
    Ok(Ovf { files, disks })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:id="file1" ovf:href="disk1.vmdk" ovf:size="1234"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="64" ovf:capacityAllocationUnits="byte * 2^20"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:diskId="blank" ovf:capacity="1048576"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A VM</Info></VirtualSystem>
</Envelope>"#;

    #[test]
    fn parses_disks_and_capacities() {
        let o = parse(SAMPLE).unwrap();
        assert_eq!(o.disks.len(), 2);
        assert_eq!(o.disks[0].capacity, 64 << 20);
        assert_eq!(o.disks[0].file.as_ref().unwrap().href, "disk1.vmdk");
        assert_eq!(o.disks[1].file, None);
        assert_eq!(o.disks[1].capacity, 1 << 20);
    }

    #[test]
    fn refuses_broken_references_and_garbage() {
        let broken = SAMPLE.replace("ovf:fileRef=\"file1\"", "ovf:fileRef=\"nope\"");
        assert!(parse(&broken).unwrap_err().to_string().contains("nope"));
        assert!(parse("<not xml").is_err());
        assert!(parse("<Other/>").is_err());
        let gz = SAMPLE.replace("ovf:size=\"1234\"", "ovf:compression=\"gzip\"");
        assert!(parse(&gz).unwrap_err().to_string().contains("gzip"));
        let absurd = SAMPLE.replace("byte * 2^20", "byte * 2^60");
        assert!(parse(&absurd).unwrap_err().to_string().contains("absurd"));
    }
}
