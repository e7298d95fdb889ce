//! Mapping a linear volume's byte offsets onto its PVs.

use crate::volume::meta::Segment;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    /// First byte of the run in the volume.
    start: u64,
    /// Length in bytes.
    len: u64,
    /// Index of the PV.
    pv: usize,
    /// Byte offset of the run on the PV.
    pv_offset: u64,
}

/// Where each byte of a linear volume lives. See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentMap {
    runs: Vec<Run>,
    size: u64,
}

/// One mapped piece: `len` bytes at `pv_offset` of PV `pv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapped {
    /// Index of the PV.
    pub pv: usize,
    /// Byte offset on the PV.
    pub pv_offset: u64,
    /// Bytes that continue contiguously on that PV from here (to the end of the run).
    pub len: u64,
}

impl ExtentMap {
    /// The map of `segments`, with extents of `extent_size` bytes and data starting at
    /// `pe_starts[pv]` on each PV.
    pub fn new(segments: &[Segment], extent_size: u64, pe_starts: &[u64]) -> ExtentMap {
        let mut runs = Vec::with_capacity(segments.len());
        let mut size = 0;
        for s in segments {
            let start = s.le * extent_size;
            let len = s.count * extent_size;
            runs.push(Run {
                start,
                len,
                pv: s.pv,
                pv_offset: pe_starts.get(s.pv).copied().unwrap_or(0) + s.pe * extent_size,
            });
            size = size.max(start + len);
        }
        ExtentMap { runs, size }
    }

    /// Bytes mapped.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where `offset` lives, or `None` past the end.
    pub fn map(&self, offset: u64) -> Option<Mapped> {
        let i = self.runs.partition_point(|r| r.start + r.len <= offset);
        let r = self.runs.get(i)?;
        if offset < r.start {
            return None;
        }
        let within = offset - r.start;
        Some(Mapped {
            pv: r.pv,
            pv_offset: r.pv_offset + within,
            len: r.len - within,
        })
    }

    /// Indexes of the PVs used.
    pub fn pvs(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.runs.iter().map(|r| r.pv).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_across_segments() {
        let segs = [
            Segment {
                le: 0,
                count: 2,
                pv: 1,
                pe: 5,
            },
            Segment {
                le: 2,
                count: 1,
                pv: 0,
                pe: 0,
            },
        ];
        let m = ExtentMap::new(&segs, 1024, &[100, 200]);
        assert_eq!(m.size(), 3072);
        assert_eq!(
            m.map(0),
            Some(Mapped {
                pv: 1,
                pv_offset: 200 + 5 * 1024,
                len: 2048
            })
        );
        assert_eq!(m.map(2047).unwrap().len, 1);
        assert_eq!(
            m.map(2048),
            Some(Mapped {
                pv: 0,
                pv_offset: 100,
                len: 1024
            })
        );
        assert_eq!(m.map(3072), None);
        assert_eq!(m.pvs(), vec![0, 1]);
    }
}
