//! Verifying a password against the hash formats `htpasswd` and `openssl passwd` write, in
//! constant time where the comparison is ours to make. bcrypt and SHA-crypt are the RustCrypto
//! crates' (`bcrypt`, `sha-crypt`); MD5-crypt (`$apr1$`, `$1$`) is written out here, as no
//! maintained crate provides the Apache variant.

use base64::Engine;
use md5::{Digest, Md5};
use sha_crypt::PasswordVerifier;
use subtle::ConstantTimeEq;
use tidegate_snapshot::PasswordHash;

/// Whether `password` matches `hash`. Costly for bcrypt, SHA-crypt and MD5-crypt (that is their
/// point): the caller runs it off the worker thread.
pub(super) fn verify(password: &[u8], hash: &PasswordHash) -> bool {
    match hash {
        PasswordHash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
        PasswordHash::Sha256Crypt(h) | PasswordHash::Sha512Crypt(h) => {
            sha_crypt::ShaCrypt::default().verify_password(password, h.as_str()).is_ok()
        }
        PasswordHash::Md5Crypt(h) => md5_crypt_matches(password, h),
        PasswordHash::Sha1(h) => {
            let digest = sha1::Sha1::digest(password);
            let encoded = base64::engine::general_purpose::STANDARD.encode(digest);
            h.strip_prefix("{SHA}").is_some_and(|stored| stored.as_bytes().ct_eq(encoded.as_bytes()).into())
        }
    }
}

/// Whether verifying `hash` is cheap enough to do on the worker thread.
pub(super) fn is_cheap(hash: &PasswordHash) -> bool {
    matches!(hash, PasswordHash::Sha1(_))
}

/// `$apr1$salt$hash` or `$1$salt$hash`.
fn md5_crypt_matches(password: &[u8], hash: &str) -> bool {
    let mut parts = hash.splitn(4, '$');
    let (Some(""), Some(kind), Some(salt), Some(_)) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let magic = format!("${kind}$");
    let computed = md5_crypt(password, salt.as_bytes(), magic.as_bytes());
    computed.as_bytes().ct_eq(hash.as_bytes()).into()
}

/// MD5-crypt (Poul-Henning Kamp's), which Apache's `$apr1$` runs with another magic string.
fn md5_crypt(password: &[u8], salt: &[u8], magic: &[u8]) -> String {
    let salt = &salt[..salt.len().min(8)];
    let alternate = Md5::new().chain_update(password).chain_update(salt).chain_update(password).finalize();
    let mut context = Md5::new().chain_update(password).chain_update(magic).chain_update(salt);
    let mut left = password.len();
    while left > 0 {
        let take = left.min(16);
        context.update(&alternate[..take]);
        left -= take;
    }
    let mut bits = password.len();
    while bits > 0 {
        if bits & 1 == 1 {
            context.update([0u8]);
        } else {
            context.update(&password[..1]);
        }
        bits >>= 1;
    }
    let mut digest = context.finalize();
    for round in 0..1000 {
        let mut next = Md5::new();
        if round & 1 == 1 {
            next.update(password);
        } else {
            next.update(digest);
        }
        if round % 3 != 0 {
            next.update(salt);
        }
        if round % 7 != 0 {
            next.update(password);
        }
        if round & 1 == 1 {
            next.update(digest);
        } else {
            next.update(password);
        }
        digest = next.finalize();
    }
    const ALPHABET: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(magic.len() + salt.len() + 23);
    out.push_str(&String::from_utf8_lossy(magic));
    out.push_str(&String::from_utf8_lossy(salt));
    out.push('$');
    let mut emit = |mut value: u32, count: usize| {
        for _ in 0..count {
            out.push(char::from(ALPHABET[(value & 0x3f) as usize]));
            value >>= 6;
        }
    };
    for (a, b, c) in [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)] {
        emit((u32::from(digest[a]) << 16) | (u32::from(digest[b]) << 8) | u32::from(digest[c]), 4);
    }
    emit(u32::from(digest[11]), 2);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes of "secret" as Apache's and OpenSSL's tools write them (the integration tests
    /// make more with the real tools).
    #[test]
    fn known_hashes_verify() {
        let cases = [
            "$apr1$lZL6V/ci$PR6QJXkRFUzdUuaYcwrI//",
            "$1$lZL6V/ci$X3w3tdHi.utXeZdQCB.Bm.",
            "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
        ];
        for hash in cases {
            let parsed: PasswordHash = hash.parse().expect("hash");
            assert!(verify(b"secret", &parsed), "{hash}");
            assert!(!verify(b"Secret", &parsed), "{hash}: another password");
        }
    }
}
