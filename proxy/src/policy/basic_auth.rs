//! HTTP Basic authentication (`auth-type: basic`), as nginx's `auth_basic`: a request without
//! valid credentials gets 401 with `WWW-Authenticate: Basic realm="..."`.
//!
//! Checking a bcrypt, SHA-crypt or MD5-crypt hash costs from hundreds of microseconds to tens
//! of milliseconds of CPU, by design. The worker never spends it: a check runs on tokio's
//! blocking pool while the worker serves other requests, and credentials that passed are
//! remembered (as a SHA-256 digest of user, password and stored hash, never the password) so
//! that a client sending the same ones again costs one digest and a lookup. The memory is per
//! route and per configuration: a new Secret, or a removed user, starts it afresh.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use base64::Engine;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use sha2::{Digest, Sha256};
use tidegate_snapshot::{BasicAuth, PasswordHash};

use super::Verdict;
use super::password;
use crate::body::LocalBody;
use crate::respond::error_response;

/// Remembered credentials per route before the memory starts afresh.
const REMEMBERED: usize = 4096;

#[derive(Debug)]
pub(super) struct BasicAuthFilter {
    users: HashMap<String, Arc<PasswordHash>>,
    challenge: HeaderValue,
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl BasicAuthFilter {
    pub(super) fn new(auth: &BasicAuth) -> BasicAuthFilter {
        let realm = auth.realm.replace('\\', "\\\\").replace('"', "\\\"");
        let challenge = HeaderValue::from_str(&format!("Basic realm=\"{realm}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic realm=\"\""));
        let users = auth.users.iter().map(|c| (c.user.clone(), Arc::new(c.hash.clone()))).collect();
        BasicAuthFilter { users, challenge, verified: Mutex::new(HashSet::new()) }
    }

    pub(super) async fn check(&self, headers: &HeaderMap) -> Verdict {
        let Some((user, password)) = credentials(headers) else { return self.refuse() };
        let Some(hash) = self.users.get(&user) else { return self.refuse() };
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(&password)
            .chain_update([0])
            .chain_update(hash.as_str().as_bytes())
            .finalize()
            .into();
        if self.verified.lock().is_ok_and(|v| v.contains(&key)) {
            return Verdict::Continue;
        }
        let valid = if password::is_cheap(hash) {
            password::verify(&password, hash)
        } else {
            let hash = Arc::clone(hash);
            tokio::task::spawn_blocking(move || password::verify(&password, &hash)).await.unwrap_or(false)
        };
        if !valid {
            return self.refuse();
        }
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= REMEMBERED {
                verified.clear();
            }
            verified.insert(key);
        }
        Verdict::Continue
    }

    fn refuse(&self) -> Verdict {
        let mut response: Response<LocalBody> = error_response(StatusCode::UNAUTHORIZED);
        response.headers_mut().insert(header::WWW_AUTHENTICATE, self.challenge.clone());
        Verdict::Answer(response)
    }
}

/// `Authorization: Basic base64(user:password)`; the scheme in any case, as RFC 7617 allows.
pub(super) fn credentials(headers: &HeaderMap) -> Option<(String, Vec<u8>)> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim_ascii()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(authorization).expect("value"));
        headers
    }

    #[test]
    fn credentials_are_read_from_the_basic_scheme() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("ann:pa:ss");
        assert_eq!(credentials(&headers(&format!("Basic {encoded}"))), Some(("ann".into(), b"pa:ss".to_vec())));
        assert_eq!(credentials(&headers(&format!("bAsIc  {encoded} "))).map(|c| c.0), Some("ann".into()));
        assert_eq!(credentials(&headers(&format!("Bearer {encoded}"))), None);
        assert_eq!(credentials(&headers("Basic !!!")), None);
        assert_eq!(credentials(&HeaderMap::new()), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn users_with_the_right_password_pass_and_are_remembered() {
        let auth = BasicAuth {
            realm: "a \"quoted\" realm".into(),
            users: vec![tidegate_snapshot::Credential {
                user: "ann".into(),
                hash: "$apr1$lZL6V/ci$PR6QJXkRFUzdUuaYcwrI//".parse().expect("hash"),
            }],
        };
        let filter = BasicAuthFilter::new(&auth);
        let basic = |user_password: &str| {
            headers(&format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_password)))
        };
        assert!(matches!(filter.check(&basic("ann:secret")).await, Verdict::Continue));
        assert_eq!(filter.verified.lock().expect("lock").len(), 1, "remembered");
        assert!(matches!(filter.check(&basic("ann:secret")).await, Verdict::Continue));
        for wrong in ["ann:Secret", "bob:secret", "ann:"] {
            let Verdict::Answer(response) = filter.check(&basic(wrong)).await else { panic!("{wrong} refused") };
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Basic realm=\"a \\\"quoted\\\" realm\"");
        }
    }
}
