//! Decoding of option payloads (untrusted input) and metadata-context queries. Pure functions:
//! every length is checked against the bytes actually received, strings are bounded UTF-8
//! without NUL, and lists are bounded before anything is allocated for them.

use crate::proto::{be16, be32, MAX_STRING};

/// Most queries one `NBD_OPT_{LIST,SET}_META_CONTEXT` may carry (more: `NBD_REP_ERR_TOO_BIG`).
pub const MAX_QUERIES: usize = 64;
/// Most information requests one `NBD_OPT_INFO`/`NBD_OPT_GO` may carry.
pub const MAX_INFO_REQUESTS: usize = 64;

/// The `base:allocation` context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of the `qemu:dirty-bitmap:NAME` contexts.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Why an option payload was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionError {
    /// Malformed: `NBD_REP_ERR_INVALID`.
    Invalid,
    /// Too many items: `NBD_REP_ERR_TOO_BIG`.
    TooBig,
}

/// A protocol string: UTF-8, at most 4096 bytes, no NUL.
pub fn parse_string(b: &[u8]) -> Option<&str> {
    if b.len() > MAX_STRING || b.contains(&0) {
        return None;
    }
    std::str::from_utf8(b).ok()
}

/// Takes `n` bytes from the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], OptionError> {
    if data.len() < n {
        return Err(OptionError::Invalid);
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Ok(head)
}

fn take_string<'a>(data: &mut &'a [u8]) -> Result<&'a str, OptionError> {
    let len = be32(take(data, 4)?, 0) as usize;
    if len > MAX_STRING {
        return Err(OptionError::Invalid);
    }
    parse_string(take(data, len)?).ok_or(OptionError::Invalid)
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name (empty: the default export).
    pub name: &'a str,
    /// Information types asked for.
    pub infos: Vec<u16>,
}

/// Decodes an `NBD_OPT_INFO`/`NBD_OPT_GO` payload.
pub fn parse_info(mut data: &[u8]) -> Result<InfoRequest<'_>, OptionError> {
    let name = take_string(&mut data)?;
    let n = be16(take(&mut data, 2)?, 0) as usize;
    if n > MAX_INFO_REQUESTS {
        return Err(OptionError::TooBig);
    }
    let list = take(&mut data, 2 * n)?;
    if !data.is_empty() {
        return Err(OptionError::Invalid);
    }
    Ok(InfoRequest {
        name,
        infos: list.chunks_exact(2).map(|c| be16(c, 0)).collect(),
    })
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    /// Export name.
    pub name: &'a str,
    /// Queries.
    pub queries: Vec<&'a str>,
}

/// Decodes a metadata-context option payload.
pub fn parse_meta(mut data: &[u8]) -> Result<MetaRequest<'_>, OptionError> {
    let name = take_string(&mut data)?;
    let n = be32(take(&mut data, 4)?, 0) as usize;
    if n > MAX_QUERIES {
        return Err(OptionError::TooBig);
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(take_string(&mut data)?);
    }
    if !data.is_empty() {
        return Err(OptionError::Invalid);
    }
    Ok(MetaRequest { name, queries })
}

/// A metadata context an export offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`.
    Allocation,
    /// `qemu:dirty-bitmap:NAME`.
    DirtyBitmap(String),
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::Allocation => BASE_ALLOCATION.to_string(),
            MetaContext::DirtyBitmap(b) => format!("{DIRTY_BITMAP_PREFIX}{b}"),
        }
    }
}

/// Every context of an export with these bitmaps.
pub fn all_contexts(bitmaps: &[String]) -> Vec<MetaContext> {
    std::iter::once(MetaContext::Allocation)
        .chain(bitmaps.iter().cloned().map(MetaContext::DirtyBitmap))
        .collect()
}

/// The contexts a `NBD_OPT_LIST_META_CONTEXT` query names: `base:` and `qemu:` list their whole
/// namespace, `qemu:dirty-bitmap:` every bitmap, a full name itself; unknown namespaces name
/// nothing. A query without a namespace is invalid.
pub fn list_matches(query: &str, bitmaps: &[String]) -> Result<Vec<MetaContext>, OptionError> {
    let (ns, leaf) = query.split_once(':').ok_or(OptionError::Invalid)?;
    Ok(match ns {
        "base" if leaf.is_empty() || leaf == "allocation" => vec![MetaContext::Allocation],
        "qemu" if leaf.is_empty() || leaf == "dirty-bitmap:" => bitmaps
            .iter()
            .cloned()
            .map(MetaContext::DirtyBitmap)
            .collect(),
        _ => set_match(query, bitmaps).into_iter().collect(),
    })
}

/// The context a `NBD_OPT_SET_META_CONTEXT` query selects: only full names select.
pub fn set_match(query: &str, bitmaps: &[String]) -> Option<MetaContext> {
    if query == BASE_ALLOCATION {
        return Some(MetaContext::Allocation);
    }
    let name = query.strip_prefix(DIRTY_BITMAP_PREFIX)?;
    bitmaps
        .iter()
        .any(|b| b == name)
        .then(|| MetaContext::DirtyBitmap(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn info_payloads_are_checked_against_their_length() {
        let mut d = string("vm1");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&[0, 3, 0, 1]);
        assert_eq!(
            parse_info(&d).unwrap(),
            InfoRequest {
                name: "vm1",
                infos: vec![3, 1]
            }
        );
        assert_eq!(parse_info(&d[..d.len() - 1]), Err(OptionError::Invalid));
        let mut extra = d.clone();
        extra.push(0);
        assert_eq!(parse_info(&extra), Err(OptionError::Invalid));
        let mut long = 5000u32.to_be_bytes().to_vec();
        long.extend(vec![b'a'; 5000]);
        long.extend_from_slice(&[0, 0]);
        assert_eq!(parse_info(&long), Err(OptionError::Invalid));
        let mut huge = string("x");
        huge.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse_info(&huge), Err(OptionError::TooBig));
        let mut nul = string("a\0b");
        nul.extend_from_slice(&[0, 0]);
        assert_eq!(parse_info(&nul), Err(OptionError::Invalid));
        assert_eq!(parse_info(&[0xff; 4]), Err(OptionError::Invalid));
    }

    #[test]
    fn meta_payloads_and_queries() {
        let mut d = string("vm1");
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend(string("base:allocation"));
        d.extend(string("qemu:dirty-bitmap:b1"));
        let m = parse_meta(&d).unwrap();
        assert_eq!(m.queries, vec!["base:allocation", "qemu:dirty-bitmap:b1"]);
        let mut many = string("vm1");
        many.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta(&many), Err(OptionError::TooBig));
        let mut short = string("vm1");
        short.extend_from_slice(&1u32.to_be_bytes());
        short.extend_from_slice(&100u32.to_be_bytes());
        assert_eq!(parse_meta(&short), Err(OptionError::Invalid));

        let bitmaps = vec!["b1".to_string(), "b2".to_string()];
        let names = |v: Vec<MetaContext>| v.iter().map(|c| c.name()).collect::<Vec<_>>();
        assert_eq!(
            names(list_matches("base:", &bitmaps).unwrap()),
            ["base:allocation"]
        );
        assert_eq!(
            names(list_matches("qemu:", &bitmaps).unwrap()),
            ["qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b2"]
        );
        assert_eq!(
            names(list_matches("qemu:dirty-bitmap:", &bitmaps).unwrap()).len(),
            2
        );
        assert_eq!(
            names(list_matches("qemu:dirty-bitmap:b2", &bitmaps).unwrap()),
            ["qemu:dirty-bitmap:b2"]
        );
        assert!(list_matches("qemu:dirty-bitmap:zz", &bitmaps)
            .unwrap()
            .is_empty());
        assert!(list_matches("x-other:thing", &bitmaps).unwrap().is_empty());
        assert_eq!(list_matches("nocolon", &bitmaps), Err(OptionError::Invalid));
        assert_eq!(set_match("base:", &bitmaps), None);
        assert_eq!(
            set_match("qemu:dirty-bitmap:b1", &bitmaps),
            Some(MetaContext::DirtyBitmap("b1".into()))
        );
        assert_eq!(names(all_contexts(&bitmaps)).len(), 3);
    }
}
