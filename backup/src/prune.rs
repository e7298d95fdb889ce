//! `backup prune`: chooses which snapshots of each group to keep by the usual rules and removes
//! the rest (their chunks are freed by gc).
//!
//! Rules are applied in the order last, daily, weekly (ISO weeks), monthly, newest snapshot
//! first. `keep-last N` keeps the N newest. Each calendar rule keeps the newest snapshot of each
//! of its N most recent periods (days, weeks, months) that no snapshot kept so far already
//! covers. A snapshot no rule keeps is removed. Removal renames the snapshot folder to a hidden
//! name (it disappears atomically), then deletes it; a snapshot being read is skipped.

use std::collections::HashSet;

use serde::Serialize;
use strata_storage::{Result, StorageError};

use crate::lock::lock_snapshot_exclusive;
use crate::snapshot::SnapshotName;
use crate::store::Datastore;
use crate::time::{self, Epoch};

/// How many to keep per rule; zero disables a rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepRules {
    /// Newest snapshots to keep.
    pub last: usize,
    /// Days to keep one snapshot of.
    pub daily: usize,
    /// ISO weeks to keep one snapshot of.
    pub weekly: usize,
    /// Months to keep one snapshot of.
    pub monthly: usize,
}

impl KeepRules {
    /// Whether any rule is set.
    pub fn any(&self) -> bool {
        self.last + self.daily + self.weekly + self.monthly > 0
    }
}

/// One snapshot's fate.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct PruneDecision {
    /// The snapshot.
    pub snapshot: String,
    /// Kept (with the rule that kept it) or removed.
    pub keep: bool,
    /// `last`, `daily`, `weekly`, `monthly`, or empty when removed.
    pub rule: String,
    /// For removals that did not happen: why.
    pub skipped: Option<String>,
}

/// Maps a time to its calendar period (day, ISO week, month).
type Bucket = fn(Epoch) -> i64;

/// Decides, for snapshots of one group sorted oldest first, which to keep and by which rule.
pub fn select(group: &[SnapshotName], rules: KeepRules) -> Vec<Option<&'static str>> {
    let n = group.len();
    let mut kept: Vec<Option<&'static str>> = vec![None; n];
    let newest_first: Vec<usize> = (0..n).rev().collect();
    for &i in newest_first.iter().take(rules.last) {
        kept[i] = Some("last");
    }
    let calendar: [(usize, &'static str, Bucket); 3] = [
        (rules.daily, "daily", time::day_bucket),
        (rules.weekly, "weekly", time::iso_week_bucket),
        (rules.monthly, "monthly", time::month_bucket),
    ];
    for (count, rule, bucket) in calendar {
        if count == 0 {
            continue;
        }
        let covered: HashSet<i64> = (0..n)
            .filter(|&i| kept[i].is_some())
            .map(|i| bucket(group[i].time()))
            .collect();
        let mut chosen: HashSet<i64> = HashSet::new();
        for &i in &newest_first {
            if kept[i].is_some() {
                continue;
            }
            let b = bucket(group[i].time());
            if covered.contains(&b) || chosen.contains(&b) {
                continue;
            }
            if chosen.len() >= count {
                break;
            }
            chosen.insert(b);
            kept[i] = Some(rule);
        }
    }
    kept
}

/// Prunes the groups `ids` (every group when empty). With `dry_run`, only reports.
pub fn prune(
    store: &Datastore,
    ids: &[String],
    rules: KeepRules,
    dry_run: bool,
) -> Result<Vec<PruneDecision>> {
    prune_protecting(store, ids, rules, dry_run, &[])
}

/// [`prune`], never removing the snapshots named in `protected` (`ID/TIME`: those an
/// unfinished live restore reads; its device, while open, also holds them with a lock).
pub fn prune_protecting(
    store: &Datastore,
    ids: &[String],
    rules: KeepRules,
    dry_run: bool,
    protected: &[String],
) -> Result<Vec<PruneDecision>> {
    if !rules.any() {
        return Err(StorageError::InvalidInput(
            "Prune needs at least one --keep-last/--keep-daily/--keep-weekly/--keep-monthly".into(),
        ));
    }
    let all = store.list()?;
    let mut groups: Vec<String> = all.iter().map(|n| n.id().to_string()).collect();
    groups.dedup();
    if !ids.is_empty() {
        groups.retain(|g| ids.contains(g));
    }
    let mut out = Vec::new();
    for g in groups {
        let snaps: Vec<SnapshotName> = all.iter().filter(|n| n.id() == g).cloned().collect();
        let kept = select(&snaps, rules);
        for (name, k) in snaps.iter().zip(kept) {
            let mut d = PruneDecision {
                snapshot: name.to_string(),
                keep: k.is_some(),
                rule: k.unwrap_or("").to_string(),
                skipped: None,
            };
            if k.is_none() && protected.contains(&d.snapshot) {
                d.skipped = Some("an unfinished live restore reads it".into());
            } else if k.is_none() && !dry_run {
                if let Err(e) = remove_snapshot(store, name) {
                    d.skipped = Some(e.to_string());
                }
            }
            out.push(d);
        }
    }
    Ok(out)
}

/// Removes one snapshot: hidden rename (atomic disappearance), fsync, then delete.
pub fn remove_snapshot(store: &Datastore, name: &SnapshotName) -> Result<()> {
    let _excl = lock_snapshot_exclusive(store, name)?;
    if let Some(r) = store.remote() {
        // The bucket first: the snapshot disappears with its manifest there.
        r.remove_snapshot(name)?;
    }
    crate::mirror::remove_local(store, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(times: &[&str]) -> Vec<SnapshotName> {
        times
            .iter()
            .map(|t| SnapshotName::new("g", time::parse(t).unwrap()).unwrap())
            .collect()
    }

    fn kept(group: &[SnapshotName], rules: KeepRules) -> Vec<String> {
        select(group, rules)
            .iter()
            .zip(group)
            .filter(|(k, _)| k.is_some())
            .map(|(_, n)| time::format(n.time()))
            .collect()
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let g = names(&[
            "2026-01-01T00:00:00Z",
            "2026-01-02T00:00:00Z",
            "2026-01-03T00:00:00Z",
        ]);
        let r = KeepRules {
            last: 2,
            ..Default::default()
        };
        assert_eq!(
            kept(&g, r),
            ["2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"]
        );
    }

    #[test]
    fn daily_keeps_newest_of_each_day() {
        let g = names(&[
            "2026-01-01T01:00:00Z",
            "2026-01-01T23:00:00Z",
            "2026-01-02T05:00:00Z",
            "2026-01-02T06:00:00Z",
            "2026-01-03T06:00:00Z",
        ]);
        let r = KeepRules {
            daily: 2,
            ..Default::default()
        };
        assert_eq!(
            kept(&g, r),
            ["2026-01-02T06:00:00Z", "2026-01-03T06:00:00Z"]
        );
        let r = KeepRules {
            last: 1,
            daily: 2,
            ..Default::default()
        };
        // Day 3 is covered by keep-last; daily then takes days 2 and 1.
        assert_eq!(
            kept(&g, r),
            [
                "2026-01-01T23:00:00Z",
                "2026-01-02T06:00:00Z",
                "2026-01-03T06:00:00Z"
            ]
        );
    }

    #[test]
    fn weekly_and_monthly_buckets() {
        let g = names(&[
            "2025-11-15T00:00:00Z",
            "2025-12-20T00:00:00Z",
            "2025-12-29T00:00:00Z", // Monday of 2026-W01
            "2026-01-04T00:00:00Z", // Sunday of 2026-W01
            "2026-01-05T00:00:00Z", // 2026-W02
        ]);
        let r = KeepRules {
            weekly: 2,
            ..Default::default()
        };
        assert_eq!(
            kept(&g, r),
            ["2026-01-04T00:00:00Z", "2026-01-05T00:00:00Z"]
        );
        let r = KeepRules {
            monthly: 3,
            ..Default::default()
        };
        assert_eq!(
            kept(&g, r),
            [
                "2025-11-15T00:00:00Z",
                "2025-12-29T00:00:00Z",
                "2026-01-05T00:00:00Z"
            ]
        );
    }

    #[test]
    fn no_rules_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = Datastore::create(d.path()).unwrap();
        assert!(prune(&s, &[], KeepRules::default(), true).is_err());
    }
}
