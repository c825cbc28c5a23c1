//! `ngx.shared.NAME`: the dictionaries of the running code's namespace only.
//!
//! As in OpenResty, a dictionary's object is a table whose methods check that they are called on
//! it (`dict:get(k)`, not `dict.get(k)`). Each object has methods of its own, Rust functions
//! holding its dictionary ([`install_methods`]). A worker makes each object once per
//! namespace and keeps it until the set of dictionaries changes (making it on every lookup was a
//! tenth of a small handler's time); kept objects are read-only, so one request cannot change
//! what the next one finds.
//!
//! Two ways lead to them:
//! - A request's handlers see their namespace's own `ngx`, whose `shared` table holds that
//!   namespace's dictionaries as fields: `ngx.shared.hits` is three table reads. That `ngx` is
//!   a copy of the VM's; what the VM's serves through its metatable (`ngx.status`, `ngx.ctx`,
//!   fields a request adds) it reads from and writes to the VM's.
//! - The VM's own `ngx.shared` (what modules and timers see) looks a name up for the namespace
//!   of the code running, through a Rust `__index`: about 2,200 instructions a lookup.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use foldhash::HashMap;
use mlua::{Lua, Table, Value};

use super::current;
use crate::shdict::{SharedDicts, install_methods};

/// What a worker made of the proxy's dictionaries, for one generation of them: the `ngx.shared`
/// objects, and the environments' metatables that hold them.
pub(crate) struct DictObjects {
    dicts: Arc<SharedDicts>,
    kept: RefCell<Kept>,
}

#[derive(Default)]
struct Kept {
    generation: u64,
    /// By namespace and name.
    objects: HashMap<String, HashMap<String, Table>>,
    /// By namespace (see [`DictObjects::env_meta`]).
    env_metas: HashMap<String, Rc<NamespaceEnv>>,
}

impl DictObjects {
    /// What is kept, forgotten first when the dictionaries have changed since it was made.
    fn kept(&self) -> std::cell::RefMut<'_, Kept> {
        let mut kept = self.kept.borrow_mut();
        let generation = self.dicts.generation();
        if kept.generation != generation {
            *kept = Kept { generation, ..Kept::default() };
        }
        kept
    }

    /// The object of dictionary `name` as `namespace` sees it; `None` when there is none.
    fn object(&self, lua: &Lua, namespace: &str, name: &str) -> mlua::Result<Option<Table>> {
        let mut kept = self.kept();
        if let Some(object) = kept.objects.get(namespace).and_then(|names| names.get(name)) {
            return Ok(Some(object.clone()));
        }
        let Some(dict) = self.dicts.get(namespace, name) else { return Ok(None) };
        let object = lua.create_table()?;
        let methods = lua.create_table()?;
        install_methods(lua, &methods, &dict, object.to_pointer() as usize)?;
        methods.set_readonly(true);
        let meta = lua.create_table()?;
        meta.raw_set("__index", methods)?;
        super::seal(&meta)?;
        object.set_metatable(Some(meta))?;
        object.set_readonly(true);
        kept.objects.entry(namespace.to_owned()).or_default().insert(name.to_owned(), object.clone());
        Ok(Some(object))
    }
}

/// Installs the VM's `ngx.shared`; what it returns makes the requests' environments.
pub(super) fn install(lua: &Lua, ngx: &Table, dicts: &Arc<SharedDicts>) -> mlua::Result<Rc<DictObjects>> {
    let objects = Rc::new(DictObjects { dicts: Arc::clone(dicts), kept: RefCell::default() });
    let shared = lua.create_table()?;
    let shared_meta = lua.create_table()?;
    let lookup = Rc::clone(&objects);
    shared_meta.raw_set(
        "__index",
        lua.create_function(move |lua, (_, name): (super::args::Ignored, mlua::LuaString)| {
            let request = current("ngx.shared")?;
            Ok(lookup.object(lua, &request.state.head.namespace, &name.to_str()?)?.map_or(Value::Nil, Value::Table))
        })?,
    )?;
    super::seal(&shared_meta)?;
    shared.set_metatable(Some(shared_meta))?;
    ngx.raw_set("shared", shared)?;
    Ok(objects)
}

impl DictObjects {
    /// The metatable of the environments of `namespace`'s requests, and the globals it reads
    /// from: those of `base`, except `ngx`, which is the namespace's own (see the module's
    /// documentation). Made on the namespace's first request, and again once the dictionaries
    /// change.
    /// The namespace's environment parts as kept, if they are.
    pub(crate) fn kept_env(&self, namespace: &str) -> Option<Rc<NamespaceEnv>> {
        self.kept().env_metas.get(namespace).cloned()
    }

    /// Forgets the environments of `namespaces` (all of them with `None`): their code changed.
    pub(crate) fn forget(&self, namespaces: Option<&[String]>) {
        let mut kept = self.kept();
        match namespaces {
            None => kept.env_metas.clear(),
            Some(namespaces) => {
                for namespace in namespaces {
                    kept.env_metas.remove(namespace);
                }
            }
        }
    }

    /// `init`: the globals the namespace's module-level code set, which its globals take on top
    /// of the base's ([`crate::modules`]).
    pub(crate) fn env_meta(
        &self,
        lua: &Lua,
        base: &Table,
        namespace: &str,
        init: Option<&Table>,
    ) -> mlua::Result<Rc<NamespaceEnv>> {
        if let Some(env) = self.kept().env_metas.get(namespace) {
            return Ok(Rc::clone(env));
        }
        let shared = lua.create_table()?;
        for name in self.dicts.names_seen_from(namespace) {
            if let Some(object) = self.object(lua, namespace, &name)? {
                shared.raw_set(name, object)?;
            }
        }
        shared.set_readonly(true);

        let vm_ngx: Table = base.raw_get("ngx")?;
        let ngx = copy_over(lua, &vm_ngx, [("shared", shared)], true)?;
        let globals = copy_over(lua, base, [("ngx", ngx)], false)?;
        if let Some(init) = init {
            globals.set_readonly(false);
            for pair in init.pairs::<Value, Value>() {
                let (key, value) = pair?;
                globals.raw_set(key, value)?;
            }
            globals.set_readonly(true);
        }
        // Its built-ins are the base's: a handler that runs in it as its environment (see
        // `Vm::handler`) takes the interpreter's fast paths.
        globals.set_safeenv(true);
        let meta = lua.create_table()?;
        meta.raw_set("__index", &globals)?;
        super::seal(&meta)?;
        let env = Rc::new(NamespaceEnv { meta, globals });
        self.kept().env_metas.insert(namespace.to_owned(), Rc::clone(&env));
        Ok(env)
    }
}

/// What the environments of a namespace's requests are made of, for one generation of the
/// dictionaries: shared by the namespace's requests (one reference count each), and the same
/// object (`Rc::ptr_eq`) for as long as that generation lasts.
pub(crate) struct NamespaceEnv {
    /// Their metatable.
    pub(crate) meta: Table,
    /// The globals they read: the VM's, with the namespace's `ngx`.
    pub(crate) globals: Table,
}

/// A read-only copy of `under`'s fields with `own` in place of some, reading what it lacks from
/// `under` (the fields `under`'s own `__index` serves) and, with `writes_through`, assigning to
/// it. A copy rather than only a fallback: a name looked up in it is found at once, where a
/// fallback costs another table's lookup for each. The two copies take 6.5 KiB of Lua heap per
/// namespace and worker.
fn copy_over<const N: usize>(
    lua: &Lua,
    under: &Table,
    own: [(&str, Table); N],
    writes_through: bool,
) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    for pair in under.pairs::<Value, Value>() {
        let (key, value) = pair?;
        table.raw_set(key, value)?;
    }
    for (key, value) in own {
        table.raw_set(key, value)?;
    }
    let meta = lua.create_table()?;
    meta.raw_set("__index", under)?;
    if writes_through {
        meta.raw_set("__newindex", under)?;
    }
    super::seal(&meta)?;
    table.set_metatable(Some(meta))?;
    table.set_readonly(true);
    Ok(table)
}
