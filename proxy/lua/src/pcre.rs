//! PCRE2, as `ngx.re` uses it: a safe wrapper over the C library (pcre2-sys, built from the
//! source it bundles, with its JIT compiler).
//!
//! Matching is bounded so that no pattern can stall a worker: the C code cannot be interrupted
//! by the Lua CPU budget, so every match runs with a match limit ([`MATCH_LIMIT`] backtracking
//! steps, OpenResty's `lua_regex_match_limit`), a depth limit and a heap limit, and the JIT's
//! stack is bounded. A match that reaches a limit fails with an error instead of going on.
//!
//! This is the crate's one FFI module: each `unsafe` block says why it holds.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::ptr::{self, NonNull};

use pcre2_sys::*;

/// Backtracking steps one match may take (PCRE2 counts them for the JIT too). At about 10 ns a
/// step, a match gives up within some 10 ms.
pub(crate) const MATCH_LIMIT: u32 = 1_000_000;
/// Nested backtracking one match may go through.
const DEPTH_LIMIT: u32 = 100_000;
/// Heap one match may use for backtracking (KiB).
const HEAP_LIMIT_KIB: u32 = 20 * 1024;
/// The JIT's stack, at start and at most.
const JIT_STACK: (usize, usize) = (32 << 10, 1 << 20);

/// Compile options, as OpenResty's flags name them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Flags {
    /// `i`
    pub(crate) caseless: bool,
    /// `m`
    pub(crate) multiline: bool,
    /// `s`
    pub(crate) dotall: bool,
    /// `x`
    pub(crate) extended: bool,
    /// `u` (and `U`): always checked, as PCRE2 on unchecked invalid UTF-8 is undefined.
    pub(crate) utf: bool,
    /// `a`
    pub(crate) anchored: bool,
    /// `D`
    pub(crate) dupnames: bool,
    /// `J`
    pub(crate) javascript: bool,
}

/// A compiled pattern.
pub(crate) struct Regex {
    code: NonNull<pcre2_code_8>,
    /// Named groups, in the order of their numbers: (name, number).
    pub(crate) names: Vec<(String, usize)>,
    /// Groups, the whole match (0) included.
    pub(crate) groups: usize,
    pub(crate) flags: Flags,
}

impl Drop for Regex {
    fn drop(&mut self) {
        // SAFETY: `code` came from `pcre2_compile_8` and is freed once, here.
        unsafe { pcre2_code_free_8(self.code.as_ptr()) }
    }
}

/// Byte offsets of each group of a match; `None` for a group that did not take part.
pub(crate) type Offsets = Vec<Option<(usize, usize)>>;

fn error_message(code: i32) -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is writable for its length; PCRE2 writes a NUL-terminated message.
    let n = unsafe { pcre2_get_error_message_8(code, buffer.as_mut_ptr(), buffer.len()) };
    match usize::try_from(n) {
        Ok(n) => String::from_utf8_lossy(&buffer[..n]).into_owned(),
        Err(_) => format!("error {code}"),
    }
}

impl Regex {
    pub(crate) fn new(pattern: &[u8], flags: Flags) -> Result<Regex, String> {
        let mut options = 0;
        for (on, bit) in [
            (flags.caseless, PCRE2_CASELESS),
            (flags.multiline, PCRE2_MULTILINE),
            (flags.dotall, PCRE2_DOTALL),
            (flags.extended, PCRE2_EXTENDED),
            (flags.utf, PCRE2_UTF),
            (flags.anchored, PCRE2_ANCHORED),
            (flags.dupnames, PCRE2_DUPNAMES),
            (flags.javascript, PCRE2_ALT_BSUX | PCRE2_MATCH_UNSET_BACKREF),
        ] {
            if on {
                options |= bit;
            }
        }
        let mut error = 0;
        let mut offset = 0;
        // SAFETY: the pattern pointer and length describe a live slice; a null compile context
        // takes the defaults.
        let code = unsafe {
            pcre2_compile_8(pattern.as_ptr(), pattern.len(), options, &raw mut error, &raw mut offset, ptr::null_mut())
        };
        let code = NonNull::new(code).ok_or_else(|| format!("{} at offset {offset}", error_message(error)))?;
        // Without the JIT (a platform without it), the interpreter matches under the same limits.
        // SAFETY: `code` is a valid compiled pattern.
        let _ = unsafe { pcre2_jit_compile_8(code.as_ptr(), PCRE2_JIT_COMPLETE) };
        let mut regex = Regex { code, names: Vec::new(), groups: 1, flags };
        let captures = regex.info_u32(PCRE2_INFO_CAPTURECOUNT);
        regex.groups = usize::try_from(captures).unwrap_or(0) + 1;
        let count = usize::try_from(regex.info_u32(PCRE2_INFO_NAMECOUNT)).unwrap_or(0);
        if count > 0 {
            let entry = usize::try_from(regex.info_u32(PCRE2_INFO_NAMEENTRYSIZE)).unwrap_or(0);
            let mut table: *const u8 = ptr::null();
            // SAFETY: NAMETABLE writes a pointer into the compiled pattern, valid while it lives.
            unsafe { pcre2_pattern_info_8(code.as_ptr(), PCRE2_INFO_NAMETABLE, (&raw mut table).cast::<c_void>()) };
            if !table.is_null() && entry > 2 {
                // SAFETY: the table holds `count` entries of `entry` bytes each.
                let bytes = unsafe { std::slice::from_raw_parts(table, count * entry) };
                for row in bytes.chunks(entry) {
                    let number = usize::from(row[0]) << 8 | usize::from(row[1]);
                    let name = &row[2..];
                    let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
                    regex.names.push((String::from_utf8_lossy(name).into_owned(), number));
                }
                regex.names.sort_by_key(|(_, number)| *number);
            }
        }
        Ok(regex)
    }

    fn info_u32(&self, what: u32) -> u32 {
        let mut value: u32 = 0;
        // SAFETY: these items write one u32.
        unsafe { pcre2_pattern_info_8(self.code.as_ptr(), what, (&raw mut value).cast::<c_void>()) };
        value
    }

    /// The first match at or after byte `from`; `Err` when matching failed (a limit reached,
    /// bad UTF-8 in the subject under `u`).
    pub(crate) fn captures_at(&self, subject: &[u8], from: usize) -> Result<Option<Offsets>, String> {
        CONTEXT.with(|context| {
            let context = context.as_ref().ok_or("PCRE2 could not make its match context")?;
            // SAFETY: `code` is valid; a null general context takes the default allocator.
            let data = unsafe { pcre2_match_data_create_from_pattern_8(self.code.as_ptr(), ptr::null_mut()) };
            let data = NonNull::new(data).ok_or("PCRE2 could not allocate match data")?;
            let _free = FreeMatchData(data);
            // SAFETY: the subject slice is live for the call; `data` and the context are valid.
            let rc = unsafe {
                pcre2_match_8(
                    self.code.as_ptr(),
                    subject.as_ptr(),
                    subject.len(),
                    from,
                    0,
                    data.as_ptr(),
                    context.context,
                )
            };
            if rc == PCRE2_ERROR_NOMATCH {
                return Ok(None);
            }
            if rc < 0 {
                let why = match rc {
                    PCRE2_ERROR_MATCHLIMIT => "match limit exceeded",
                    PCRE2_ERROR_DEPTHLIMIT => "depth limit exceeded",
                    PCRE2_ERROR_HEAPLIMIT => "heap limit exceeded",
                    PCRE2_ERROR_JIT_STACKLIMIT => "JIT stack limit exceeded",
                    _ => "",
                };
                let message = if why.is_empty() { error_message(rc) } else { why.to_owned() };
                return Err(format!("pcre2_match() failed: {rc} ({message})"));
            }
            // SAFETY: the ovector holds 2 entries per pair, `count` pairs.
            let (vector, count) = unsafe {
                (pcre2_get_ovector_pointer_8(data.as_ptr()), pcre2_get_ovector_count_8(data.as_ptr()) as usize)
            };
            // SAFETY: as above; the pointer stays valid until `data` is freed after this.
            let pairs = unsafe { std::slice::from_raw_parts(vector, count * 2) };
            let matched = usize::try_from(rc).unwrap_or(0).max(1);
            let offsets = (0..self.groups)
                .map(|group| {
                    if group >= matched || group >= count {
                        return None;
                    }
                    let (start, end) = (pairs[2 * group], pairs[2 * group + 1]);
                    (start != PCRE2_UNSET && end != PCRE2_UNSET && start <= end).then_some((start, end))
                })
                .collect();
            Ok(Some(offsets))
        })
    }
}

struct FreeMatchData(NonNull<pcre2_match_data_8>);

impl Drop for FreeMatchData {
    fn drop(&mut self) {
        // SAFETY: made by `pcre2_match_data_create_from_pattern_8`, freed once.
        unsafe { pcre2_match_data_free_8(self.0.as_ptr()) }
    }
}

/// The worker's match context: the limits, and the JIT's stack.
struct Context {
    context: *mut pcre2_match_context_8,
    stack: *mut pcre2_jit_stack_8,
}

impl Context {
    fn new() -> Option<Context> {
        // SAFETY: null general contexts take the defaults; what is made is freed in `drop`.
        unsafe {
            let context = pcre2_match_context_create_8(ptr::null_mut());
            if context.is_null() {
                return None;
            }
            pcre2_set_match_limit_8(context, MATCH_LIMIT);
            pcre2_set_depth_limit_8(context, DEPTH_LIMIT);
            pcre2_set_heap_limit_8(context, HEAP_LIMIT_KIB);
            let stack = pcre2_jit_stack_create_8(JIT_STACK.0, JIT_STACK.1, ptr::null_mut());
            if !stack.is_null() {
                pcre2_jit_stack_assign_8(context, None, stack.cast::<c_void>());
            }
            Some(Context { context, stack })
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: both were made in `Context::new` and are freed once.
        unsafe {
            pcre2_match_context_free_8(self.context);
            if !self.stack.is_null() {
                pcre2_jit_stack_free_8(self.stack);
            }
        }
    }
}

thread_local! {
    static CONTEXT: Option<Context> = Context::new();
}
