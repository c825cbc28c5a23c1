//! The Lua of a namespace besides its handlers, as one worker's VM holds it: the modules its
//! code may `require`, and its module-level code (`init`).
//!
//! # `require`
//! `require "name"` looks in the namespace of the code running (a request's, a timer's): its
//! own modules, then the cluster-wide ones, then the built-in modules. A module's chunk runs on
//! its first `require` in the namespace, once per worker and version of the namespace's code,
//! under the CPU budget and memory limit of the code that requires it, with the module's name
//! as its argument (`...`), as OpenResty's `require` does. What it returns (`true` for nothing)
//! is kept, and every later `require` of the namespace gets the same value.
//!
//! # What is shared, and what is not
//! - A module's table, and whatever its functions hold (module-level locals, an `lrucache`,
//!   counters), lives across the namespace's requests on one worker, as in OpenResty: that is
//!   how per-worker caches work. Another namespace that requires the same module gets its own
//!   copy, and other workers theirs. A new version of the namespace's code starts them anew.
//! - A module's globals are its own: a table of its own that reads the VM's globals.
//! - A handler's globals stay per request; what `init` sets is what they read first.
//!
//! # `init`
//! Module-level code (OpenResty's `init_by_lua`) runs once per worker and version, before the
//! namespace's first handler, under a CPU budget (the proxy's request budget) and the VM's
//! memory limit. It runs through to its end or fails: it cannot wait (no sleep, no cosocket).
//! The globals it sets become the namespace's, read by every handler (a request that assigns
//! one gets its own). When it fails, every request of the namespace fails (500) with its
//! error, without running it again, until the namespace's code changes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use mlua::{Function, Lua, Table, Value};

use crate::compile::Script;

/// What a namespace has besides its handlers ([`crate::Vm::set_namespaces`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NamespaceCode {
    /// Modules by the name `require` takes.
    pub modules: HashMap<String, Arc<Script>>,
    /// Module-level code, in order.
    pub init: Vec<Arc<Script>>,
    /// What each worker runs once per version, after `init`, without a request (timers).
    pub init_worker: Vec<Arc<Script>>,
}

/// The namespace whose modules every namespace may `require` (after its own).
pub const CLUSTER_WIDE: &str = "";

/// One worker's modules, and what it made of them.
#[derive(Default)]
pub(crate) struct Modules {
    code: RefCell<HashMap<String, Arc<NamespaceCode>>>,
    /// By namespace: the values `require` returned, and what `init` came to.
    made: RefCell<HashMap<String, Made>>,
    /// Changes of the code so far; the last that changed each namespace's, and the last that
    /// changed every namespace's ([`Modules::version`]).
    changes: std::cell::Cell<u64>,
    changed_at: RefCell<HashMap<String, u64>>,
    everything: std::cell::Cell<u64>,
}

struct Made {
    /// By module name.
    required: Table,
    /// The globals `init` set, or its error; `None` until it has run.
    init: Option<Result<Table, String>>,
}

impl Modules {
    /// The `init_worker` scripts of `namespaces` (all with `None`) that have some.
    pub(crate) fn init_workers(&self, namespaces: Option<&[String]>) -> Vec<(String, Vec<Arc<Script>>)> {
        let code = self.code.borrow();
        let wanted = |ns: &String| namespaces.is_none_or(|list| list.contains(ns));
        code.iter()
            .filter(|(ns, c)| !c.init_worker.is_empty() && wanted(ns))
            .map(|(ns, c)| (ns.clone(), c.init_worker.clone()))
            .collect()
    }

    /// Takes the namespaces' code; returns the namespaces whose code changed, whose modules
    /// are forgotten (all of them when the cluster-wide modules changed: `None`).
    pub(crate) fn set(&self, code: HashMap<String, Arc<NamespaceCode>>) -> Option<Vec<String>> {
        let mut current = self.code.borrow_mut();
        let same = |a: Option<&Arc<NamespaceCode>>, b: Option<&Arc<NamespaceCode>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            (None, None) => true,
            _ => false,
        };
        let everything = !same(current.get(CLUSTER_WIDE), code.get(CLUSTER_WIDE));
        let changed: Vec<String> =
            current.keys().chain(code.keys()).filter(|ns| !same(current.get(*ns), code.get(*ns))).cloned().collect();
        *current = code;
        let mut made = self.made.borrow_mut();
        self.changes.set(self.changes.get() + 1);
        if everything {
            made.clear();
            self.changed_at.borrow_mut().clear();
            self.everything.set(self.changes.get());
            return None;
        }
        for namespace in &changed {
            made.remove(namespace);
            self.changed_at.borrow_mut().insert(namespace.clone(), self.changes.get());
        }
        Some(changed)
    }

    /// The version of `namespace`'s code: it changes when the code does. A timer `init_worker`
    /// started belongs to it, and stops repeating once it is gone, as the timers of an old nginx
    /// worker end with it.
    pub(crate) fn version(&self, namespace: &str) -> u64 {
        // Forgetting every namespace's (a cluster-wide change) leaves them all at 0, which the
        // count of changes then tells apart.
        let own = self.changed_at.borrow().get(namespace).copied().unwrap_or(0);
        own.max(self.everything.get())
    }

    /// Whether any namespace has code (when none does, `require` looks at the built-ins only).
    pub(crate) fn any(&self) -> bool {
        !self.code.borrow().is_empty()
    }

    fn script(&self, namespace: &str, name: &str) -> Option<Arc<Script>> {
        let code = self.code.borrow();
        let own = code.get(namespace).and_then(|c| c.modules.get(name));
        own.or_else(|| code.get(CLUSTER_WIDE).and_then(|c| c.modules.get(name))).cloned()
    }

    fn required(&self, lua: &Lua, namespace: &str) -> mlua::Result<Table> {
        if let Some(made) = self.made.borrow().get(namespace) {
            return Ok(made.required.clone());
        }
        let required = lua.create_table()?;
        self.made.borrow_mut().insert(namespace.to_owned(), Made { required: required.clone(), init: None });
        Ok(required)
    }

    /// `require(name)` for code of `namespace`: the module's value, or `None` when the
    /// namespace has no such module (the built-ins are looked up next).
    pub(crate) fn require(&self, lua: &Lua, namespace: &str, name: &str) -> mlua::Result<Option<Value>> {
        let required = self.required(lua, namespace)?;
        let value: Value = required.raw_get(name)?;
        if !value.is_nil() {
            return Ok(Some(value));
        }
        let Some(script) = self.script(namespace, name) else { return Ok(None) };
        let chunk = load(lua, &script)?;
        let env = lua.create_table()?;
        let meta = lua.create_table()?;
        meta.raw_set("__index", lua.globals())?;
        env.set_metatable(Some(meta))?;
        chunk.set_environment(env)?;
        // No borrow is held: the module may require others.
        let value = match chunk.call::<Value>(name)? {
            Value::Nil => Value::Boolean(true),
            value => value,
        };
        required.raw_set(name, value.clone())?;
        Ok(Some(value))
    }

    /// The globals `init` set for `namespace`, running it first when it has not run for the
    /// namespace's current code (`run` runs one script in the given globals, under a budget).
    /// `Ok(None)`: the namespace has no `init`.
    pub(crate) fn init(
        &self,
        lua: &Lua,
        namespace: &str,
        run: impl Fn(&Function, &Table) -> Result<(), String>,
    ) -> Result<Option<Table>, String> {
        let scripts = match self.code.borrow().get(namespace) {
            Some(code) if !code.init.is_empty() => code.init.clone(),
            _ => return Ok(None),
        };
        let required = self.required(lua, namespace).map_err(|e| e.to_string())?;
        if let Some(Some(done)) = self.made.borrow().get(namespace).map(|m| m.init.clone()) {
            return done.map(Some);
        }
        let result = (|| {
            let globals = lua.create_table().map_err(|e| e.to_string())?;
            let meta = lua.create_table().map_err(|e| e.to_string())?;
            meta.raw_set("__index", lua.globals()).map_err(|e| e.to_string())?;
            globals.set_metatable(Some(meta)).map_err(|e| e.to_string())?;
            for script in &scripts {
                let chunk = load(lua, script).map_err(|e| e.to_string())?;
                run(&chunk, &globals)?;
            }
            Ok(globals)
        })();
        if let Some(made) = self.made.borrow_mut().get_mut(namespace) {
            made.init = Some(result.clone());
        } else {
            self.made.borrow_mut().insert(namespace.to_owned(), Made { required, init: Some(result.clone()) });
        }
        result.map(Some)
    }
}

/// A script's chunk, loaded where no request is current (see [`crate::vm::without_request`]).
fn load(lua: &Lua, script: &Script) -> mlua::Result<Function> {
    crate::vm::without_request(|| {
        lua.load(&script.bytecode[..])
            .set_name(format!("={}", script.name))
            .set_mode(mlua::chunk::ChunkMode::Binary)
            .into_function()
    })
}
