//! Mirrors (see [`super::schema`]) of the types of the web UI's endpoints: local users, the
//! usage history, job logs, templates, verification states.

#![allow(missing_docs)]

use serde::Serialize;
use utoipa::ToSchema;

/// A local user of the web UI.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserInfo {
    /// Sign-in name.
    pub name: String,
    /// May manage tokens and users and adopt images, like an admin token.
    pub admin: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Incremented by each password change: sessions made before it end.
    pub generation: u64,
}

/// A request to create a user.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreateUser {
    /// Sign-in name (1–64 characters of `A-Za-z0-9._+-`).
    pub name: String,
    /// Password (at least 8 characters).
    pub password: String,
    /// Admin rights.
    pub admin: bool,
}

/// A new password.
#[derive(Debug, Serialize, ToSchema)]
pub struct SetPassword {
    /// The new password (at least 8 characters).
    pub password: String,
}

/// Whether a volume is a template.
#[derive(Debug, Serialize, ToSchema)]
pub struct SetTemplate {
    /// Template (true) or not (false).
    pub template: bool,
}

/// One line of a job's log.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogLine {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    pub message: String,
}

/// The last verification of one snapshot.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyState {
    /// When it was verified, seconds since the Unix epoch.
    pub at: u64,
    /// Whether everything it needs was intact.
    pub ok: bool,
}

/// One series of the usage history.
#[derive(Debug, Serialize, ToSchema)]
pub struct SeriesReport {
    /// Stable key: `vg:NAME`, `pool:VG/POOL`, `pool-metadata:VG/POOL`, `datastore`,
    /// `filesystem:data`.
    pub key: String,
    /// For people.
    pub label: String,
    /// `volume-group`, `pool-data`, `pool-metadata`, `datastore`, `filesystem`.
    pub kind: String,
    /// Bytes used at the last sample.
    pub used: u64,
    /// Bytes in all at the last sample (0: unknown).
    pub capacity: u64,
    /// The samples, oldest first: `[time, used, capacity]`.
    pub points: Vec<[u64; 3]>,
    /// Growth per day from the fitted line (bytes; negative: shrinking).
    pub growth_per_day: Option<f64>,
    /// When the fitted line reaches the capacity, seconds since the Unix epoch.
    pub estimated_full: Option<u64>,
    /// Why there is no date, for people.
    pub estimate_note: Option<String>,
}

/// The usage history and the datastore's last measurement.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    /// Seconds between samples.
    pub interval_secs: u64,
    /// The last sample's time (none before the first).
    pub sampled_at: Option<u64>,
    /// Each series.
    pub series: Vec<SeriesReport>,
    /// The datastore at the last sample: snapshots, logical and stored bytes, chunks,
    /// deduplication factor, file system, newest snapshot per group, last GC and verify.
    #[schema(value_type = Object)]
    pub datastore: Option<serde_json::Value>,
}

#[cfg(test)]
mod drift {
    //! As in [`super::super::schema`]: every field destructured, live values compared.
    use super::*;
    use strata_service::{backup_state, job_log, usage_history, users, volumes};

    impl From<&users::UserInfo> for UserInfo {
        fn from(v: &users::UserInfo) -> Self {
            let users::UserInfo {
                name,
                admin,
                created,
                generation,
            } = v;
            UserInfo {
                name: name.clone(),
                admin: *admin,
                created: *created,
                generation: *generation,
            }
        }
    }

    impl From<&users::CreateUser> for CreateUser {
        fn from(v: &users::CreateUser) -> Self {
            let users::CreateUser {
                name,
                password,
                admin,
            } = v;
            CreateUser {
                name: name.clone(),
                password: password.clone(),
                admin: *admin,
            }
        }
    }

    impl From<&users::SetPassword> for SetPassword {
        fn from(v: &users::SetPassword) -> Self {
            let users::SetPassword { password } = v;
            SetPassword {
                password: password.clone(),
            }
        }
    }

    impl From<&volumes::SetTemplate> for SetTemplate {
        fn from(v: &volumes::SetTemplate) -> Self {
            let volumes::SetTemplate { template } = v;
            SetTemplate {
                template: *template,
            }
        }
    }

    impl From<&job_log::LogLine> for LogLine {
        fn from(v: &job_log::LogLine) -> Self {
            let job_log::LogLine { at_ms, message } = v;
            LogLine {
                at_ms: *at_ms,
                message: message.clone(),
            }
        }
    }

    impl From<&usage_history::SeriesReport> for SeriesReport {
        fn from(v: &usage_history::SeriesReport) -> Self {
            let usage_history::SeriesReport {
                key,
                label,
                kind,
                used,
                capacity,
                points,
                growth_per_day,
                estimated_full,
                estimate_note,
            } = v;
            SeriesReport {
                key: key.clone(),
                label: label.clone(),
                kind: kind.clone(),
                used: *used,
                capacity: *capacity,
                points: points.clone(),
                growth_per_day: *growth_per_day,
                estimated_full: *estimated_full,
                estimate_note: estimate_note.clone(),
            }
        }
    }

    impl From<&usage_history::UsageReport> for UsageReport {
        fn from(v: &usage_history::UsageReport) -> Self {
            let usage_history::UsageReport {
                interval_secs,
                sampled_at,
                series,
                datastore,
            } = v;
            UsageReport {
                interval_secs: *interval_secs,
                sampled_at: *sampled_at,
                series: series.iter().map(SeriesReport::from).collect(),
                datastore: datastore
                    .as_ref()
                    .map(|d| serde_json::to_value(d).unwrap_or_default()),
            }
        }
    }

    fn json<T: Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).unwrap_or_default()
    }

    #[test]
    fn live_values_serialize_like_their_mirrors() {
        use strata_service::{bootstrap, DataDir, Service};
        fn same<S: Serialize, M: Serialize>(what: &str, v: &S, m: &M) {
            assert_eq!(json(v), json(m), "{what}");
        }
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::at(dir.path());
        bootstrap::ensure_default(
            &data,
            &bootstrap::BootstrapOptions {
                pv: None,
                pv_file_size: 1 << 30,
            },
        )
        .unwrap();
        let svc = Service::open(data).unwrap();
        let req = users::CreateUser {
            name: "u".into(),
            password: "password1".into(),
            admin: true,
        };
        same(
            "create user",
            &serde_json::json!({"name": "u", "password": "password1", "admin": true}),
            &CreateUser::from(&req),
        );
        let user = svc.users.create(&req).unwrap();
        same("user", &user, &UserInfo::from(&user));
        let pw = users::SetPassword {
            password: "password2".into(),
        };
        same(
            "password",
            &serde_json::json!({"password": "password2"}),
            &SetPassword::from(&pw),
        );
        let t = volumes::SetTemplate { template: true };
        same(
            "template",
            &serde_json::json!({"template": true}),
            &SetTemplate::from(&t),
        );
        svc.sample_usage().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        svc.sample_usage().unwrap();
        let report = svc.usage_report();
        assert!(
            report.series.iter().any(|s| s.key == "pool:strata/data"),
            "{report:?}"
        );
        same("usage", &report, &UsageReport::from(&report));
        let line = job_log::LogLine {
            at_ms: 1,
            message: "m".into(),
        };
        same("log line", &line, &LogLine::from(&line));
        let v = backup_state::VerifyState { at: 1, ok: true };
        same("verify state", &v, &VerifyState::from(&v));
    }

    impl From<&backup_state::VerifyState> for VerifyState {
        fn from(v: &backup_state::VerifyState) -> Self {
            let backup_state::VerifyState { at, ok } = v;
            VerifyState { at: *at, ok: *ok }
        }
    }
}
