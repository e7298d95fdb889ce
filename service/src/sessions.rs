//! Web UI sessions: a token or a local user's password, presented once, becomes a session
//! whose id travels in a cookie.
//!
//! A session has a random id (32 bytes, shown once, kept only as its SHA-256), a CSRF token (32
//! random bytes) that every state-changing request made with the session must repeat in a
//! header, an absolute lifetime and an idle timeout. Sessions live in memory: a restart signs
//! everyone out. Each use checks that what the session was made from still holds: the token
//! still exists, the user still exists with the same password generation; a revoked token, a
//! removed user or a changed password ends its sessions at their next request.
//!
//! At most [`MAX_SESSIONS`] exist; beyond that the one used least recently is ended.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Service, ServiceError, ServiceResult};

/// Sessions kept at most.
pub const MAX_SESSIONS: usize = 10_000;

/// How long sessions last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionSettings {
    /// From sign-in to the end, however busy.
    pub lifetime: Duration,
    /// Without a request for this long, a session ends.
    pub idle: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            lifetime: Duration::from_secs(12 * 3600),
            idle: Duration::from_secs(3600),
        }
    }
}

/// What a session was made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// An API token, by id.
    Token {
        /// The token's public id.
        id: String,
    },
    /// A local user.
    User {
        /// The user's name.
        name: String,
        /// The user's password generation at sign-in.
        generation: u64,
    },
}

/// A session as the caller sees it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    /// `token` or `user`.
    pub kind: &'static str,
    /// The token's or the user's name.
    pub name: String,
    /// Admin rights.
    pub admin: bool,
    /// The CSRF token to send as `X-CSRF-Token` with every state-changing request.
    pub csrf: String,
    /// When the session ends at the latest, seconds since the Unix epoch.
    pub expires: u64,
    /// Seconds without a request after which it ends.
    pub idle_timeout: u64,
}

#[derive(Debug)]
struct Session {
    principal: Principal,
    csrf: String,
    created: Instant,
    last_used: Instant,
    expires_unix: u64,
}

/// The sessions of a server.
#[derive(Debug)]
pub struct Sessions {
    settings: SessionSettings,
    table: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_hex(bytes: usize) -> ServiceResult<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| ServiceError::internal(format!("No randomness for a session: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// No sessions yet.
    pub fn new(settings: SessionSettings) -> Sessions {
        Sessions {
            settings,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// The lifetimes in force.
    pub fn settings(&self) -> SessionSettings {
        self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.created) < self.settings.lifetime
            && now.duration_since(s.last_used) < self.settings.idle
    }

    /// Starts a session; returns its id (shown only now) and its CSRF token.
    fn create(&self, principal: Principal) -> ServiceResult<(String, String, u64)> {
        let id = random_hex(32)?;
        let csrf = random_hex(32)?;
        let now = Instant::now();
        let expires_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_add(self.settings.lifetime.as_secs());
        let mut table = self.lock();
        if table.len() >= MAX_SESSIONS {
            table.retain(|_, s| self.live(s, now));
        }
        if table.len() >= MAX_SESSIONS {
            if let Some(oldest) = table
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| *k)
            {
                table.remove(&oldest);
            }
        }
        table.insert(
            key(&id),
            Session {
                principal,
                csrf: csrf.clone(),
                created: now,
                last_used: now,
                expires_unix,
            },
        );
        Ok((id, csrf, expires_unix))
    }

    /// The live session with this id (touched unless `peek`), or `None`; an expired one is
    /// removed.
    fn find(&self, id: &str, peek: bool) -> Option<(Principal, String, u64)> {
        let now = Instant::now();
        let k = key(id);
        let mut table = self.lock();
        let s = table.get_mut(&k)?;
        if !self.live(s, now) {
            table.remove(&k);
            return None;
        }
        if !peek {
            s.last_used = now;
        }
        Some((s.principal.clone(), s.csrf.clone(), s.expires_unix))
    }

    /// Ends a session (signing out); whether it existed.
    pub fn end(&self, id: &str) -> bool {
        self.lock().remove(&key(id)).is_some()
    }

    /// Sessions alive now.
    pub fn count(&self) -> usize {
        let now = Instant::now();
        self.lock().values().filter(|s| self.live(s, now)).count()
    }
}

/// Whether `presented` is this session's CSRF token (compared in constant time).
pub fn csrf_matches(info: &SessionInfo, presented: &str) -> bool {
    presented.len() == info.csrf.len()
        && bool::from(presented.as_bytes().ct_eq(info.csrf.as_bytes()))
}

impl Service {
    /// Signs in with an API token: a new session for it.
    pub fn sign_in_with_token(&self, token: &str) -> ServiceResult<(String, SessionInfo)> {
        let info = self.tokens.verify(token)?;
        self.start_session(Principal::Token { id: info.id })
    }

    /// Signs in with a local user's name and password.
    pub fn sign_in_with_password(
        &self,
        name: &str,
        password: &str,
    ) -> ServiceResult<(String, SessionInfo)> {
        let user = self.users.verify(name, password)?;
        self.start_session(Principal::User {
            name: user.name,
            generation: user.generation,
        })
    }

    fn start_session(&self, principal: Principal) -> ServiceResult<(String, SessionInfo)> {
        let (id, _, _) = self.sessions.create(principal)?;
        let info = self.session(&id)?;
        Ok((id, info))
    }

    /// The session with this id, if it is alive and what it was made from still holds
    /// ([`ServiceError::Unauthorized`] otherwise). Counts as use (for the idle timeout).
    pub fn session(&self, id: &str) -> ServiceResult<SessionInfo> {
        self.session_with(id, false)
    }

    /// [`Service::session`] without counting as use: for long-lived streams, which must not
    /// keep an unattended session alive.
    pub fn peek_session(&self, id: &str) -> ServiceResult<SessionInfo> {
        self.session_with(id, true)
    }

    fn session_with(&self, id: &str, peek: bool) -> ServiceResult<SessionInfo> {
        let (principal, csrf, expires) = self
            .sessions
            .find(id, peek)
            .ok_or(ServiceError::Unauthorized)?;
        let (kind, name, admin) = match &principal {
            Principal::Token { id: token_id } => {
                match self.tokens.list()?.into_iter().find(|t| &t.id == token_id) {
                    Some(t) => ("token", t.name, t.admin),
                    None => {
                        self.sessions.end(id);
                        return Err(ServiceError::Unauthorized);
                    }
                }
            }
            Principal::User { name, generation } => match self.users.get(name)? {
                Some(u) if u.generation == *generation => ("user", u.name, u.admin),
                _ => {
                    self.sessions.end(id);
                    return Err(ServiceError::Unauthorized);
                }
            },
        };
        Ok(SessionInfo {
            kind,
            name,
            admin,
            csrf,
            expires,
            idle_timeout: self.sessions.settings().idle.as_secs(),
        })
    }

    /// Signs out: the session ends at once.
    pub fn sign_out(&self, id: &str) {
        self.sessions.end(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::CreateUser;
    use crate::DataDir;

    fn service(settings: SessionSettings) -> (tempfile::TempDir, Service) {
        let dir = tempfile::tempdir().unwrap();
        let svc = Service::open(DataDir::at(dir.path().join("data")))
            .unwrap()
            .with_sessions(settings);
        (dir, svc)
    }

    #[test]
    fn a_token_session_lives_until_sign_out_or_revocation() {
        let (_d, svc) = service(SessionSettings::default());
        let (info, token) = svc.tokens.create("ui", false).unwrap();
        assert_eq!(
            svc.sign_in_with_token("nope.nope").unwrap_err().status(),
            401
        );
        let (id, s) = svc.sign_in_with_token(&token).unwrap();
        assert_eq!((s.kind, s.name.as_str(), s.admin), ("token", "ui", false));
        assert_eq!(s.csrf.len(), 64);
        assert!(csrf_matches(&s, &s.csrf));
        assert!(!csrf_matches(&s, ""));
        assert!(!csrf_matches(&s, &"0".repeat(64)));
        assert_eq!(svc.session(&id).unwrap().csrf, s.csrf);
        assert_eq!(svc.session("not-a-session").unwrap_err().status(), 401);
        svc.sign_out(&id);
        assert_eq!(svc.session(&id).unwrap_err().status(), 401);
        let (id2, _) = svc.sign_in_with_token(&token).unwrap();
        svc.tokens.revoke(&info.id).unwrap();
        assert_eq!(svc.session(&id2).unwrap_err().status(), 401);
        assert_eq!(svc.sessions.count(), 0);
    }

    #[test]
    fn user_sessions_end_with_a_password_change_or_removal() {
        let (_d, svc) = service(SessionSettings::default());
        svc.users
            .create(&CreateUser {
                name: "erin".into(),
                password: "pass phrase one".into(),
                admin: true,
            })
            .unwrap();
        assert_eq!(
            svc.sign_in_with_password("erin", "wrong")
                .unwrap_err()
                .status(),
            401
        );
        let (id, s) = svc
            .sign_in_with_password("erin", "pass phrase one")
            .unwrap();
        assert_eq!((s.kind, s.admin), ("user", true));
        svc.users.set_password("erin", "pass phrase two").unwrap();
        assert_eq!(svc.session(&id).unwrap_err().status(), 401);
        let (id, _) = svc
            .sign_in_with_password("erin", "pass phrase two")
            .unwrap();
        svc.users.remove("erin").unwrap();
        assert_eq!(svc.session(&id).unwrap_err().status(), 401);
    }

    #[test]
    fn sessions_expire_by_lifetime_and_by_idleness_and_peeking_does_not_keep_them() {
        let (_d, svc) = service(SessionSettings {
            lifetime: Duration::from_millis(400),
            idle: Duration::from_secs(60),
        });
        let (_, token) = svc.tokens.create("t", true).unwrap();
        let (id, _) = svc.sign_in_with_token(&token).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        svc.session(&id).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(svc.session(&id).unwrap_err().status(), 401, "lifetime");

        let (_d, svc) = service(SessionSettings {
            lifetime: Duration::from_secs(60),
            idle: Duration::from_millis(300),
        });
        let (_, token) = svc.tokens.create("t", true).unwrap();
        let (id, _) = svc.sign_in_with_token(&token).unwrap();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(150));
            svc.session(&id).unwrap();
        }
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(150));
            let _ = svc.peek_session(&id);
        }
        assert_eq!(svc.session(&id).unwrap_err().status(), 401, "idle");
    }

    #[test]
    fn the_table_is_bounded() {
        let sessions = Sessions::new(SessionSettings::default());
        let mut first = None;
        for i in 0..MAX_SESSIONS + 5 {
            let (id, _, _) = sessions
                .create(Principal::Token { id: format!("{i}") })
                .unwrap();
            first.get_or_insert(id);
        }
        assert_eq!(sessions.count(), MAX_SESSIONS);
        assert!(sessions.find(first.as_ref().unwrap(), true).is_none());
    }
}
