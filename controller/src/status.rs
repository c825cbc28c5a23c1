//! What translation found out about each object: whether it is ours, and what is wrong with it.

use std::fmt;

use serde::Serialize;

/// Names one object: `Kind namespace/name` (cluster-scoped objects have no namespace).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    pub fn namespaced(kind: &'static str, namespace: &str, name: &str) -> Self {
        ObjectRef { kind, namespace: Some(namespace.to_owned()), name: name.to_owned() }
    }

    pub fn cluster(kind: &'static str, name: &str) -> Self {
        ObjectRef { kind, namespace: None, name: name.to_owned() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Machine-readable reasons, the same names cluster mode writes into conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Reason {
    /// The object breaks a rule of its schema; it is not served.
    Invalid,
    /// A Service or Service port the object names does not exist.
    BackendNotFound,
    /// A Secret the object names does not exist.
    SecretNotFound,
    /// A ConfigMap the object (or the global ConfigMap) names does not exist.
    ConfigMapNotFound,
    /// A Secret exists but is not a usable TLS certificate and key.
    InvalidCertificate,
    /// Another object already claims this host, path or default backend.
    Conflict,
    /// The object asks for something tidegate does not do; that part is ignored.
    Unsupported,
    /// An annotation tidegate does not honour: an error when it restricts access (the routes
    /// answer 503 rather than be served open), a warning otherwise (ignored).
    UnsupportedAnnotation,
    /// Lua source does not compile; the message carries the Lua line.
    LuaSyntaxError,
}

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The object, or the named part of it, is not served.
    Error,
    /// Served, but not entirely as written.
    Warning,
}

/// One thing wrong with an object, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub reason: Reason,
    /// Path to the field, e.g. `spec.rules[0].http.paths[1].backend.service.port`.
    pub field: String,
    pub message: String,
}

impl Problem {
    /// Whether the problem is only that an object it names (a Service, Secret or ConfigMap) is
    /// not there: offline (`tidegate validate`), that object may be in the cluster.
    pub fn names_absent_object(&self) -> bool {
        matches!(self.reason, Reason::BackendNotFound | Reason::SecretNotFound | Reason::ConfigMapNotFound)
            && self.message.contains(" not found")
    }
}

/// The outcome of translation for one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectStatus {
    pub object: ObjectRef,
    /// The object is ours and valid enough that some of it is served.
    pub accepted: bool,
    pub problems: Vec<Problem>,
}

impl ObjectStatus {
    pub(crate) fn new(object: ObjectRef) -> Self {
        ObjectStatus { object, accepted: true, problems: Vec::new() }
    }

    pub(crate) fn error(&mut self, reason: Reason, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, reason, field.into(), message.into());
    }

    pub(crate) fn warning(&mut self, reason: Reason, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, reason, field.into(), message.into());
    }

    fn push(&mut self, severity: Severity, reason: Reason, field: String, message: String) {
        self.problems.push(Problem { severity, reason, field, message });
    }
}
