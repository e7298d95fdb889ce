//! Local users of the web UI: a name, an admin flag and an Argon2id password hash.
//!
//! Users sign in to the web UI with a name and password (see [`super::sessions`]); the API
//! itself keeps taking bearer tokens. Admins manage users (`/api/users`). `DATA/users.json`
//! holds each user's PHC string (`$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH`, OWASP's minimum
//! parameters) and never a password; it is replaced atomically and owner-only.
//!
//! Checking a password costs tens of milliseconds of CPU on purpose. At most
//! [`MAX_CONCURRENT_CHECKS`] run at once, so a flood of sign-in attempts queues instead of
//! taking every core, and a name that does not exist is checked against a dummy hash so the
//! answer takes as long as for a wrong password.

use std::sync::{Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};

use super::watched_json::WatchedJson;
use super::{names, ServiceError, ServiceResult};

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted (hashing input is bounded).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Password checks that may run at once.
pub const MAX_CONCURRENT_CHECKS: usize = 2;

/// A user as listed: never includes the hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// Sign-in name.
    pub name: String,
    /// May manage tokens and users and adopt images, like an admin token.
    pub admin: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Incremented by each password change: sessions made before it end.
    #[serde(default)]
    pub generation: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct UserRecord {
    #[serde(flatten)]
    info: UserInfo,
    /// The Argon2id hash as a PHC string.
    phc: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct UserFile {
    version: u32,
    users: Vec<UserRecord>,
}

/// A request to create a user.
#[derive(Debug, Deserialize)]
pub struct CreateUser {
    /// Sign-in name (1–64 characters of `A-Za-z0-9._+-`).
    pub name: String,
    /// Password (at least 8 characters).
    pub password: String,
    /// Admin rights.
    #[serde(default)]
    pub admin: bool,
}

/// A new password.
#[derive(Debug, Deserialize)]
pub struct SetPassword {
    /// The new password (at least 8 characters).
    pub password: String,
}

/// The local users of a data directory.
#[derive(Debug)]
pub struct UserStore {
    file: WatchedJson<UserFile>,
    checks: Mutex<usize>,
    check_done: Condvar,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn check_password(password: &str) -> ServiceResult<()> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ServiceError::BadRequest(format!(
            "A password needs at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(ServiceError::BadRequest(format!(
            "A password may have at most {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

fn hash_password(password: &str) -> ServiceResult<String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt)
        .map_err(|e| ServiceError::internal(format!("No randomness for a salt: {e}")))?;
    let salt = SaltString::encode_b64(&salt)
        .map_err(|e| ServiceError::internal(format!("Encoding a salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ServiceError::internal(format!("Hashing a password: {e}")))
}

/// A hash that matches no password a user can type, checked for unknown names.
const DUMMY_PHC: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c3RyYXRhLWR1bW15LXNhbHQ$3Tq0mRRSmG3bRl4iDFVrAdnrnAGf8nQeGcqfM9tUmsw";

impl UserStore {
    /// Opens (or starts) the user list at `path`.
    pub fn open(path: std::path::PathBuf) -> ServiceResult<UserStore> {
        Ok(UserStore {
            file: WatchedJson::open(path)?,
            checks: Mutex::new(0),
            check_done: Condvar::new(),
        })
    }

    /// Creates a user.
    pub fn create(&self, req: &CreateUser) -> ServiceResult<UserInfo> {
        names::validate("user", &req.name)?;
        check_password(&req.password)?;
        let phc = hash_password(&req.password)?;
        let mut file = self.file.lock()?;
        if file.get().users.iter().any(|u| u.info.name == req.name) {
            return Err(ServiceError::Conflict(format!(
                "A user named {} already exists",
                req.name
            )));
        }
        let info = UserInfo {
            name: req.name.clone(),
            admin: req.admin,
            created: now(),
            generation: 0,
        };
        let f = file.get_mut();
        f.version = 1;
        f.users.push(UserRecord {
            info: info.clone(),
            phc,
        });
        file.save()?;
        Ok(info)
    }

    /// The users, without hashes.
    pub fn list(&self) -> ServiceResult<Vec<UserInfo>> {
        Ok(self
            .file
            .lock()?
            .get()
            .users
            .iter()
            .map(|u| u.info.clone())
            .collect())
    }

    /// One user, if it exists.
    pub fn get(&self, name: &str) -> ServiceResult<Option<UserInfo>> {
        Ok(self
            .file
            .lock()?
            .get()
            .users
            .iter()
            .find(|u| u.info.name == name)
            .map(|u| u.info.clone()))
    }

    /// Removes a user; its sessions end at their next request.
    pub fn remove(&self, name: &str) -> ServiceResult<UserInfo> {
        let mut file = self.file.lock()?;
        let pos = file
            .get()
            .users
            .iter()
            .position(|u| u.info.name == name)
            .ok_or_else(|| ServiceError::NotFound(format!("User {name}")))?;
        let removed = file.get_mut().users.remove(pos);
        file.save()?;
        Ok(removed.info)
    }

    /// Sets a user's password; the user's sessions end.
    pub fn set_password(&self, name: &str, password: &str) -> ServiceResult<UserInfo> {
        check_password(password)?;
        let phc = hash_password(password)?;
        let mut file = self.file.lock()?;
        let user = file
            .get_mut()
            .users
            .iter_mut()
            .find(|u| u.info.name == name)
            .ok_or_else(|| ServiceError::NotFound(format!("User {name}")))?;
        user.phc = phc;
        user.info.generation += 1;
        let info = user.info.clone();
        file.save()?;
        Ok(info)
    }

    /// Checks a name and password; the user on success, [`ServiceError::Unauthorized`]
    /// otherwise (the same answer, in about the same time, for an unknown name).
    pub fn verify(&self, name: &str, password: &str) -> ServiceResult<UserInfo> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(ServiceError::Unauthorized);
        }
        let (info, phc) = {
            let file = self.file.lock()?;
            match file.get().users.iter().find(|u| u.info.name == name) {
                Some(u) => (Some(u.info.clone()), u.phc.clone()),
                None => (None, DUMMY_PHC.to_string()),
            }
        };
        let ok = self.bounded(|| {
            PasswordHash::new(&phc)
                .map(|h| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                })
                .unwrap_or(false)
        });
        match info {
            Some(info) if ok => Ok(info),
            _ => Err(ServiceError::Unauthorized),
        }
    }

    /// Runs `f` once fewer than [`MAX_CONCURRENT_CHECKS`] others run.
    fn bounded<R>(&self, f: impl FnOnce() -> R) -> R {
        let mut n = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= MAX_CONCURRENT_CHECKS {
            n = self.check_done.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        drop(n);
        let out = f();
        *self.checks.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.check_done.notify_one();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, password: &str, admin: bool) -> CreateUser {
        CreateUser {
            name: name.into(),
            password: password.into(),
            admin,
        }
    }

    #[test]
    fn passwords_verify_hashes_are_argon2id_and_nothing_secret_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.json");
        let users = UserStore::open(path.clone()).unwrap();
        let alice = users.create(&req("alice", "correct horse", true)).unwrap();
        assert!(alice.admin);
        assert_eq!(users.verify("alice", "correct horse").unwrap(), alice);
        for (name, pw) in [
            ("alice", "wrong horse"),
            ("alice", ""),
            ("bob", "correct horse"),
            ("", ""),
        ] {
            let e = users.verify(name, pw).unwrap_err();
            assert_eq!(e.status(), 401, "{name}/{pw}");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("correct horse"));
        assert!(text.contains("$argon2id$v=19$m=19456,t=2,p=1$"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The dummy hash parses, so unknown names cost a real check.
        assert!(PasswordHash::new(DUMMY_PHC).is_ok());
    }

    #[test]
    fn bad_names_short_passwords_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let users = UserStore::open(dir.path().join("users.json")).unwrap();
        assert_eq!(
            users
                .create(&req("a/b", "long enough", false))
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            users
                .create(&req("carol", "short", false))
                .unwrap_err()
                .status(),
            400
        );
        let huge = "x".repeat(MAX_PASSWORD_BYTES + 1);
        assert_eq!(
            users
                .create(&req("carol", &huge, false))
                .unwrap_err()
                .status(),
            400
        );
        users.create(&req("carol", "long enough", false)).unwrap();
        assert_eq!(
            users
                .create(&req("carol", "long enough", true))
                .unwrap_err()
                .status(),
            409
        );
        assert_eq!(users.verify("carol", &huge).unwrap_err().status(), 401);
    }

    #[test]
    fn a_password_change_bumps_the_generation_and_removal_forgets_the_user() {
        let dir = tempfile::tempdir().unwrap();
        let users = UserStore::open(dir.path().join("users.json")).unwrap();
        users.create(&req("dave", "first password", false)).unwrap();
        let changed = users.set_password("dave", "second password").unwrap();
        assert_eq!(changed.generation, 1);
        assert_eq!(
            users.verify("dave", "first password").unwrap_err().status(),
            401
        );
        users.verify("dave", "second password").unwrap();
        users.remove("dave").unwrap();
        assert!(users.get("dave").unwrap().is_none());
        assert_eq!(
            users
                .verify("dave", "second password")
                .unwrap_err()
                .status(),
            401
        );
        assert_eq!(users.remove("dave").unwrap_err().status(), 404);
    }
}
