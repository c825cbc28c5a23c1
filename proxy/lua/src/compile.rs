//! Compiling Lua: once per script, off the request path, with errors that carry the Lua line.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use mlua::chunk::Compiler;

/// A compiled handler, ready for any worker's VM to load.
#[derive(Clone, PartialEq, Eq)]
pub struct Script {
    /// Content hash of name and source: the key a worker caches the loaded script under.
    pub id: u64,
    /// Where the source came from (`LuaRoute shop/api spec.routes[0].lua.access`); Lua error
    /// messages start with it.
    pub name: String,
    pub bytecode: Arc<[u8]>,
    /// The names the chunk's imports start at, when it uses no global by name: such a chunk
    /// needs no environment of the request's own (see `bytecode`). `None` when it does.
    pub import_roots: Option<Arc<[String]>>,
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("bytecode_len", &self.bytecode.len())
            .finish()
    }
}

/// Lua source that does not compile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError {
    /// 1-based line in the source, when the compiler says.
    pub line: Option<u32>,
    pub message: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for CompileError {}

fn compiler() -> Compiler {
    // Level 1 keeps line information for error messages; level 2 optimizations inline across
    // functions, which is safe here since globals are read-only.
    Compiler::new().set_optimization_level(2).set_debug_level(1)
}

/// Checks that `source` compiles, without running anything.
///
/// # Errors
/// The first syntax error, with its line.
pub fn check(source: &str) -> Result<(), CompileError> {
    compiler().compile(without_shebang(source).as_ref()).map(drop).map_err(|e| syntax_error(&e))
}

/// A first line starting with `#` (`#!/usr/bin/env lua`) is skipped, as Lua's loaders do; the
/// line stays, empty, so line numbers hold.
fn without_shebang(source: &str) -> std::borrow::Cow<'_, str> {
    if source.starts_with('#') {
        let rest = source.find('\n').map_or("", |i| &source[i..]);
        std::borrow::Cow::Owned(rest.to_owned())
    } else {
        std::borrow::Cow::Borrowed(source)
    }
}

/// Compiles source for `loadstring`: bytecode ready to load, or the compiler's message.
pub(crate) fn compile_chunk(source: &str) -> Result<Vec<u8>, String> {
    compiler().compile(without_shebang(source).as_ref()).map_err(|e| syntax_error(&e).to_string())
}

/// Compiles a handler.
///
/// # Errors
/// The first syntax error, with its line in `source`.
pub fn compile(name: &str, source: &str) -> Result<Script, CompileError> {
    // The chunk is the handler: the worker runs it in the request's environment, or as it
    // is when it needs none (see `vm`).
    let bytecode = compiler().compile(without_shebang(source).as_ref()).map_err(|e| syntax_error(&e))?;
    let mut hasher = DefaultHasher::new();
    (name, source).hash(&mut hasher);
    let import_roots = crate::bytecode::import_roots(&bytecode).map(Into::into);
    Ok(Script { id: hasher.finish(), name: name.to_owned(), bytecode: bytecode.into(), import_roots })
}

/// Luau reports `N: message`.
fn syntax_error(error: &mlua::Error) -> CompileError {
    let text = match error {
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        other => other.to_string(),
    };
    let text = text.trim_start_matches(':');
    match text.split_once(": ") {
        Some((line, message)) if line.trim().parse::<u32>().is_ok() => {
            CompileError { line: line.trim().parse().ok(), message: message.to_owned() }
        }
        _ => CompileError { line: None, message: text.to_owned() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_carry_their_line() {
        let error = check("local a = 1\nlocal b = = 2\n").expect_err("does not compile");
        assert_eq!(error.line, Some(2), "{error}");
        assert!(!error.message.is_empty());
    }

    #[test]
    fn valid_handlers_compile_with_stable_ids() {
        let a = compile("r", "return ngx.exit(403)").expect("compiles");
        let b = compile("r", "return ngx.exit(403)").expect("compiles");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, compile("other", "return ngx.exit(403)").expect("compiles").id);
    }

    #[test]
    fn a_trailing_comment_does_not_swallow_the_wrapper() {
        assert!(compile("r", "ngx.say(1) -- done").is_ok());
    }
}
