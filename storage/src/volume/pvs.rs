//! The PV files of a volume group as the data path sees them: shared with every device and
//! queue on the group, so that PVs added later are reachable by queues opened before.

use std::sync::{Arc, RwLock};

use crate::device::SharedFile;
use crate::error::StorageError;
use crate::io::stack::Opener;
use crate::sync::read_meta;

/// The PV files of a volume group, by PV index.
pub type PvSet = Arc<RwLock<Vec<SharedFile>>>;

/// The largest alignment any PV of the set asks for.
pub(crate) fn pv_alignment(pvs: &PvSet) -> usize {
    crate::sync::read(pvs)
        .iter()
        .map(|f| f.alignment())
        .max()
        .unwrap_or(1)
}

/// Opens lower queue `i` of a stacked queue on PV `i`.
pub(crate) fn pv_opener(pvs: PvSet) -> Opener {
    Box::new(move |i, opts| {
        let file = read_meta(&pvs, "the volume group's PV list")?
            .get(i)
            .cloned()
            .ok_or_else(|| StorageError::Unavailable(format!("PV #{i} is not open")))?;
        file.open_queue(opts)
    })
}
