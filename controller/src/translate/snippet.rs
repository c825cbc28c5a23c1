//! `configuration-snippet` and `server-snippet`: nginx configuration, read for what tidegate has
//! an equivalent of, directive by directive:
//!
//! - each `*_by_lua_block { ... }` (and `*_by_lua '...'`) runs as the route's Lua in its phase,
//!   unchanged;
//! - header directives become typed policies: `more_set_headers` and `add_header` (response
//!   headers), `proxy_set_header` and `more_set_input_headers` (upstream request headers);
//! - directives an annotation has a key for are read as that key: `client_max_body_size`
//!   (`proxy-body-size`), the `proxy_*_timeout`s, `proxy_buffering` and the buffer sizes;
//! - `allow` / `deny` become ordered IP rules, checked as nginx checks them (first match);
//! - the rewrite module's directives (`set`, `if`, `return`, `rewrite ... break|redirect|
//!   permanent`) and those with no typed form (`more_clear_headers`, `proxy_hide_header`,
//!   `more_clear_input_headers`, `expires`) become generated Lua of the phase nginx runs them in.
//!
//! Any other directive, or a form of these that means more than tidegate does (`rewrite ...
//! last`, which would look for another location; `more_set_headers -s`; a `location` block), is
//! refused with its line: the routes then answer 503, never serve without it.

use tidegate_snapshot::{Cidr, IpRule, Phase, SetHeader, Template};

/// What a snippet holds, translated.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Snippet {
    pub(super) lua: Vec<(Phase, String)>,
    pub(super) response_headers: Vec<SetHeader>,
    pub(super) upstream_headers: Vec<SetHeader>,
    /// `return CODE URL` with a redirect code, outside `if`.
    pub(super) redirect: Option<tidegate_snapshot::Redirect>,
    /// Directives read as the annotation key of the same meaning: (key, value).
    pub(super) keys: Vec<(&'static str, String)>,
    /// `allow` and `deny`, in order.
    pub(super) ip_rules: Vec<IpRule>,
}

/// How one directive of a snippet is taken (for the migration report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Line {
    pub(crate) line: usize,
    pub(crate) directive: String,
    pub(crate) taken: Taken,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Runs as the route's Lua in this phase, unchanged.
    Lua(Phase),
    /// Becomes a typed policy, or generated Lua of the phase nginx runs it in.
    Translated,
    /// Not honoured: the routes answer 503. Why, with the line.
    Refused(String),
}

/// Reads a snippet; `Err` names the first line tidegate cannot honour.
pub(super) fn read(text: &str) -> Result<Snippet, String> {
    let (snippet, lines) = walk(text);
    match lines.into_iter().find_map(|l| match l.taken {
        Taken::Refused(why) => Some(why),
        _ => None,
    }) {
        Some(why) => Err(why),
        None => Ok(snippet),
    }
}

/// Every directive of a snippet with how it is taken.
pub(crate) fn lines(text: &str) -> Vec<Line> {
    walk(text).1
}

/// Annotation keys whose meaning a directive has, with the value's form unchanged.
const AS_KEYS: &[(&str, &str)] = &[
    ("client_max_body_size", "proxy-body-size"),
    ("proxy_connect_timeout", "proxy-connect-timeout"),
    ("proxy_read_timeout", "proxy-read-timeout"),
    ("proxy_send_timeout", "proxy-send-timeout"),
    ("proxy_buffering", "proxy-buffering"),
    ("proxy_request_buffering", "proxy-request-buffering"),
    ("proxy_buffer_size", "proxy-buffer-size"),
    ("client_body_buffer_size", "client-body-buffer-size"),
    ("proxy_max_temp_file_size", "proxy-max-temp-file-size"),
    ("proxy_http_version", "proxy-http-version"),
];

fn walk(text: &str) -> (Snippet, Vec<Line>) {
    let mut snippet = Snippet::default();
    let mut lines = Vec::new();
    let mut lexer = Lexer { text, at: 0 };
    // The rewrite module's directives, as one Lua handler of the rewrite phase (nginx runs
    // them there, in order); headers to clear and `expires`, as one of header_filter.
    let mut rewrite = LuaRewrite::default();
    let mut header_filter = String::new();
    loop {
        let (name, line) = match lexer.word() {
            Ok(Some(word)) => word,
            Ok(None) => break,
            Err(why) => {
                lines.push(Line { line: lexer.line(), directive: String::new(), taken: Taken::Refused(why) });
                break;
            }
        };
        let refuse = |why: String| Taken::Refused(format!("line {line}: {why}"));
        let taken = if let Some(phase) = name.strip_suffix("_by_lua_block").and_then(phase_of) {
            match lexer.block() {
                Ok(body) => {
                    snippet.lua.push((phase, body));
                    Taken::Lua(phase)
                }
                Err(e) => refuse(format!("{name}: {e}")),
            }
        } else if name == "if" {
            match lexer.condition().and_then(|c| Ok((c, lexer.block()?))) {
                Ok((condition, body)) => match rewrite.branch(&condition, &body) {
                    Ok(()) => Taken::Translated,
                    Err(e) => refuse(format!("if: {e}")),
                },
                Err(e) => refuse(format!("if: {e}")),
            }
        } else {
            match lexer.arguments() {
                Err(e) => {
                    lexer.skip_statement();
                    if e.contains("block") {
                        refuse(format!("`{name}` with a block has no tidegate equivalent"))
                    } else {
                        refuse(format!("{name}: {e}"))
                    }
                }
                Ok(args) => match directive(&name, &args, &mut snippet, &mut rewrite, &mut header_filter) {
                    Ok(taken) => taken,
                    Err(e) => refuse(e),
                },
            }
        };
        let stop = matches!(&taken, Taken::Refused(why) if why.contains("does not end"));
        lines.push(Line { line, directive: name, taken });
        if stop {
            break;
        }
    }
    if let Some(source) = rewrite.source() {
        snippet.lua.insert(0, (Phase::Rewrite, source));
    }
    if rewrite.headers_in_if {
        header_filter.push_str(
            "local h = ngx.ctx.snippet_headers\nif h then for _, p in ipairs(h) do ngx.header[p[1]] = p[2] end end\n",
        );
    }
    if !header_filter.is_empty() {
        snippet.lua.push((Phase::HeaderFilter, header_filter));
    }
    (snippet, lines)
}

/// One directive with its arguments (not `if`, not a Lua block).
fn directive(
    name: &str,
    args: &[String],
    snippet: &mut Snippet,
    rewrite: &mut LuaRewrite,
    header_filter: &mut String,
) -> Result<Taken, String> {
    let header = |name: &str, value: &str| -> Result<SetHeader, String> {
        http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))?;
        let value: Template = rewrite.expand(value).parse()?;
        Ok(SetHeader { name: name.to_ascii_lowercase(), value })
    };
    let pairs = |values: &[String], directive: &str| -> Result<Vec<(String, String)>, String> {
        if values.is_empty() || values.iter().any(|v| v.starts_with('-')) {
            return Err(format!("{directive} with -s, -t or -r is not translated"));
        }
        values
            .iter()
            .map(|pair| {
                pair.split_once(':')
                    .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                    .ok_or_else(|| format!("{directive} {pair:?} is not \"Name: value\""))
            })
            .collect()
    };
    match (name, args) {
        (_, [source]) if name.strip_suffix("_by_lua").and_then(phase_of).is_some() => {
            let phase = name.strip_suffix("_by_lua").and_then(phase_of).unwrap_or(Phase::Access);
            snippet.lua.push((phase, source.clone()));
            return Ok(Taken::Lua(phase));
        }
        (_, _) if name.strip_suffix("_by_lua").and_then(phase_of).is_some() => {
            return Err(format!("{name} takes one quoted Lua source"));
        }
        ("more_set_headers", values) => {
            for (n, v) in pairs(values, name)? {
                snippet.response_headers.push(header(&n, &v)?);
            }
        }
        // `always` or not: tidegate sets the header on every response.
        ("add_header", [n, v]) | ("add_header", [n, v, _]) => snippet.response_headers.push(header(n, v)?),
        ("proxy_set_header", [n, v]) => snippet.upstream_headers.push(header(n, v)?),
        ("more_set_input_headers", values) => {
            for (n, v) in pairs(values, name)? {
                snippet.upstream_headers.push(header(&n, &v)?);
            }
        }
        ("more_clear_headers" | "proxy_hide_header", names) if !names.is_empty() => {
            for n in names {
                if n.starts_with('-') || n.contains('*') {
                    return Err(format!("{name} {n:?}: status and type filters and wildcards are not translated"));
                }
                http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?} is not a header name"))?;
                header_filter.push_str(&format!("ngx.header[{}] = nil\n", lua_string(n)));
            }
        }
        ("more_clear_input_headers", names) if !names.is_empty() => {
            for n in names {
                if n.starts_with('-') || n.contains('*') {
                    return Err(format!("{name} {n:?}: filters and wildcards are not translated"));
                }
                http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?} is not a header name"))?;
                rewrite.code.push_str(&format!("ngx.req.clear_header({})\n", lua_string(n)));
            }
        }
        ("expires", [time]) => header_filter.push_str(&expires(time)?),
        // tidegate's `Server` header never carries its version: `off`, whatever is asked.
        ("server_tokens", [value]) if matches!(value.as_str(), "on" | "off" | "build") => {}
        ("allow" | "deny", [who]) => {
            let network: Cidr = if who == "all" { Cidr::ANY_V4 } else { who.parse()? };
            let allow = name == "allow";
            snippet.ip_rules.push(IpRule { allow, network });
            if who == "all" {
                // `all` is every address of both families.
                snippet.ip_rules.push(IpRule { allow, network: Cidr::ANY_V6 });
            }
        }
        ("return", [code, to])
            if matches!(code.as_str(), "301" | "302" | "303" | "307" | "308") && rewrite.code.is_empty() =>
        {
            let to: Template = rewrite.expand(to).parse()?;
            let status = code.parse().unwrap_or(302);
            snippet.redirect = Some(tidegate_snapshot::Redirect { to, status });
        }
        ("return" | "rewrite" | "set" | "break", _) => rewrite.statement(name, args)?,
        (_, _) => {
            if let Some((_, key)) = AS_KEYS.iter().find(|(d, _)| *d == name) {
                match args {
                    [value] => snippet.keys.push((key, value.clone())),
                    _ => return Err(format!("`{name}` takes one value")),
                }
            } else {
                return Err(format!("`{name}` has no tidegate equivalent"));
            }
        }
    }
    Ok(Taken::Translated)
}

/// `expires` as nginx's headers module applies it: to 200, 201, 204, 206, 301, 302, 303, 304,
/// 307 and 308 responses, `Expires` and `Cache-Control`.
fn expires(time: &str) -> Result<String, String> {
    let (expires, cache_control) = match time {
        "off" => return Ok(String::new()),
        "epoch" => ("\"Thu, 01 Jan 1970 00:00:01 GMT\"".to_owned(), "\"no-cache\"".to_owned()),
        "max" => ("\"Thu, 31 Dec 2037 23:55:55 GMT\"".to_owned(), "\"max-age=315360000\"".to_owned()),
        _ => {
            let seconds =
                nginx_seconds(time).ok_or_else(|| format!("expires {time:?} is not a time tidegate reads"))?;
            let control = if seconds < 0 { "\"no-cache\"".to_owned() } else { format!("\"max-age={seconds}\"") };
            (format!("ngx.http_time(ngx.time() + ({seconds}))"), control)
        }
    };
    Ok(format!(
        "do local s = ngx.status\nif s == 200 or s == 201 or s == 204 or s == 206 or (s >= 301 and s <= 304) or s == 307 or s == 308 then\n\
         ngx.header[\"Expires\"] = {expires}\nngx.header[\"Cache-Control\"] = {cache_control}\nend end\n"
    ))
}

/// nginx's time for `expires`: [`super::annotations::nginx_seconds`], or its negative (`-1`).
fn nginx_seconds(text: &str) -> Option<i64> {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let seconds = i64::try_from(super::annotations::nginx_seconds(text)?).ok()?;
    Some(if negative { -seconds } else { seconds })
}

/// The rewrite module's directives, in order, as Lua of the rewrite phase.
#[derive(Default)]
struct LuaRewrite {
    code: String,
    /// `set` variables whose value is known without a request, for the typed directives after
    /// them.
    constants: Vec<(String, String)>,
    /// Whether an `if` sets response headers (kept in `ngx.ctx` until header_filter).
    headers_in_if: bool,
}

impl LuaRewrite {
    fn source(&self) -> Option<String> {
        if self.code.is_empty() {
            return None;
        }
        Some(format!(
            "local vars, m = {{}}, {{}}\nlocal function var(name) local v = vars[name] if v == nil then v = ngx.var[name] end return v or \"\" end\n{}",
            self.code
        ))
    }

    /// A value with the `set` variables known so far put in.
    fn expand(&self, value: &str) -> String {
        let mut out = value.to_owned();
        for (name, constant) in &self.constants {
            out = replace_variable(&out, name, constant);
        }
        out
    }

    fn statement(&mut self, name: &str, args: &[String]) -> Result<(), String> {
        let code = statement(name, args)?;
        if name == "set"
            && let [variable, value] = args
        {
            let variable = variable.trim_start_matches('$');
            self.constants.retain(|(name, _)| name != variable);
            if !value.contains('$') {
                self.constants.push((variable.to_owned(), value.clone()));
            }
        }
        self.code.push_str(&code);
        Ok(())
    }

    /// `if (condition) { body }`: the body may hold the rewrite module's directives.
    fn branch(&mut self, condition: &str, body: &str) -> Result<(), String> {
        let test = lua_condition(condition)?;
        let mut inner = String::new();
        let mut lexer = Lexer { text: body, at: 0 };
        while let Some((name, _)) = lexer.word()? {
            let args = lexer.arguments().map_err(|e| format!("{name}: {e}"))?;
            match name.as_str() {
                "return" | "rewrite" | "set" | "break" => {
                    inner.push_str(&statement(&name, &args)?);
                    // Set in a branch: no longer known without a request.
                    if let ("set", [variable, _]) = (name.as_str(), args.as_slice()) {
                        let variable = variable.trim_start_matches('$');
                        self.constants.retain(|(name, _)| name != variable);
                    }
                }
                "more_set_headers" | "add_header" => {
                    let pairs: Vec<(String, String)> = match (name.as_str(), args.as_slice()) {
                        ("add_header", [n, v]) | ("add_header", [n, v, _]) => vec![(n.clone(), v.clone())],
                        ("more_set_headers", values) if !values.iter().any(|v| v.starts_with('-')) => values
                            .iter()
                            .map(|p| p.split_once(':').map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned())))
                            .collect::<Option<_>>()
                            .ok_or_else(|| format!("{name}: not \"Name: value\""))?,
                        _ => return Err(format!("`{name}` in `if` is not translated in this form")),
                    };
                    // Set when the response goes out (header_filter), as nginx does.
                    self.headers_in_if = true;
                    for (n, v) in pairs {
                        http::HeaderName::from_bytes(n.as_bytes())
                            .map_err(|_| format!("{n:?} is not a header name"))?;
                        inner.push_str(&format!(
                            "ngx.ctx.snippet_headers = ngx.ctx.snippet_headers or {{}}\ntable.insert(ngx.ctx.snippet_headers, {{{}, {}}})\n",
                            lua_string(&n),
                            lua_template(&v)?
                        ));
                    }
                }
                _ => return Err(format!("`{name}` in `if` has no tidegate equivalent")),
            }
        }
        self.code.push_str(&format!("if {test} then\n{inner}end\n"));
        Ok(())
    }
}

/// One of the rewrite module's directives as Lua (in the scope [`LuaRewrite::source`] opens).
fn statement(name: &str, args: &[String]) -> Result<String, String> {
    Ok(match (name, args) {
        ("break", []) => "do return end\n".to_owned(),
        ("set", [variable, value]) => {
            let variable = variable
                .strip_prefix('$')
                .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .ok_or_else(|| format!("set {variable:?}: not a variable"))?;
            format!("vars[{}] = {}\n", lua_string(variable), lua_template(value)?)
        }
        ("return", [code]) if code.parse::<u16>().is_ok_and(|c| (100..=999).contains(&c)) => {
            format!("do return ngx.exit({code}) end\n")
        }
        ("return", [to]) => format!("do return ngx.redirect({}, 302) end\n", lua_template(to)?),
        ("return", [code, to]) => match code.parse::<u16>() {
            Ok(c @ (301 | 302 | 303 | 307 | 308)) => {
                format!("do return ngx.redirect({}, {c}) end\n", lua_template(to)?)
            }
            Ok(c) if (100..=999).contains(&c) => format!(
                "do ngx.status = {c}\nngx.header[\"Content-Type\"] = \"text/plain\"\nngx.print({})\nreturn ngx.exit({c}) end\n",
                lua_template(to)?
            ),
            _ => return Err(format!("return {code:?}: not a status code")),
        },
        ("rewrite", [regex, replacement]) => rewrite(regex, replacement, None)?,
        ("rewrite", [regex, replacement, flag]) => rewrite(regex, replacement, Some(flag))?,
        _ => return Err(format!("`{name}` with these arguments has no tidegate equivalent")),
    })
}

/// `rewrite REGEX REPLACEMENT [FLAG]` against the path, as nginx: a replacement starting with
/// `http://`, `https://` or `$scheme` redirects (302, or 301 with `permanent`); a `?` in it
/// sets the arguments (the old ones follow unless it ends with `?`).
fn rewrite(regex: &str, replacement: &str, flag: Option<&String>) -> Result<String, String> {
    let flag = flag.map(String::as_str);
    let redirect_status = match flag {
        Some("redirect") => Some(302),
        Some("permanent") => Some(301),
        Some("break") | None => None,
        Some("last") => {
            return Err("rewrite ... last looks for another location, which a route cannot do; use `break` \
                        (the route's own upstream) or rewrite-target"
                .to_owned());
        }
        Some(other) => return Err(format!("rewrite flag {other:?} is not nginx's")),
    };
    let absolute = ["http://", "https://", "$scheme"].iter().any(|p| replacement.starts_with(p));
    let (path, query) = match replacement.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (replacement, None),
    };
    let mut code = format!("do local c = ngx.re.match(ngx.var.uri, {}, \"jo\")\nif c then m = c\n", lua_string(regex));
    if absolute || redirect_status.is_some() {
        let status = redirect_status.unwrap_or(302);
        let mut target = lua_template(path)?;
        match query {
            Some("") => {}
            Some(q) => target = format!("{target} .. \"?\" .. {}", lua_template(q)?),
            None => {
                target = format!(
                    "{target} .. (ngx.var.args ~= nil and ngx.var.args ~= \"\" and (\"?\" .. ngx.var.args) or \"\")"
                );
            }
        }
        code.push_str(&format!("return ngx.redirect({target}, {status})\n"));
    } else {
        code.push_str(&format!("ngx.req.set_uri({})\n", lua_template(path)?));
        match query {
            Some("") => code.push_str("ngx.req.set_uri_args(\"\")\n"),
            Some(q) => code.push_str(&format!(
                "local old = ngx.var.args\nlocal new = {}\nngx.req.set_uri_args((old ~= nil and old ~= \"\") and (new .. \"&\" .. old) or new)\n",
                lua_template(q)?
            )),
            None => {}
        }
        if flag == Some("break") {
            code.push_str("return\n");
        }
    }
    code.push_str("end end\n");
    Ok(code)
}

/// An `if` condition as a Lua expression: `$var`, `$var = text`, `$var != text`, `$var ~ re`,
/// `~*`, `!~`, `!~*`. File tests (`-f`, `-d`, `-e`, `-x`) have no equivalent.
fn lua_condition(condition: &str) -> Result<String, String> {
    let words = split_condition(condition)?;
    match words.as_slice() {
        [variable] => {
            let v = lua_template(variable)?;
            Ok(format!("({v} ~= \"\" and {v} ~= \"0\")"))
        }
        [variable, op, value] => {
            if !variable.starts_with('$') {
                return Err(format!("{variable:?}: a condition starts with a variable"));
            }
            let v = lua_template(variable)?;
            Ok(match op.as_str() {
                "=" => format!("({v} == {})", lua_template(value)?),
                "!=" => format!("({v} ~= {})", lua_template(value)?),
                "~" | "~*" | "!~" | "!~*" => {
                    let options = if op.ends_with('*') { "ijo" } else { "jo" };
                    let test = format!("ngx.re.match({v}, {}, \"{options}\")", lua_string(value));
                    if op.starts_with('!') {
                        format!("(not {test})")
                    } else {
                        format!("(function() local c = {test} if c then m = c return true end return false end)()")
                    }
                }
                _ => return Err(format!("operator {op:?} has no tidegate equivalent")),
            })
        }
        _ => Err(format!("({condition}) has no tidegate equivalent")),
    }
}

/// A condition's words: quoted strings kept whole.
fn split_condition(condition: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut rest = condition.trim();
    while !rest.is_empty() {
        if let Some(quote) = rest.chars().next().filter(|c| *c == '"' || *c == '\'') {
            let end = rest[1..].find(quote).ok_or("a quoted string does not end")?;
            words.push(rest[1..1 + end].to_owned());
            rest = rest[end + 2..].trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            words.push(rest[..end].to_owned());
            rest = rest[end..].trim_start();
        }
    }
    Ok(words)
}

/// An nginx value (text with `$variables` and `$1`..`$9` captures) as a Lua expression.
fn lua_template(value: &str) -> Result<String, String> {
    use tidegate_snapshot::TemplatePart;
    let parts: Vec<String> = tidegate_snapshot::nginx_runs(value)?
        .into_iter()
        .map(|run| match run {
            TemplatePart::Text(text) => lua_string(&text),
            TemplatePart::Variable(name) if name.chars().all(|c| c.is_ascii_digit()) => format!("(m[{name}] or \"\")"),
            TemplatePart::Variable(name) => format!("var({})", lua_string(&name)),
        })
        .collect();
    Ok(if parts.is_empty() { lua_string("") } else { parts.join(" .. ") })
}

/// A Lua string literal holding `text` exactly.
fn lua_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for byte in text.bytes() {
        match byte {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b' '..=b'~' => out.push(byte as char),
            _ => out.push_str(&format!("\\{byte:03}")),
        }
    }
    out.push('"');
    out
}

/// `text` with `$name` and `${name}` replaced by `value` (not `$names`).
fn replace_variable(text: &str, name: &str, value: &str) -> String {
    let Ok(pieces) = tidegate_snapshot::nginx_pieces(text) else { return text.to_owned() };
    let mut out = String::new();
    let mut rest = text;
    for piece in pieces {
        // Each piece is the next part of `text`: what it was written as is copied unless it is
        // the variable.
        let written = match piece {
            tidegate_snapshot::Piece::Text(t) => t.len(),
            tidegate_snapshot::Piece::Variable(v) if rest.starts_with("${") => v.len() + 3,
            tidegate_snapshot::Piece::Variable(v) => v.len() + 1,
        };
        let (this, next) = rest.split_at(written);
        match piece {
            tidegate_snapshot::Piece::Variable(v) if v == name => out.push_str(value),
            _ => out.push_str(this),
        }
        rest = next;
    }
    out
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

    /// An `if`'s `( ... )` condition, without the parentheses.
    fn condition(&mut self) -> Result<String, String> {
        self.skip();
        if !self.rest().starts_with('(') {
            return Err("expected '('".into());
        }
        let mut depth = 0usize;
        for (i, c) in self.rest().char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        let body = self.rest()[1..i].trim().to_owned();
                        self.at += i + 1;
                        return Ok(body);
                    }
                }
                _ => {}
            }
        }
        Err("the condition does not end".into())
    }

    /// Skips what is left of a directive that was not read: up to its `;`, or its block.
    fn skip_statement(&mut self) {
        self.skip();
        if self.rest().starts_with('{') {
            if self.block().is_err() {
                self.at = self.text.len();
            }
            return;
        }
        match self.rest().find(';') {
            Some(end) => self.at += end + 1,
            None => self.at = self.text.len(),
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
            read("add_header A b;\nauth_basic \"x\";").expect_err("refused"),
            "line 2: `auth_basic` has no tidegate equivalent"
        );
        assert!(read("more_set_headers \"A: b\"").expect_err("refused").contains("no ';'"));
        assert!(read("access_by_lua_block { if x then").expect_err("refused").contains("does not end"));
        assert!(read("set_by_lua $x 'return 1';").expect_err("refused").contains("`set_by_lua`"));
        assert!(read("more_set_headers -s 404 \"A: b\";").is_err(), "status filters are not translated");
        assert!(read("rewrite ^/a /b last;").expect_err("refused").contains("another location"));
        assert!(read("if (-f $request_filename) { return 404; }").is_err(), "file tests");
        assert!(read("if ($host = a) { proxy_pass http://x; }").expect_err("refused").contains("`proxy_pass` in `if`"));
        assert!(read("location /x { return 404; }").expect_err("refused").contains("`location`"));
        let redirect = read("return 301 https://$host$request_uri;").expect("a redirect").redirect.expect("set");
        assert_eq!((redirect.status, String::from(redirect.to)), (301, "https://$host$request_uri".to_owned()));
    }

    /// The migration report sees every directive, also after one that is refused.
    #[test]
    fn every_line_is_reported() {
        let lines = lines(
            "gzip on;\nlocation /x { deny all; }\nmore_set_headers \"A: b\";\naccess_by_lua_block { ngx.exit(403) }\n",
        );
        let taken: Vec<(usize, &str, bool)> =
            lines.iter().map(|l| (l.line, l.directive.as_str(), matches!(l.taken, Taken::Refused(_)))).collect();
        assert_eq!(
            taken,
            [
                (1, "gzip", true),
                (2, "location", true),
                (3, "more_set_headers", false),
                (4, "access_by_lua_block", false)
            ]
        );
        assert_eq!(lines[3].taken, Taken::Lua(Phase::Access));
    }

    #[test]
    fn access_rules_keep_their_order() {
        let snippet = read("allow 10.0.0.0/8;\ndeny all;").expect("translated");
        let rules: Vec<(bool, String)> = snippet.ip_rules.iter().map(|r| (r.allow, r.network.to_string())).collect();
        assert_eq!(rules, [(true, "10.0.0.0/8".into()), (false, "0.0.0.0/0".into()), (false, "::/0".into())]);
        assert!(read("allow 10.0.0.0/33;").is_err());
    }

    #[test]
    fn directives_with_an_annotation_are_read_as_it() {
        let snippet = read("client_max_body_size 20m;\nproxy_read_timeout 300s;\nproxy_buffering off;").expect("ok");
        assert_eq!(
            snippet.keys,
            [
                ("proxy-body-size", "20m".to_owned()),
                ("proxy-read-timeout", "300s".into()),
                ("proxy-buffering", "off".into())
            ]
        );
    }

    #[test]
    fn rewrite_module_directives_become_rewrite_lua() {
        let snippet = read(
            "set $target \"/new\";\nif ($http_x_forwarded_proto != 'https') {\n  return 308 https://$host$request_uri;\n}\nrewrite ^/old/(.*)$ $target/$1 break;\nreturn 410;\n",
        )
        .expect("translated");
        assert!(snippet.redirect.is_none(), "the return after rewrites stays in order, in Lua");
        let (phase, source) = &snippet.lua[0];
        assert_eq!(*phase, Phase::Rewrite);
        for part in [
            "vars[\"target\"] = \"/new\"",
            "if (var(\"http_x_forwarded_proto\") ~= \"https\") then",
            "return ngx.redirect(\"https://\" .. var(\"host\") .. var(\"request_uri\"), 308)",
            "ngx.re.match(ngx.var.uri, \"^/old/(.*)$\", \"jo\")",
            "ngx.req.set_uri(var(\"target\") .. \"/\" .. (m[1] or \"\"))",
            "do return ngx.exit(410) end",
        ] {
            assert!(source.contains(part), "{part:?} in\n{source}");
        }
    }

    #[test]
    fn headers_to_clear_and_expires_become_header_filter_lua() {
        let snippet = read("more_clear_headers Server \"X-Powered-By\";\nproxy_hide_header X-Internal;\nexpires 1h;")
            .expect("ok");
        let (phase, source) = &snippet.lua[0];
        assert_eq!(*phase, Phase::HeaderFilter);
        assert!(source.contains("ngx.header[\"Server\"] = nil") && source.contains("ngx.header[\"X-Internal\"] = nil"));
        assert!(source.contains("ngx.time() + (3600)") && source.contains("\"max-age=3600\""), "{source}");
        assert_eq!(nginx_seconds("1h30m"), Some(5400));
        assert_eq!(nginx_seconds("-1"), Some(-1));
        assert_eq!(nginx_seconds("1M"), Some(2_592_000));
        assert_eq!(nginx_seconds("x"), None);
    }

    #[test]
    fn lua_strings_hold_any_text() {
        assert_eq!(lua_string("a\"b\\c\n]]"), "\"a\\\"b\\\\c\\010]]\"");
        assert_eq!(
            lua_template("/p/$1?x=${arg_y}$").expect("ok"),
            "\"/p/\" .. (m[1] or \"\") .. \"?x=\" .. var(\"arg_y\") .. \"$\""
        );
        assert_eq!(replace_variable("$a$ab${a}", "a", "1"), "1$ab1");
        // A variable a branch may change is not put into typed headers as a constant.
        assert!(read("set $flag 0;\nif ($arg_x) { set $flag 1; }\nadd_header X-Flag $flag;").is_err());
        assert!(read("set $flag 0;\nadd_header X-Flag $flag;").is_ok());
    }
}
