//! Lua modules: what a namespace's Lua may `require` besides the built-in modules, and the
//! namespace's module-level code.
//!
//! A module is a `*.lua` key of a ConfigMap labelled [`LABEL`], whose value is the modules'
//! dotted prefix. So a library's `lib/` tree becomes one ConfigMap per folder:
//!
//! ```text
//! kubectl create configmap resty-limit --from-file=lib/resty/limit/
//! kubectl label configmap resty-limit tidegate.dev/lua-modules=resty.limit
//! ```
//!
//! makes `conn.lua` the module `resty.limit.conn`. An empty label value takes each key's name
//! as the module's (`resty.redis.lua` is `resty.redis`). Modules are compiled here only to
//! check them (never run); one that does not compile is left out, with a `LuaSyntaxError` on
//! its key naming the Lua line. Two ConfigMaps of a namespace giving the same module: the first
//! by name gives it, the other gets a `Conflict` warning. ConfigMaps in the namespace of
//! `--lua-modules-namespace` give modules to every namespace, which a namespace's own modules
//! of the same name hide.
//!
//! A LuaRoute's `spec.init` is module-level code of its namespace (OpenResty's `init_by_lua`),
//! and its `spec.initWorker` what each worker runs for each new version (`init_worker_by_lua`):
//! registered here in the order LuaRoutes are read.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use tidegate_snapshot::{CLUSTER_WIDE, LuaModule, LuaNamespace};

use super::Builder;
use crate::objects::{Inputs, name_of, namespace_of};
use crate::status::{ObjectRef, ObjectStatus, Reason};

/// The label that makes a ConfigMap's `*.lua` keys modules; its value is their prefix.
pub const LABEL: &str = "tidegate.dev/lua-modules";

/// The modules and module-level code of each namespace, as translation finds them.
#[derive(Default)]
pub(super) struct Namespaces {
    /// By namespace: modules by name (script id, and the ConfigMap that gave it), and the
    /// module-level code's script ids.
    found: BTreeMap<String, Found>,
}

#[derive(Default)]
struct Found {
    modules: BTreeMap<String, (String, ObjectRef)>,
    init: Vec<String>,
    init_worker: Vec<String>,
}

impl Namespaces {
    pub(super) fn add_init(&mut self, namespace: &str, script: String) {
        self.found.entry(namespace.to_owned()).or_default().init.push(script);
    }

    pub(super) fn add_init_worker(&mut self, namespace: &str, script: String) {
        self.found.entry(namespace.to_owned()).or_default().init_worker.push(script);
    }

    /// Every script id they use, for the snapshot to ship.
    pub(super) fn scripts(&self) -> impl Iterator<Item = &String> {
        self.found.values().flat_map(|f| f.modules.values().map(|(id, _)| id).chain(&f.init).chain(&f.init_worker))
    }

    pub(super) fn finish(self) -> Vec<LuaNamespace> {
        self.found
            .into_iter()
            .map(|(namespace, found)| LuaNamespace {
                namespace,
                modules: found.modules.into_iter().map(|(name, (script, _))| LuaModule { name, script }).collect(),
                init: found.init,
                init_worker: found.init_worker,
            })
            .collect()
    }
}

/// Whether `name` is a module name `require` can take: dotted Lua names.
fn module_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            part.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

/// Reads the labelled ConfigMaps into `out`, with a status for each.
pub(super) fn translate(inputs: &Inputs, out: &mut Builder, statuses: &mut BTreeMap<ObjectRef, ObjectStatus>) {
    let mut maps: Vec<&ConfigMap> = inputs
        .config_maps
        .iter()
        .map(|c| &**c)
        .filter(|c| c.metadata.labels.as_ref().is_some_and(|l| l.contains_key(LABEL)))
        .collect();
    maps.sort_by(|a, b| {
        (namespace_of(&a.metadata), name_of(&a.metadata)).cmp(&(namespace_of(&b.metadata), name_of(&b.metadata)))
    });
    for map in maps {
        let (namespace, name) = (namespace_of(&map.metadata), name_of(&map.metadata));
        let object = ObjectRef::namespaced("ConfigMap", namespace, name);
        let mut status = ObjectStatus::new(object.clone());
        let prefix = map.metadata.labels.as_ref().and_then(|l| l.get(LABEL)).map_or("", |p| p.trim());
        let scope =
            if inputs.options.lua_modules_namespace.as_deref() == Some(namespace) { CLUSTER_WIDE } else { namespace };
        if !prefix.is_empty() && !module_name(prefix) {
            status.error(
                Reason::Invalid,
                format!("metadata.labels[{LABEL:?}]"),
                format!("{prefix:?} is not a module prefix (dotted Lua names, as resty.limit)"),
            );
            status.accepted = false;
            statuses.insert(object, status);
            continue;
        }
        for (key, source) in map.data.iter().flatten() {
            let field = format!("data[{key:?}]");
            let Some(stem) = key.strip_suffix(".lua") else {
                status.warning(Reason::Unsupported, field, "not a .lua key; ignored");
                continue;
            };
            let module = if prefix.is_empty() { stem.to_owned() } else { format!("{prefix}.{stem}") };
            if !module_name(&module) {
                status.error(Reason::Invalid, field, format!("{module:?} is not a module name require can take"));
                continue;
            }
            if let Err(e) = tidegate_lua::check(source) {
                status.error(Reason::LuaSyntaxError, field, e.to_string());
                continue;
            }
            let script = out.script(&format!("ConfigMap {namespace}/{name} {field}"), source);
            let found = out.lua.found.entry(scope.to_owned()).or_default();
            match found.modules.get(&module) {
                Some((_, first)) => status.warning(
                    Reason::Conflict,
                    field,
                    format!("module {module} is given by {first} already; this one is not used"),
                ),
                None => {
                    found.modules.insert(module, (script, object.clone()));
                }
            }
        }
        statuses.insert(object, status);
    }
}

#[cfg(test)]
mod tests {
    use super::module_name;

    #[test]
    fn module_names_are_dotted_lua_names() {
        for good in ["resty.redis", "resty.limit.conn", "my_mod", "a.b-c"] {
            assert!(module_name(good), "{good}");
        }
        for bad in ["", ".x", "x.", "1x", "a..b", "a/b", "a b"] {
            assert!(!module_name(bad), "{bad}");
        }
    }
}
