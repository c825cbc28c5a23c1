//! What a compiled chunk does with globals, read from its Luau bytecode.
//!
//! A handler runs as a closure whose environment is the request's own table, so that globals it
//! writes stay in that request. A chunk's closure, and the closures it makes, reach that table
//! in four ways only: `GETGLOBAL` and `SETGLOBAL` (a global the chunk writes somewhere), an
//! import (`GETIMPORT`, such as `ngx.req.set_header` or `string.format`) that the loader could
//! not resolve, and `getfenv`/`setfenv`. A chunk with neither opcode whose imports all start at
//! a built-in name other than those two behaves the same in any environment that has those
//! built-ins: the worker can run it without a closure and an environment of its own per
//! request (see `Vm::handler`).
//!
//! The reader follows the loader's format (`lvmload.cpp`) for the versions the compiler
//! writes. Anything else (another version, an unknown opcode or constant, bytes that do not
//! add up) gives `None`: the chunk then gets its own environment, as every chunk used to.

/// Opcodes (`LuauOpcode`) this reader needs to know.
const GETGLOBAL: u8 = 7;
const SETGLOBAL: u8 = 8;
const GETIMPORT: u8 = 12;
/// Opcodes from here on are newer than the format this reader follows.
const FIRST_UNKNOWN_OP: u8 = 86;

/// Opcodes followed by an auxiliary word (`Luau::getOpLength`).
fn has_aux(op: u8) -> bool {
    matches!(
        op,
        GETGLOBAL
            | SETGLOBAL
            | GETIMPORT
            | 15 // GETTABLEKS
            | 16 // SETTABLEKS
            | 20 // NAMECALL
            | 27..=32 // JUMPIFEQ, JUMPIFLE, JUMPIFLT, JUMPIFNOTEQ, JUMPIFNOTLE, JUMPIFNOTLT
            | 53 // NEWTABLE
            | 55 // SETLIST
            | 58 // FORGLOOP
            | 60 // FASTCALL3
            | 66 // LOADKX
            | 74 // FASTCALL2
            | 75 // FASTCALL2K
            | 77..=80 // JUMPXEQKNIL, JUMPXEQKB, JUMPXEQKN, JUMPXEQKS
            | 83..=85 // GETUDATAKS, SETUDATAKS, NAMECALLUDATA
    )
}

/// The names the chunk's imports start at (`ngx` for `ngx.req.set_header`), when it uses no
/// global by name; `None` when it does, or when its bytecode is not understood.
pub(crate) fn import_roots(bytecode: &[u8]) -> Option<Vec<String>> {
    let mut bytes = Reader { bytes: bytecode, at: 0 };
    let version = bytes.u8()?;
    if !(4..=9).contains(&version) {
        return None;
    }
    let types_version = bytes.u8()?;
    if !(1..=3).contains(&types_version) {
        return None;
    }
    let strings = (0..bytes.varint()?).map(|_| bytes.string()).collect::<Option<Vec<&[u8]>>>()?;
    if types_version == 3 {
        // Userdata type names: an index, then a string, until a zero index.
        while bytes.u8()? != 0 {
            bytes.varint()?;
        }
    }
    let mut roots = Vec::new();
    for _ in 0..bytes.varint()? {
        // Stack size, parameters, upvalues, varargs, flags; type information.
        bytes.skip(5)?;
        let types = bytes.varint()?;
        bytes.skip(types)?;

        let code_size = bytes.varint()?;
        let mut code = Vec::with_capacity(code_size);
        for _ in 0..code_size {
            code.push(bytes.u32()?);
        }
        let mut pc = 0;
        while pc < code.len() {
            let op = u8::try_from(code[pc] & 0xff).ok()?;
            if op == GETGLOBAL || op == SETGLOBAL || op >= FIRST_UNKNOWN_OP {
                return None;
            }
            pc += if has_aux(op) { 2 } else { 1 };
        }

        // Constants: string constants by their index, to name the imports' roots.
        let constant_count = bytes.varint()?;
        let mut string_constants = vec![None; constant_count];
        let mut imports = Vec::new();
        for slot in &mut string_constants {
            match bytes.u8()? {
                0 => {}                             // nil
                1 => bytes.skip(1)?,                // boolean
                2 => bytes.skip(8)?,                // number
                3 => *slot = Some(bytes.varint()?), // string
                4 => imports.push(bytes.u32()?),    // import
                5 => {
                    // table: its keys
                    for _ in 0..bytes.varint()? {
                        bytes.varint()?;
                    }
                }
                6 => {
                    bytes.varint()?; // closure
                }
                7 => bytes.skip(16)?, // vector
                8 => {
                    // table with constants: keys and their constants
                    for _ in 0..bytes.varint()? {
                        bytes.varint()?;
                        bytes.skip(4)?;
                    }
                }
                9 => {
                    // integer: sign, magnitude
                    bytes.skip(1)?;
                    bytes.varint64()?;
                }
                _ => return None,
            }
        }
        for import in imports {
            // Up to three constant indices of ten bits each, the root's first.
            let root = usize::try_from((import >> 20) & 1023).ok()?;
            let string = (*string_constants.get(root)?)?;
            let name = strings.get(string.checked_sub(1)?)?;
            roots.push(String::from_utf8_lossy(name).into_owned());
        }

        // Child prototypes, line defined, debug name.
        for _ in 0..bytes.varint()? {
            bytes.varint()?;
        }
        bytes.varint()?;
        bytes.varint()?;
        if bytes.u8()? != 0 {
            // Line information: a gap per instruction and a line per interval.
            let gap_log2 = bytes.u8()?;
            let intervals = (code_size.checked_sub(1)? >> gap_log2) + 1;
            bytes.skip(code_size)?;
            bytes.skip(intervals.checked_mul(4)?)?;
        }
        if bytes.u8()? != 0 {
            // Debug information: locals (name, start, end, register), upvalue names.
            for _ in 0..bytes.varint()? {
                bytes.varint()?;
                bytes.varint()?;
                bytes.varint()?;
                bytes.skip(1)?;
            }
            for _ in 0..bytes.varint()? {
                bytes.varint()?;
            }
        }
    }
    // The main prototype's index, then nothing.
    bytes.varint()?;
    if bytes.at != bytecode.len() || roots.iter().any(|root| root == "getfenv" || root == "setfenv") {
        return None;
    }
    roots.sort_unstable();
    roots.dedup();
    Some(roots)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let taken = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(taken)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(drop)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint64(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn varint(&mut self) -> Option<usize> {
        let value = self.varint64()?;
        // Counts and lengths: nothing near the bytecode's own size is a real one.
        usize::try_from(value).ok().filter(|v| *v <= self.bytes.len().saturating_mul(8))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let length = self.varint()?;
        self.take(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;

    fn roots(source: &str) -> Option<Vec<String>> {
        import_roots(&compile("t", source).expect("compiles").bytecode)
    }

    #[test]
    fn handlers_that_only_use_built_ins_are_read_with_their_roots() {
        assert_eq!(
            roots("ngx.req.set_header('X-A', '1')\nngx.shared.hits:incr('n', 1, 0)"),
            Some(vec!["ngx".to_owned()])
        );
        assert_eq!(
            roots("local t = {1, 2, x = 3}\nfor _, v in ipairs(t) do ngx.say(string.format('%d', v)) end"),
            Some(vec!["ipairs".to_owned(), "ngx".to_owned(), "string".to_owned()])
        );
        assert_eq!(roots("local n = 0\nfor i = 1, 10 do n = n + i end\nreturn n"), Some(vec![]));
        // Nested functions, integers, vectors of constants, long strings: all read.
        assert_eq!(
            roots("local function f(a) return a * 2 end\nngx.ctx.v = f(3) + 9007199254740993\nngx.say(('x'):rep(300))"),
            Some(vec!["ngx".to_owned()])
        );
    }

    #[test]
    fn handlers_that_use_globals_by_name_are_not() {
        // A global written, here or in a nested function.
        assert_eq!(roots("counter = 1"), None);
        assert_eq!(roots("ngx.timer.at(0, function() seen = true end)"), None);
        // Read where it is also written.
        assert_eq!(roots("x = (x or 0) + 1"), None);
        // getfenv/setfenv hand out the environment itself.
        assert_eq!(roots("local env = getfenv()\nngx.say(env.ngx ~= nil)"), None);
        assert_eq!(roots("setfenv(1, {})"), None);
    }

    #[test]
    fn a_global_only_read_is_an_import_of_its_own_name() {
        // Not a built-in: the caller must give such a chunk the request's environment.
        assert_eq!(roots("ngx.say(from_access)"), Some(vec!["from_access".to_owned(), "ngx".to_owned()]));
    }

    #[test]
    fn bytes_that_do_not_add_up_are_not_understood() {
        let bytecode = compile("t", "ngx.say(1)").expect("compiles").bytecode;
        assert!(import_roots(&bytecode).is_some());
        for cut in 0..bytecode.len() {
            assert_eq!(import_roots(&bytecode[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytecode.to_vec();
        longer.push(0);
        assert_eq!(import_roots(&longer), None);
        let mut newer = bytecode.to_vec();
        newer[0] = 10;
        assert_eq!(import_roots(&newer), None);
    }
}
