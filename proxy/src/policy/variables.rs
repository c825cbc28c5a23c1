//! nginx variables (`$host`, `$request_uri`, `$http_NAME`, `$cookie_NAME`...) over a request's
//! facts, for the settings that take them: `auth-url`, `auth-signin`, `upstream-hash-by`.

use tidegate_snapshot::{Template, TemplatePart};

use super::Facts;

/// A template's text with the request's variables put in.
pub(crate) fn expand(template: &Template, facts: &Facts<'_>) -> String {
    let mut out = String::new();
    for part in template.parts() {
        match part {
            TemplatePart::Text(text) => out.push_str(text),
            TemplatePart::Variable(name) => out.push_str(&variable(name, facts)),
        }
    }
    out
}

fn variable(name: &str, facts: &Facts<'_>) -> String {
    let query = facts.uri.query().unwrap_or("");
    match name {
        "host" => facts.host.to_owned(),
        "scheme" => facts.scheme().to_owned(),
        "request_uri" => facts.request_uri().to_owned(),
        "escaped_request_uri" => escape(facts.request_uri()),
        "uri" => facts.uri.path().to_owned(),
        "args" => query.to_owned(),
        "request_method" => facts.method.as_str().to_owned(),
        "remote_addr" => facts.client.to_canonical().to_string(),
        // The user of Basic credentials, as nginx sets it (whether or not they were checked).
        "remote_user" => super::basic_auth::credentials(facts.headers).map(|(user, _)| user).unwrap_or_default(),
        "server_port" => facts.port.to_string(),
        _ => {
            if let Some(header_name) = name.strip_prefix("http_") {
                let header_name = header_name.replace('_', "-");
                return facts.headers.get(header_name.as_str()).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            }
            if let Some(cookie) = name.strip_prefix("cookie_") {
                return crate::headers::cookie(facts.headers, cookie).unwrap_or("").to_owned();
            }
            if let Some(arg) = name.strip_prefix("arg_") {
                return query
                    .split('&')
                    .find_map(|p| p.strip_prefix(arg).and_then(|r| r.strip_prefix('=')))
                    .unwrap_or("")
                    .to_owned();
            }
            String::new()
        }
    }
}

/// Percent-encodes all but the unreserved characters (nginx's `set_escape_uri`).
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_only_unreserved() {
        assert_eq!(escape("/a b?x=1&y=é"), "%2Fa%20b%3Fx%3D1%26y%3D%C3%A9");
    }
}
