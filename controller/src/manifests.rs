//! Objects from a folder of Kubernetes manifests (standalone mode and `tidegate validate`).
//!
//! Every `*.yaml` and `*.yml` file directly in the folder is read as a stream of YAML documents
//! (`---`-separated); `kind: List` documents are expanded. Hidden files are skipped, which also
//! skips the `..data` links of a mounted ConfigMap.
//!
//! # Guarantees
//! - A bad file or document never takes anything else down. A file that is not YAML keeps the
//!   objects of its last good version; a document that is not a valid object keeps the last good
//!   version of that same object (by kind, namespace and name) from that file. Each such problem
//!   is reported as a [`LoadError`] naming the file, the document and the field.
//! - Deleting a file removes its objects.
//! - The first definition of an object (in file-name order) wins; later ones are reported.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::luaroute::{self, LuaRoute};
use crate::objects::{Inputs, ObjectRef, Options};

/// One object of a kind tidegate reads. Shared: translation inputs hold the same objects as
/// the file cache, so a change does not copy 10,000 of them.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Ingress(Arc<Ingress>),
    IngressClass(Arc<IngressClass>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Secret(Arc<Secret>),
    ConfigMap(Arc<ConfigMap>),
    LuaRoute(Arc<LuaRoute>),
}

/// Where an object was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Shared by the file's objects: every change copies the origin of each object.
    pub file: Arc<Path>,
    /// 1-based index among the file's non-empty documents.
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.document)
    }
}

/// A file, document or object that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    pub document: Option<usize>,
    /// `Kind namespace/name` when the document got that far.
    pub object: Option<String>,
    /// The offending field, e.g. `spec.rules[0].http.paths[0].backend`.
    pub field: Option<String>,
    pub message: String,
    /// Whether an earlier good version is still being served in its place.
    pub kept_previous: bool,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, " document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        if let Some(field) = &self.field {
            write!(f, " field {field}")?;
        }
        write!(f, ": {}", self.message)?;
        if self.kept_previous {
            write!(f, " (its last good version keeps serving)")?;
        }
        Ok(())
    }
}

/// The objects of one file as last read successfully.
#[derive(Default)]
struct FileState {
    /// Inode, length, and modification and change times when last read: a file whose stamp did
    /// not move is not read again (at 10,000 Ingresses, reading and hashing every file on each
    /// rescan cost more than translating). The change time moves on every write, even one that
    /// restores the modification time. Only a stamp at least a second old is kept: file times
    /// are as coarse as the kernel's tick, so two writes within one tick can share a stamp
    /// (git's "racy clean" problem), and a recent file is read every time until it settles.
    stamp: Option<Stamp>,
    hash: Option<u64>,
    objects: Vec<(ObjectRef, Object, Origin)>,
    errors: Vec<LoadError>,
}

type Stamp = (u64, u64, i64, i64, i64, i64);

/// The file's stamp, if its last change is at least a second old.
fn settled_stamp(metadata: &std::fs::Metadata) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    let changed = u64::try_from(metadata.ctime().max(metadata.mtime())).ok()?;
    (now > changed + 1).then(|| {
        (
            metadata.ino(),
            metadata.len(),
            metadata.mtime(),
            metadata.mtime_nsec(),
            metadata.ctime(),
            metadata.ctime_nsec(),
        )
    })
}

/// The objects of a folder, re-read on demand.
#[derive(Default)]
pub struct ManifestSet {
    files: BTreeMap<PathBuf, FileState>,
}

/// What a rescan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Whether any object was added, changed or removed.
    pub changed: bool,
    /// Every current problem, of changed files and unchanged ones alike.
    pub errors: Vec<LoadError>,
}

impl ManifestSet {
    /// Re-reads the folder. Unchanged files are not parsed again.
    ///
    /// # Errors
    /// Only when the folder itself cannot be listed; per-file problems are in [`Scan::errors`].
    pub fn rescan(&mut self, dir: &Path) -> std::io::Result<Scan> {
        let mut seen = HashSet::new();
        let mut changed = false;
        for path in manifest_files(dir)? {
            let stamp = std::fs::metadata(&path).ok().and_then(|m| settled_stamp(&m));
            if let Some(state) = self.files.get(&path)
                && stamp.is_some()
                && state.stamp == stamp
                && state.hash.is_some()
            {
                seen.insert(path);
                continue;
            }
            let text = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                // Vanished between listing and reading: the next event rescans.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    let state = self.files.entry(path.clone()).or_default();
                    state.errors = vec![file_error(&path, format!("cannot read: {e}"), !state.objects.is_empty())];
                    seen.insert(path);
                    continue;
                }
            };
            seen.insert(path.clone());
            let hash = {
                let mut h = DefaultHasher::new();
                text.hash(&mut h);
                h.finish()
            };
            let state = self.files.entry(path.clone()).or_default();
            if state.hash == Some(hash) {
                state.stamp = stamp;
                continue;
            }
            let updated = read_file(&path, &text, &state.objects);
            changed |= updated.objects != state.objects;
            *state = FileState { stamp, hash: Some(hash), ..updated };
        }
        self.files.retain(|path, state| {
            let keep = seen.contains(path);
            changed |= !keep && !state.objects.is_empty();
            keep
        });
        let errors = self.files.values().flat_map(|s| s.errors.iter().cloned()).collect();
        Ok(Scan { changed, errors })
    }

    /// The current objects as translation inputs, with the origin of each and the errors for
    /// duplicate definitions.
    pub fn inputs(&self, options: Options) -> (Inputs, BTreeMap<ObjectRef, Origin>, Vec<LoadError>) {
        let mut objects = Vec::new();
        let mut origins: BTreeMap<ObjectRef, Origin> = BTreeMap::new();
        let mut duplicates = Vec::new();
        for (object_ref, object, origin) in self.files.values().flat_map(|s| s.objects.iter()) {
            if let Some(first) = origins.get(object_ref) {
                duplicates.push(LoadError {
                    file: origin.file.to_path_buf(),
                    document: Some(origin.document),
                    object: Some(object_ref.to_string()),
                    field: Some("metadata.name".into()),
                    message: format!("already defined in {first}; this definition is ignored"),
                    kept_previous: false,
                });
                continue;
            }
            origins.insert(object_ref.clone(), origin.clone());
            objects.push(object.clone());
        }
        (into_inputs(objects, options), origins, duplicates)
    }
}

/// Reads YAML text (one or more documents) into objects, with an error for each document that
/// is not a valid object of a kind tidegate reads.
pub fn parse_str(text: &str) -> (Vec<Object>, Vec<LoadError>) {
    parse_file(Path::new("<text>"), text)
}

/// Like [`parse_str`], with errors naming `path`.
pub fn parse_file(path: &Path, text: &str) -> (Vec<Object>, Vec<LoadError>) {
    let state = read_file(path, text.as_bytes(), &[]);
    (state.objects.into_iter().map(|(_, o, _)| o).collect(), state.errors)
}

/// Collects objects into translation inputs, in the order given.
pub fn into_inputs(objects: impl IntoIterator<Item = Object>, options: Options) -> Inputs {
    let mut inputs = Inputs { options, ..Inputs::default() };
    for object in objects {
        match object {
            Object::Ingress(o) => inputs.ingresses.push(o),
            Object::IngressClass(o) => inputs.ingress_classes.push(o),
            Object::Service(o) => inputs.services.push(o),
            Object::EndpointSlice(o) => inputs.endpoint_slices.push(o),
            Object::Secret(o) => inputs.secrets.push(o),
            Object::ConfigMap(o) => inputs.config_maps.push(o),
            Object::LuaRoute(o) => inputs.lua_routes.push(o),
        }
    }
    inputs
}

/// `*.yaml` and `*.yml` files directly in `dir`, hidden ones excluded, in name order.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn file_error(path: &Path, message: String, kept_previous: bool) -> LoadError {
    LoadError { file: path.to_owned(), document: None, object: None, field: None, message, kept_previous }
}

/// Reads one file. `previous` is what the file held when last read, to fall back on.
fn read_file(path: &Path, bytes: &[u8], previous: &[(ObjectRef, Object, Origin)]) -> FileState {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let error = file_error(path, format!("not UTF-8: {e}"), !previous.is_empty());
            return FileState { stamp: None, hash: None, objects: previous.to_vec(), errors: vec![error] };
        }
    };
    // A manifest folder is the operator's own, and a generated one can be large: 10,000
    // Ingresses in a file are about 10,000 documents and 400,000 nodes. The limits still stop
    // runaway input (alias expansion keeps its own limits).
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 100_000,
            max_nodes: 10_000_000,
            max_events: 50_000_000,
        },
    };
    let documents: Vec<Value> = match serde_saphyr::from_multiple_with_options(text, options) {
        Ok(d) => d,
        Err(e) => {
            let error = file_error(path, format!("not valid YAML: {e}"), !previous.is_empty());
            return FileState { stamp: None, hash: None, objects: previous.to_vec(), errors: vec![error] };
        }
    };
    let mut state = FileState::default();
    let file: Arc<Path> = Arc::from(path);
    for (i, document) in documents.into_iter().enumerate() {
        let origin = Origin { file: Arc::clone(&file), document: i + 1 };
        let items = match list_items(document) {
            Ok(items) => items,
            Err(message) => {
                state.errors.push(LoadError { document: Some(i + 1), ..file_error(path, message, false) });
                continue;
            }
        };
        for item in items {
            match parse_object(item) {
                Ok(Some((object_ref, object))) => state.objects.push((object_ref, object, origin.clone())),
                Ok(None) => {}
                Err(mut error) => {
                    error.file = path.to_owned();
                    error.document = Some(i + 1);
                    let identity = error.object.as_deref();
                    let kept = previous.iter().find(|(r, _, _)| Some(r.to_string().as_str()) == identity);
                    if let Some(kept) = kept {
                        error.kept_previous = true;
                        state.objects.push(kept.clone());
                    }
                    state.errors.push(error);
                }
            }
        }
    }
    state
}

/// A `kind: List` expands to its items; any other document is one item.
fn list_items(document: Value) -> Result<Vec<Value>, String> {
    if document.get("kind").and_then(Value::as_str) != Some("List") {
        return Ok(vec![document]);
    }
    match document {
        Value::Object(mut map) => match map.remove("items") {
            Some(Value::Array(items)) => Ok(items),
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(_) => Err("a List's items must be a sequence".into()),
        },
        _ => Ok(Vec::new()),
    }
}

/// Reads one document into an object of a kind tidegate reads. `Ok(None)` for kinds it ignores.
fn parse_object(document: Value) -> Result<Option<(ObjectRef, Object)>, LoadError> {
    let error = |object: Option<String>, field: Option<String>, message: String| LoadError {
        file: PathBuf::new(),
        document: None,
        object,
        field,
        message,
        kept_previous: false,
    };
    if !document.is_object() {
        return Err(error(None, None, "a manifest must be a mapping with apiVersion, kind and metadata".into()));
    }
    let text = |key: &str| document.get(key).and_then(Value::as_str).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
        return Err(error(None, Some("apiVersion".into()), "apiVersion and kind are required".into()));
    };
    let meta = document.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("").to_owned();
    let namespace = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default").to_owned();
    let expected = match kind.as_str() {
        "Ingress" | "IngressClass" => "networking.k8s.io/v1",
        "Service" | "Secret" | "ConfigMap" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        luaroute::KIND => luaroute::API_VERSION,
        // Deployments and the like may share the folder; they are not ours to read.
        _ => return Ok(None),
    };
    let object_ref = match kind.as_str() {
        "IngressClass" => ObjectRef::cluster("IngressClass", &name),
        _ => ObjectRef {
            kind: match kind.as_str() {
                "Ingress" => "Ingress",
                "Service" => "Service",
                "Secret" => "Secret",
                "ConfigMap" => "ConfigMap",
                "EndpointSlice" => "EndpointSlice",
                _ => luaroute::KIND,
            },
            namespace: Some(namespace),
            name: name.clone(),
        },
    };
    let identity = Some(object_ref.to_string());
    if api_version != expected {
        return Err(error(
            identity,
            Some("apiVersion".into()),
            format!("{kind} must be {expected}, not {api_version}"),
        ));
    }
    if name.is_empty() {
        return Err(error(identity, Some("metadata.name".into()), "is required".into()));
    }
    let typed = |e: serde_path_to_error::Error<serde_json::Error>| {
        let path = e.path().to_string();
        error(identity.clone(), Some(path), e.into_inner().to_string())
    };
    let object = match kind.as_str() {
        "Ingress" => Object::Ingress(Arc::new(typed_from(document).map_err(typed)?)),
        "IngressClass" => Object::IngressClass(Arc::new(typed_from(document).map_err(typed)?)),
        "Service" => Object::Service(Arc::new(typed_from(document).map_err(typed)?)),
        "EndpointSlice" => Object::EndpointSlice(Arc::new(typed_from(document).map_err(typed)?)),
        "Secret" => Object::Secret(Arc::new(typed_from(document).map_err(typed)?)),
        "ConfigMap" => Object::ConfigMap(Arc::new(typed_from(document).map_err(typed)?)),
        _ => Object::LuaRoute(Arc::new(typed_from(document).map_err(typed)?)),
    };
    Ok(Some((object_ref, object)))
}

fn typed_from<T: DeserializeOwned>(document: Value) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
    serde_path_to_error::deserialize(document)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write manifest");
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n";

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tidegate-manifests-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn a_rewrite_within_one_clock_tick_is_still_seen() {
        let dir = tempdir("racy");
        let service = |port: u16| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  ports: [{{port: {port}}}]\n")
        };
        let mut set = ManifestSet::default();
        write(&dir, "a.yaml", &service(8080));
        assert!(set.rescan(&dir).expect("scan").changed);
        // Same length, same tick: only the content tells them apart.
        write(&dir, "a.yaml", &service(9090));
        assert!(set.rescan(&dir).expect("scan").changed, "the second write is read");
        let (inputs, _, _) = set.inputs(Options::default());
        let ports = inputs.services[0].spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
        assert_eq!(ports[0].port, 9090);
    }

    #[test]
    fn a_file_of_thousands_of_documents_is_read() {
        let ingress = |i: usize| {
            format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: h{i}}}\nspec:\n  rules:\n  - host: h{i}.test\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}]}}\n"
            )
        };
        let text: String = (0..5000).map(ingress).collect();
        let (objects, errors) = parse_str(&text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(objects.len(), 5000);
    }

    #[test]
    fn reads_multi_document_files_and_skips_foreign_kinds() {
        let dir = tempdir("multi");
        write(
            &dir,
            "a.yaml",
            &format!("{SERVICE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\n---\n"),
        );
        write(&dir, "notes.txt", "not a manifest");
        let mut set = ManifestSet::default();
        let scan = set.rescan(&dir).expect("scan");
        assert!(scan.changed);
        assert!(scan.errors.is_empty(), "{:?}", scan.errors);
        let (inputs, origins, _) = set.inputs(Options::default());
        assert_eq!(inputs.services.len(), 1);
        let origin = &origins[&ObjectRef::namespaced("Service", "default", "web")];
        assert_eq!(origin.document, 1);
        assert!(!set.rescan(&dir).expect("scan").changed, "an unchanged folder is no change");
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects() {
        let dir = tempdir("broken");
        write(&dir, "a.yaml", SERVICE);
        let mut set = ManifestSet::default();
        set.rescan(&dir).expect("scan");
        write(&dir, "a.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web\n");
        let scan = set.rescan(&dir).expect("scan");
        assert!(!scan.changed);
        assert_eq!(scan.errors.len(), 1);
        assert!(scan.errors[0].kept_previous);
        assert!(scan.errors[0].to_string().contains("a.yaml"), "{}", scan.errors[0]);
        assert_eq!(set.inputs(Options::default()).0.services.len(), 1);
    }

    #[test]
    fn an_invalid_object_names_its_field_and_keeps_its_previous_version() {
        let dir = tempdir("invalid");
        write(&dir, "a.yaml", SERVICE);
        let mut set = ManifestSet::default();
        set.rescan(&dir).expect("scan");
        write(
            &dir,
            "a.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: eighty}]\n",
        );
        let scan = set.rescan(&dir).expect("scan");
        let error = &scan.errors[0];
        assert_eq!(error.object.as_deref(), Some("Service default/web"));
        assert_eq!(error.field.as_deref(), Some("spec.ports[0].port"));
        assert_eq!(error.document, Some(1));
        assert!(error.kept_previous);
        assert_eq!(set.inputs(Options::default()).0.services.len(), 1);
    }

    #[test]
    fn deleting_a_file_removes_its_objects() {
        let dir = tempdir("delete");
        write(&dir, "a.yaml", SERVICE);
        let mut set = ManifestSet::default();
        set.rescan(&dir).expect("scan");
        std::fs::remove_file(dir.join("a.yaml")).expect("remove");
        assert!(set.rescan(&dir).expect("scan").changed);
        assert!(set.inputs(Options::default()).0.services.is_empty());
    }

    #[test]
    fn duplicates_are_reported_and_the_first_wins() {
        let dir = tempdir("dup");
        write(&dir, "a.yaml", SERVICE);
        write(&dir, "b.yml", SERVICE);
        let mut set = ManifestSet::default();
        set.rescan(&dir).expect("scan");
        let (inputs, origins, duplicates) = set.inputs(Options::default());
        assert_eq!(inputs.services.len(), 1);
        assert!(origins.values().all(|o| o.file.ends_with("a.yaml")));
        assert_eq!(duplicates.len(), 1);
        assert!(duplicates[0].file.ends_with("b.yml"));
    }

    #[test]
    fn lists_expand_and_wrong_api_versions_are_errors() {
        let dir = tempdir("list");
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n- apiVersion: networking.k8s.io/v1beta1\n  kind: Ingress\n  metadata: {name: old}\n";
        write(&dir, "a.yaml", list);
        let mut set = ManifestSet::default();
        let scan = set.rescan(&dir).expect("scan");
        assert_eq!(set.inputs(Options::default()).0.services.len(), 1);
        assert_eq!(scan.errors.len(), 1);
        assert_eq!(scan.errors[0].field.as_deref(), Some("apiVersion"));
    }
}
