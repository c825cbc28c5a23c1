//! Field checks shared by Ingress and LuaRoute validation. Each returns why a value is wrong.

/// A host as Ingress v1 allows it: a lower-case DNS name, optionally `*.` followed by one; no IP
/// address, no port.
pub(crate) fn check_host(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name.is_empty() {
        return Err(format!("{host:?} is not a DNS name"));
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{host:?} is an IP address; hosts must be DNS names"));
    }
    if name.len() > 253 {
        return Err(format!("{host:?} is longer than 253 characters"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{host:?} is not a lower-case DNS name (labels of a-z, 0-9 and '-', '*' only as the whole first label)"
            ));
        }
    }
    Ok(())
}

/// A path for Exact and Prefix matching: absolute, no query, no fragment.
pub(crate) fn check_path_value(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    if path.contains(['?', '#']) || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!("{path:?} must not contain '?', '#', spaces or control characters"));
    }
    Ok(())
}

pub(crate) fn check_port_number(port: i32) -> Result<u16, String> {
    u16::try_from(port).ok().filter(|p| *p != 0).ok_or_else(|| format!("{port} is not a port number (1-65535)"))
}

/// An nginx size: bytes, or a number with `k`, `m` or `g` (either case).
pub(crate) fn parse_size(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let (digits, unit) = match value.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&value[..i], c.to_ascii_lowercase()),
        _ => (value, 'b'),
    };
    let scale: u64 = match unit {
        'b' => 1,
        'k' => 1 << 10,
        'm' => 1 << 20,
        'g' => 1 << 30,
        _ => return Err(format!("{value:?} is not a size (a number of bytes, or with k, m or g)")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{value:?} is not a size (a number of bytes, or with k, m or g)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in ["foo.com", "*.foo.com", "a-b.c1.io", "localhost"] {
            assert_eq!(check_host(ok), Ok(()), "{ok} is a valid host");
        }
        for bad in ["", "*", "Foo.com", "foo.*.com", "*.*.com", "1.2.3.4", "foo.com:80", "-a.com", "a..com", "*foo.com"]
        {
            assert!(check_host(bad).is_err(), "{bad:?} is not a valid host");
        }
    }

    #[test]
    fn paths() {
        assert!(check_path_value("/a/b/").is_ok());
        assert!(check_path_value("a").is_err());
        assert!(check_path_value("/a?b").is_err());
        assert!(check_path_value("").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(check_port_number(80), Ok(80));
        assert!(check_port_number(0).is_err());
        assert!(check_port_number(65536).is_err());
        assert!(check_port_number(-1).is_err());
    }
}
