//! `vg check`: re-reads every PV's label and metadata copies, re-validates the group metadata,
//! and checks every thin pool (see `thin/check.rs`).

use serde::Serialize;

use crate::error::Result;
use crate::volume::label::read_label;
use crate::volume::mda::{self, Slot};
use crate::volume::meta::{LvKind, VgMeta};
use crate::volume::thin::PoolCheck;
use crate::volume::vg::Vg;

/// The result of checking a volume group.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VgCheck {
    /// The group.
    pub vg: String,
    /// Problems that make the group inconsistent.
    pub errors: Vec<String>,
    /// Problems a redundant copy covers (a damaged label or metadata copy).
    pub warnings: Vec<String>,
    /// Each pool's check.
    pub pools: Vec<PoolCheck>,
}

impl VgCheck {
    /// Whether nothing is wrong (warnings allowed).
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.pools.iter().all(PoolCheck::is_clean)
    }
}

impl Vg {
    /// Checks the group. See the module documentation.
    pub fn check(&self) -> Result<VgCheck> {
        let files = self.files();
        let (meta, names) = {
            let st = self.state();
            (st.meta.clone(), st.names.clone())
        };
        let mut out = VgCheck {
            vg: meta.name.clone(),
            errors: Vec::new(),
            warnings: Vec::new(),
            pools: Vec::new(),
        };
        if let Err(e) = meta.validate() {
            out.errors.push(format!("metadata: {e}"));
        }
        for (i, f) in files.iter().enumerate() {
            let who = names.get(i).cloned().unwrap_or_default();
            let label = match read_label(f.as_ref()) {
                Ok(l) => l,
                Err(e) => {
                    out.errors.push(format!("{who}: {e}"));
                    continue;
                }
            };
            for c in &label.damaged {
                out.warnings.push(format!(
                    "{who}: label copy {c} is damaged (the other is good)"
                ));
            }
            if meta.pvs.get(i).is_none_or(|p| p.uuid != label.label.uuid) {
                out.errors.push(format!(
                    "{who}: its label does not match PV #{i} of the metadata"
                ));
            }
            if let Some(p) = meta.pvs.get(i) {
                let need = label.label.pe_start + p.pe_count * meta.extent_size;
                if f.len() < need {
                    out.errors.push(format!(
                        "{who}: {} bytes, but its extents need {need}",
                        f.len()
                    ));
                }
            }
            let slots = mda::read_area(f.as_ref(), &label.label)?;
            let mut good = 0;
            for (k, s) in slots.iter().enumerate() {
                match s {
                    Slot::Valid { seq, payload, .. } if *seq == meta.seqno => {
                        match VgMeta::decode(payload, &who) {
                            Ok(m) if m == meta => good += 1,
                            _ => out
                                .errors
                                .push(format!("{who}: metadata copy {k} differs from the group's")),
                        }
                    }
                    Slot::Valid { seq, .. } => out.warnings.push(format!(
                        "{who}: metadata copy {k} is stale (sequence {seq} of {})",
                        meta.seqno
                    )),
                    Slot::Damaged(why) => out
                        .warnings
                        .push(format!("{who}: metadata copy {k} is damaged: {why}")),
                    Slot::Empty => out
                        .warnings
                        .push(format!("{who}: metadata copy {k} is empty")),
                }
            }
            if good == 0 {
                out.errors.push(format!("{who}: no current metadata copy"));
            }
        }
        for lv in meta
            .lvs
            .iter()
            .filter(|l| matches!(l.kind, LvKind::ThinPool { .. }))
        {
            let mut st = self.state();
            match self.load_pool(&mut st, lv) {
                Ok(p) => {
                    drop(st);
                    out.pools.push(p.check());
                }
                Err(e) => out.errors.push(format!("thin pool {}: {e}", lv.name)),
            }
        }
        Ok(out)
    }
}
