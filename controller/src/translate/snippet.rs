//! `configuration-snippet` and `server-snippet`: nginx configuration, read for what tidegate has
//! an equivalent of. Each `*_by_lua_block { ... }` (and `*_by_lua '...'`) runs as the route's
//! Lua in its phase, unchanged; `more_set_headers` and `add_header` set response headers, and
//! `proxy_set_header` upstream request headers (nginx variables allowed); `return 301..308 URL`
//! redirects every request, as the `*-redirect` annotations do. Any other directive is refused
//! with its line: the routes then answer 503, never serve without it.

use tidegate_snapshot::{Phase, SetHeader, Template};

/// What a snippet holds, translated.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Snippet {
    pub(super) lua: Vec<(Phase, String)>,
    pub(super) response_headers: Vec<SetHeader>,
    pub(super) upstream_headers: Vec<SetHeader>,
    /// `return CODE URL` with a redirect code.
    pub(super) redirect: Option<tidegate_snapshot::Redirect>,
}

/// Reads a snippet; `Err` names the first line tidegate cannot honour.
pub(super) fn read(text: &str) -> Result<Snippet, String> {
    let mut snippet = Snippet::default();
    let mut lexer = Lexer { text, at: 0 };
    while let Some((name, line)) = lexer.word()? {
        if let Some(phase) = name.strip_suffix("_by_lua_block").and_then(phase_of) {
            let body = lexer.block().map_err(|e| format!("line {line}: {name}: {e}"))?;
            snippet.lua.push((phase, body));
            continue;
        }
        let args = lexer.arguments().map_err(|e| format!("line {line}: {name}: {e}"))?;
        if let Some(phase) = name.strip_suffix("_by_lua").and_then(phase_of) {
            match args.as_slice() {
                [source] => snippet.lua.push((phase, source.clone())),
                _ => return Err(format!("line {line}: {name} takes one quoted Lua source")),
            }
            continue;
        }
        let header = |name: &str, value: &str| -> Result<SetHeader, String> {
            http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("line {line}: {name:?} is not a header name"))?;
            let value: Template = value.parse().map_err(|e| format!("line {line}: {e}"))?;
            Ok(SetHeader { name: name.to_ascii_lowercase(), value })
        };
        match (name.as_str(), args.as_slice()) {
            ("more_set_headers", values) if !values.is_empty() && !values[0].starts_with('-') => {
                for pair in values {
                    let (n, v) = pair
                        .split_once(':')
                        .ok_or_else(|| format!("line {line}: more_set_headers {pair:?} is not \"Name: value\""))?;
                    snippet.response_headers.push(header(n.trim(), v.trim())?);
                }
            }
            // `always` or not: tidegate sets the header on every response.
            ("add_header", [n, v]) | ("add_header", [n, v, _]) => snippet.response_headers.push(header(n, v)?),
            ("proxy_set_header", [n, v]) => snippet.upstream_headers.push(header(n, v)?),
            ("return", [code, to]) if matches!(code.as_str(), "301" | "302" | "303" | "307" | "308") => {
                let to: Template = to.parse().map_err(|e| format!("line {line}: {e}"))?;
                let status = code.parse().unwrap_or(302);
                snippet.redirect = Some(tidegate_snapshot::Redirect { to, status });
            }
            _ => return Err(format!("line {line}: `{name}` has no tidegate equivalent")),
        }
    }
    Ok(snippet)
}

fn phase_of(prefix: &str) -> Option<Phase> {
    Some(match prefix {
        "rewrite" => Phase::Rewrite,
        "access" => Phase::Access,
        "content" => Phase::Content,
        "header_filter" => Phase::HeaderFilter,
        "body_filter" => Phase::BodyFilter,
        "log" => Phase::Log,
        _ => return None,
    })
}

/// nginx configuration, token by token.
struct Lexer<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Lexer<'a> {
    fn line(&self) -> usize {
        self.text[..self.at].matches('\n').count() + 1
    }

    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    /// Skips spaces and `#` comments.
    fn skip(&mut self) {
        loop {
            let trimmed = self.rest().trim_start();
            self.at = self.text.len() - trimmed.len();
            if trimmed.starts_with('#') {
                self.at += trimmed.find('\n').unwrap_or(trimmed.len());
            } else {
                return;
            }
        }
    }

    /// The next directive's name and line; `None` at the end.
    fn word(&mut self) -> Result<Option<(String, usize)>, String> {
        self.skip();
        if self.rest().is_empty() {
            return Ok(None);
        }
        let line = self.line();
        let end = self.rest().find(|c: char| c.is_whitespace() || c == ';' || c == '{').unwrap_or(self.rest().len());
        if end == 0 {
            return Err(format!(
                "line {line}: expected a directive, found {:?}",
                self.rest().chars().next().unwrap_or(' ')
            ));
        }
        let word = self.rest()[..end].to_owned();
        self.at += end;
        Ok(Some((word, line)))
    }

    /// A directive's arguments up to its `;` (quoted or bare words).
    fn arguments(&mut self) -> Result<Vec<String>, String> {
        let mut args = Vec::new();
        loop {
            self.skip();
            let rest = self.rest();
            match rest.chars().next() {
                None => return Err("no ';' at the end".into()),
                Some(';') => {
                    self.at += 1;
                    return Ok(args);
                }
                Some('{') => return Err("a block here is not supported".into()),
                Some(quote @ ('"' | '\'')) => {
                    let body = &rest[1..];
                    let mut value = String::new();
                    let mut chars = body.char_indices();
                    let end = loop {
                        match chars.next() {
                            None => return Err("a quoted string does not end".into()),
                            Some((i, c)) if c == quote => break i,
                            Some((_, '\\')) => match chars.next() {
                                Some((_, c)) if c == quote || c == '\\' => value.push(c),
                                Some((_, c)) => {
                                    value.push('\\');
                                    value.push(c);
                                }
                                None => return Err("a quoted string does not end".into()),
                            },
                            Some((_, c)) => value.push(c),
                        }
                    };
                    self.at += 1 + end + 1;
                    args.push(value);
                }
                Some(_) => {
                    let end = rest.find(|c: char| c.is_whitespace() || c == ';').unwrap_or(rest.len());
                    args.push(rest[..end].to_owned());
                    self.at += end;
                }
            }
        }
    }

    /// A `{ ... }` block's text, braces balanced (Lua strings and comments holding unbalanced
    /// braces are not told apart, as with nginx's own lexer for these blocks before 1.19).
    fn block(&mut self) -> Result<String, String> {
        self.skip();
        if !self.rest().starts_with('{') {
            return Err("expected '{'".into());
        }
        let mut depth = 0usize;
        for (i, c) in self.rest().char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        let body = self.rest()[1..i].to_owned();
                        self.at += i + 1;
                        return Ok(body);
                    }
                }
                _ => {}
            }
        }
        Err("the block does not end".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lua_blocks_and_header_directives_are_translated() {
        let snippet = read(
            "# a comment\nmore_set_headers \"X-Frame-Options: DENY\" 'X-Host: $host';\nadd_header X-Extra yes always;\nproxy_set_header X-Real-Host $host;\naccess_by_lua_block {\n  if ngx.var.arg_block then return ngx.exit(403) end\n  local t = { a = 1 }\n}\nheader_filter_by_lua 'ngx.header[\"X-Lua\"] = \"1\"';\n",
        )
        .expect("translated");
        let names: Vec<&str> = snippet.response_headers.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["x-frame-options", "x-host", "x-extra"]);
        assert_eq!(snippet.upstream_headers[0].name, "x-real-host");
        assert_eq!(snippet.lua.len(), 2);
        assert_eq!(snippet.lua[0].0, Phase::Access);
        assert!(snippet.lua[0].1.contains("local t = { a = 1 }"), "{:?}", snippet.lua[0].1);
        assert_eq!(snippet.lua[1], (Phase::HeaderFilter, "ngx.header[\"X-Lua\"] = \"1\"".into()));
    }

    #[test]
    fn other_directives_are_refused_with_their_line() {
        assert_eq!(
            read("add_header A b;\ndeny all;").expect_err("refused"),
            "line 2: `deny` has no tidegate equivalent"
        );
        assert!(read("more_set_headers \"A: b\"").expect_err("refused").contains("no ';'"));
        assert!(read("access_by_lua_block { if x then").expect_err("refused").contains("does not end"));
        assert!(read("set_by_lua $x 'return 1';").expect_err("refused").contains("`set_by_lua`"));
        assert!(read("more_set_headers -s 404 \"A: b\";").is_err(), "status filters are not translated");
        assert!(read("return 200 'ok';").expect_err("refused").contains("`return`"), "only redirects");
        let redirect = read("return 301 https://$host$request_uri;").expect("a redirect").redirect.expect("set");
        assert_eq!((redirect.status, String::from(redirect.to)), (301, "https://$host$request_uri".to_owned()));
    }
}
