//! Bearer-token authentication with two roles, `admin` (read and write) and `viewer` (read).
//!
//! Tokens come from a file of `role:token` lines (a mounted Kubernetes Secret). A caller is
//! identified in the audit log by role and line number (`admin#2`), never by the token itself.
//! Tokens are compared in constant time and the file is re-read when it changes on disk, so a
//! rotated Secret takes effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read and write.
    Admin,
    /// Read only.
    Viewer,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }

    /// Lower-case role name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Its role.
    pub role: Role,
    /// Audit identity: role and line of the tokens file.
    pub name: String,
}

/// Why the tokens file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// Unreadable.
    #[error("failed to read admin tokens file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `role:token` (the line's content is not repeated: it may be a secret).
    #[error(
        "failed to parse admin tokens file {path}, line {line}: expected \"admin:<token>\" or \"viewer:<token>\" with a token of at least 16 characters"
    )]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
}

struct Entry {
    role: Role,
    line: usize,
    token: Zeroizing<Vec<u8>>,
}

struct Loaded {
    entries: Vec<Entry>,
    modified: Option<SystemTime>,
}

/// The set of valid tokens.
pub struct Tokens {
    path: Option<PathBuf>,
    loaded: RwLock<Loaded>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.loaded.read().map(|l| l.entries.len()).unwrap_or(0);
        f.debug_struct("Tokens")
            .field("path", &self.path)
            .field("tokens", &format_args!("<{count} redacted>"))
            .finish()
    }
}

impl Tokens {
    /// Loads the tokens file; refuses a malformed one.
    pub fn from_file(path: &Path) -> Result<Self, TokensError> {
        let (entries, modified) = read_tokens(path)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            loaded: RwLock::new(Loaded { entries, modified }),
        })
    }

    /// Tokens given directly (tests, the demo).
    pub fn from_lines(text: &str) -> Result<Self, TokensError> {
        let entries = parse_tokens(Path::new("<inline>"), text)?;
        Ok(Self {
            path: None,
            loaded: RwLock::new(Loaded {
                entries,
                modified: None,
            }),
        })
    }

    /// Reloads the file if its modification time changed; keeps the old tokens if the new file
    /// is malformed (and says so in the log) rather than locking everybody out.
    fn refresh(&self) {
        let Some(path) = &self.path else { return };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let current = self.loaded.read().map(|l| l.modified).unwrap_or(None);
        if modified.is_none() || modified == current {
            return;
        }
        match read_tokens(path) {
            Ok((entries, modified)) => {
                if let Ok(mut loaded) = self.loaded.write() {
                    *loaded = Loaded { entries, modified };
                    tracing::info!(path = %path.display(), "admin tokens reloaded");
                }
            }
            Err(err) => tracing::warn!(error = %err, "keeping previous admin tokens"),
        }
    }

    /// The caller a bearer token belongs to.
    pub fn authenticate(&self, presented: &str) -> Option<Caller> {
        self.refresh();
        let loaded = self.loaded.read().ok()?;
        let mut found: Option<&Entry> = None;
        // Compare against every entry so the time taken does not reveal which one matched.
        for entry in &loaded.entries {
            if bool::from(entry.token.as_slice().ct_eq(presented.as_bytes())) && found.is_none() {
                found = Some(entry);
            }
        }
        found.map(|e| Caller {
            role: e.role,
            name: format!("{}#{}", e.role.as_str(), e.line),
        })
    }
}

fn read_tokens(path: &Path) -> Result<(Vec<Entry>, Option<SystemTime>), TokensError> {
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| TokensError::Read {
                path: path.to_path_buf(),
                source,
            })?,
        );
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((parse_tokens(path, &text)?, modified))
}

fn parse_tokens(path: &Path, text: &str) -> Result<Vec<Entry>, TokensError> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || TokensError::Line {
            path: path.to_path_buf(),
            line: line_no,
        };
        let (role, token) = line.split_once(':').ok_or_else(bad)?;
        let role = Role::parse(role.trim()).ok_or_else(bad)?;
        let token = token.trim();
        if token.len() < 16 {
            return Err(bad());
        }
        entries.push(Entry {
            role,
            line: line_no,
            token: Zeroizing::new(token.as_bytes().to_vec()),
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_roles_and_line_identities() {
        let t = Tokens::from_lines(
            "# comment\nadmin:aaaaaaaaaaaaaaaaaaaa\nviewer:vvvvvvvvvvvvvvvvvvvv\n",
        )
        .unwrap();
        assert_eq!(
            t.authenticate("aaaaaaaaaaaaaaaaaaaa"),
            Some(Caller {
                role: Role::Admin,
                name: "admin#2".into()
            })
        );
        assert_eq!(
            t.authenticate("vvvvvvvvvvvvvvvvvvvv").unwrap().role,
            Role::Viewer
        );
        assert_eq!(t.authenticate("aaaaaaaaaaaaaaaaaaa"), None);
        assert_eq!(t.authenticate(""), None);
        assert!(!format!("{t:?}").contains("aaaa"));
    }

    #[test]
    fn malformed_lines_are_refused_without_echoing_them() {
        let err = Tokens::from_lines("root:supersecrettoken123\n").unwrap_err();
        assert!(err.to_string().contains("line 1"));
        assert!(!err.to_string().contains("supersecret"));
        assert!(Tokens::from_lines("admin:short\n").is_err());
        assert!(Tokens::from_lines("admintoken\n").is_err());
    }

    #[test]
    fn a_changed_file_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "admin:first-token-0123456789\n").unwrap();
        let t = Tokens::from_file(&path).unwrap();
        assert!(t.authenticate("first-token-0123456789").is_some());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "viewer:second-token-0123456789\n").unwrap();
        // Some filesystems keep whole-second mtimes; make the change visible regardless.
        let later = SystemTime::now() + std::time::Duration::from_secs(2);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(later).unwrap();
        assert!(t.authenticate("second-token-0123456789").is_some());
        assert!(t.authenticate("first-token-0123456789").is_none());
    }
}
