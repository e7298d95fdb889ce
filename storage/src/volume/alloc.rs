//! Extent allocation: choosing free physical extents for a linear volume.
//!
//! Policy: continue contiguously after the volume's last extent when growing; otherwise the
//! smallest free run that holds the whole request (one segment, least fragmentation); otherwise
//! the largest runs first, across PVs, until the request is met.

use crate::error::{Result, StorageError};
use crate::util::format_size;
use crate::volume::meta::{Segment, VgMeta};

/// Free runs `(pe, count)` of PV `pv`.
pub fn free_runs(meta: &VgMeta, pv: usize) -> Vec<(u64, u64)> {
    let used = meta.used_extents();
    let mut runs = Vec::new();
    let mut at = 0u64;
    for &(pe, count) in used.get(pv).map(Vec::as_slice).unwrap_or(&[]) {
        if pe > at {
            runs.push((at, pe - at));
        }
        at = at.max(pe + count);
    }
    let end = meta.pvs.get(pv).map_or(0, |p| p.pe_count);
    if end > at {
        runs.push((at, end - at));
    }
    runs
}

/// Chooses `count` free extents for logical extents `le_start..`. `allowed` restricts the PVs
/// (empty: any); `after` is `(pv, pe)` just past the volume's last extent, to extend it in place.
pub fn allocate(
    meta: &VgMeta,
    count: u64,
    le_start: u64,
    allowed: &[usize],
    after: Option<(usize, u64)>,
) -> Result<Vec<Segment>> {
    let pvs: Vec<usize> = (0..meta.pvs.len())
        .filter(|i| allowed.is_empty() || allowed.contains(i))
        .collect();
    let mut free: Vec<(usize, u64, u64)> = pvs
        .iter()
        .flat_map(|&pv| {
            free_runs(meta, pv)
                .into_iter()
                .map(move |(pe, n)| (pv, pe, n))
        })
        .collect();
    let available: u64 = free.iter().map(|r| r.2).sum();
    if available < count {
        return Err(StorageError::OutOfSpace(format!(
            "volume group {} has {available} free extents ({}) where {count} ({}) are needed",
            meta.name,
            format_size(available.saturating_mul(meta.extent_size)),
            format_size(count.saturating_mul(meta.extent_size)),
        )));
    }
    let mut out: Vec<Segment> = Vec::new();
    let mut need = count;
    let mut le = le_start;
    let mut take = |free: &mut Vec<(usize, u64, u64)>, idx: usize, need: &mut u64, le: &mut u64| {
        let (pv, pe, n) = free[idx];
        let k = n.min(*need);
        out.push(Segment {
            le: *le,
            count: k,
            pv,
            pe,
        });
        *need -= k;
        *le += k;
        if k == n {
            free.remove(idx);
        } else {
            free[idx] = (pv, pe + k, n - k);
        }
    };
    if let Some((pv, pe_end)) = after {
        if let Some(i) = free.iter().position(|r| r.0 == pv && r.1 == pe_end) {
            take(&mut free, i, &mut need, &mut le);
        }
    }
    if need > 0 {
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, r)| r.2 >= need)
            .min_by_key(|(_, r)| r.2)
            .map(|(i, _)| i);
        if let Some(i) = best {
            take(&mut free, i, &mut need, &mut le);
        }
    }
    while need > 0 {
        let Some(i) = free
            .iter()
            .enumerate()
            .max_by_key(|(_, r)| r.2)
            .map(|(i, _)| i)
        else {
            break;
        };
        take(&mut free, i, &mut need, &mut le);
    }
    Ok(out)
}

/// Appends `new` to `segments`, merging runs that continue each other.
pub fn append_merged(segments: &mut Vec<Segment>, new: Vec<Segment>) {
    for s in new {
        match segments.last_mut() {
            Some(l) if l.pv == s.pv && l.pe + l.count == s.pe && l.le + l.count == s.le => {
                l.count += s.count
            }
            _ => segments.push(s),
        }
    }
}

/// Cuts `segments` down to their first `keep` extents.
pub fn truncate(segments: &mut Vec<Segment>, keep: u64) {
    segments.retain(|s| s.le < keep);
    if let Some(l) = segments.last_mut() {
        l.count = l.count.min(keep - l.le);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::meta::{LvKind, LvMeta, PvMeta, META_FORMAT};
    use crate::volume::name::new_uuid;

    fn vg(pes: &[u64]) -> VgMeta {
        VgMeta {
            format: META_FORMAT,
            name: "vg".into(),
            uuid: new_uuid(),
            seqno: 1,
            extent_size: 4 << 20,
            created: 0,
            pvs: pes
                .iter()
                .map(|&n| PvMeta {
                    uuid: new_uuid(),
                    pe_count: n,
                    path_hint: String::new(),
                })
                .collect(),
            lvs: vec![],
        }
    }

    fn add(m: &mut VgMeta, name: &str, segs: Vec<Segment>) {
        m.lvs.push(LvMeta {
            name: name.into(),
            uuid: new_uuid(),
            created: 0,
            hidden: false,
            kind: LvKind::Linear { segments: segs },
        });
    }

    #[test]
    fn best_fit_then_spanning() {
        let mut m = vg(&[10, 4]);
        let s = allocate(&m, 3, 0, &[], None).unwrap();
        assert_eq!(
            s,
            vec![Segment {
                le: 0,
                count: 3,
                pv: 1,
                pe: 0
            }]
        );
        add(&mut m, "a", s);
        let s = allocate(&m, 11, 0, &[], None).unwrap();
        assert_eq!(s.iter().map(|x| x.count).sum::<u64>(), 11);
        assert_eq!(s.len(), 2);
        add(&mut m, "b", s);
        m.validate().unwrap();
        assert!(matches!(
            allocate(&m, 1, 0, &[], None),
            Err(StorageError::OutOfSpace(_))
        ));
    }

    #[test]
    fn growing_continues_in_place() {
        let mut m = vg(&[10]);
        add(
            &mut m,
            "a",
            vec![Segment {
                le: 0,
                count: 2,
                pv: 0,
                pe: 0,
            }],
        );
        add(
            &mut m,
            "b",
            vec![Segment {
                le: 0,
                count: 2,
                pv: 0,
                pe: 5,
            }],
        );
        let s = allocate(&m, 2, 2, &[], Some((0, 2))).unwrap();
        assert_eq!(
            s,
            vec![Segment {
                le: 2,
                count: 2,
                pv: 0,
                pe: 2
            }]
        );
        let mut segs = m.lvs[0].segments().to_vec();
        append_merged(&mut segs, s);
        assert_eq!(
            segs,
            vec![Segment {
                le: 0,
                count: 4,
                pv: 0,
                pe: 0
            }]
        );
        truncate(&mut segs, 3);
        assert_eq!(segs[0].count, 3);
    }
}
