//! API tokens: created once, shown once, stored as SHA-256 hashes, compared in constant time.
//!
//! A token reads `ID.SECRET`: an 8-hex-digit public id (for listing and revoking) and 32 random
//! bytes in hex. `DATA/tokens.json` holds each token's id, name, creation time and the SHA-256 of
//! its secret — never the secret. The file is replaced atomically and reloaded when another
//! process (the `strata token` CLI next to a running server) changes it.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{names, write_atomically, ServiceError, ServiceResult};

/// A token as listed: never includes the secret.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Public id (the part before the dot).
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// May manage tokens (create, list, revoke). Other tokens use everything else. Tokens
    /// stored before roles existed count as admin tokens.
    #[serde(default = "admin_by_default")]
    pub admin: bool,
}

fn admin_by_default() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TokenRecord {
    #[serde(flatten)]
    info: TokenInfo,
    /// Hex SHA-256 of the secret.
    sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    version: u32,
    tokens: Vec<TokenRecord>,
}

#[derive(Debug, Default)]
struct Loaded {
    file: TokenFile,
    /// Modification time and length when read, to notice changes by other processes.
    stamp: Option<(SystemTime, u64)>,
}

/// The token list of a data directory.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    state: Mutex<Loaded>,
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_hex(bytes: usize) -> ServiceResult<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| ServiceError::internal(format!("No randomness for a token: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

impl TokenStore {
    /// Opens (or starts) the token list at `path`.
    pub fn open(path: PathBuf) -> ServiceResult<TokenStore> {
        let store = TokenStore {
            path,
            state: Mutex::new(Loaded::default()),
        };
        store.refresh()?;
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rereads the file if it changed since it was last read.
    fn refresh(&self) -> ServiceResult<()> {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.modified().unwrap_or(UNIX_EPOCH), m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(ServiceError::internal(format!(
                    "Reading {}: {e}",
                    self.path.display()
                )))
            }
        };
        let mut st = self.lock();
        if st.stamp == stamp && stamp.is_some() {
            return Ok(());
        }
        st.file = match stamp {
            None => TokenFile {
                version: 1,
                tokens: Vec::new(),
            },
            Some(_) => {
                let text = std::fs::read(&self.path).map_err(|e| {
                    ServiceError::internal(format!("Reading {}: {e}", self.path.display()))
                })?;
                serde_json::from_slice(&text).map_err(|e| {
                    ServiceError::internal(format!("{} is damaged: {e}", self.path.display()))
                })?
            }
        };
        st.stamp = stamp;
        Ok(())
    }

    fn save(&self, st: &mut Loaded) -> ServiceResult<()> {
        let text = serde_json::to_vec_pretty(&st.file)
            .map_err(|e| ServiceError::internal(e.to_string()))?;
        write_atomically(&self.path, &text)?;
        st.stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(UNIX_EPOCH), m.len()));
        Ok(())
    }

    /// Creates a token named `name` (an admin token with `admin`); returns its listing and the
    /// full token, shown only now.
    pub fn create(&self, name: &str, admin: bool) -> ServiceResult<(TokenInfo, String)> {
        names::validate("token", name)?;
        self.refresh()?;
        let mut st = self.lock();
        if st.file.tokens.iter().any(|t| t.info.name == name) {
            return Err(ServiceError::Conflict(format!(
                "A token named {name} already exists"
            )));
        }
        let id = loop {
            let id = random_hex(4)?;
            if !st.file.tokens.iter().any(|t| t.info.id == id) {
                break id;
            }
        };
        let secret = random_hex(32)?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let info = TokenInfo {
            id: id.clone(),
            name: name.to_string(),
            created,
            admin,
        };
        st.file.version = 1;
        st.file.tokens.push(TokenRecord {
            info: info.clone(),
            sha256: sha256_hex(secret.as_bytes()),
        });
        self.save(&mut st)?;
        Ok((info, format!("{id}.{secret}")))
    }

    /// The tokens, without secrets.
    pub fn list(&self) -> ServiceResult<Vec<TokenInfo>> {
        self.refresh()?;
        Ok(self
            .lock()
            .file
            .tokens
            .iter()
            .map(|t| t.info.clone())
            .collect())
    }

    /// Revokes the token with this id or name.
    pub fn revoke(&self, id_or_name: &str) -> ServiceResult<TokenInfo> {
        self.refresh()?;
        let mut st = self.lock();
        let pos = st
            .file
            .tokens
            .iter()
            .position(|t| t.info.id == id_or_name || t.info.name == id_or_name)
            .ok_or_else(|| ServiceError::NotFound(format!("Token {id_or_name}")))?;
        let removed = st.file.tokens.remove(pos);
        self.save(&mut st)?;
        Ok(removed.info)
    }

    /// Checks a presented token; returns whose it is.
    pub fn verify(&self, presented: &str) -> ServiceResult<TokenInfo> {
        self.refresh()?;
        let (id, secret) = presented.split_once('.').unwrap_or(("", presented));
        let hash = sha256_hex(secret.as_bytes());
        let st = self.lock();
        // Compare against every token so that the time taken does not depend on which id matched.
        let mut found: Option<&TokenRecord> = None;
        for t in &st.file.tokens {
            let hash_ok: bool = t.sha256.as_bytes().ct_eq(hash.as_bytes()).into();
            let id_ok: bool = t.info.id.as_bytes().ct_eq(id.as_bytes()).into();
            if hash_ok & id_ok {
                found = Some(t);
            }
        }
        found
            .map(|t| t.info.clone())
            .ok_or(ServiceError::Unauthorized)
    }

    /// Whether any token exists.
    pub fn is_empty(&self) -> ServiceResult<bool> {
        Ok(self.list()?.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_until_revoked_and_secrets_are_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path().join("tokens.json")).unwrap();
        let (info, token) = store.create("admin", true).unwrap();
        assert_eq!(store.verify(&token).unwrap().id, info.id);
        let secret = token.split_once('.').unwrap().1;
        let file = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
        assert!(!file.contains(secret), "the secret must not be stored");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tokens.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is the owner's only");
        assert!(store
            .verify(&format!("{}.{}", info.id, "0".repeat(64)))
            .is_err());
        assert!(store.verify("garbage").is_err());
        assert!(store.verify("").is_err());
        assert!(
            store.create("admin", true).is_err(),
            "duplicate names are refused"
        );
        store.revoke(&info.id).unwrap();
        assert!(store.verify(&token).is_err());
    }

    #[test]
    fn a_second_store_sees_tokens_created_by_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = TokenStore::open(dir.path().join("tokens.json")).unwrap();
        let b = TokenStore::open(dir.path().join("tokens.json")).unwrap();
        let (_, token) = a.create("cli", false).unwrap();
        assert!(b.verify(&token).is_ok());
    }
}
