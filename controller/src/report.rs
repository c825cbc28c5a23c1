//! The migration report (`tidegate report`): for each Ingress, every annotation under either
//! prefix, and every line of its snippets, as tidegate takes it, with the coverage over all of
//! them.
//!
//! The report is read off the translation itself (the problems it records per annotation), so
//! it says what serving these objects would do. Every Ingress is read as if tidegate served it,
//! whatever class it names: the question is what moving it would change.
//!
//! Each use of an annotation is one of:
//! - **honoured**: read and applied;
//! - **translated**: a snippet, every line of which tidegate runs (as Lua) or has a typed
//!   equivalent of;
//! - **invalid**: a value that does not read; the key's default applies (the key does not
//!   guard access);
//! - **ignored**: not honoured, and harmless to ignore (it changes how a route behaves, not who
//!   may reach it); reported with a warning;
//! - **fails closed**: not honoured, or a value that does not read, where serving without it
//!   would open the route: its routes answer 503 (or 500 for snippets while snippets are not
//!   allowed).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::objects::Inputs;
use crate::status::{ObjectStatus, Severity};
use crate::translate::{self, Taken};

/// How one use of an annotation (or one snippet line) is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Honoured,
    Translated,
    Invalid,
    Ignored,
    FailsClosed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Honoured => "honoured",
            Outcome::Translated => "translated",
            Outcome::Invalid => "invalid, default applies",
            Outcome::Ignored => "ignored",
            Outcome::FailsClosed => "fails closed",
        }
    }

    /// Honoured or translated: tidegate does what the annotation asks.
    pub fn covered(self) -> bool {
        matches!(self, Outcome::Honoured | Outcome::Translated)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub ingresses: Vec<IngressReport>,
    /// The keys of the global ConfigMap, when one is named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configmap: Option<IngressReport>,
    pub totals: Totals,
}

/// One object's annotations (or the ConfigMap's keys).
#[derive(Clone, Debug, Serialize)]
pub struct IngressReport {
    pub namespace: String,
    pub name: String,
    pub keys: Vec<KeyUse>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KeyUse {
    pub key: String,
    pub outcome: Outcome,
    /// What the translation said of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// What to write instead, for what tidegate does not honour.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instead: Option<&'static str>,
    /// A snippet's lines.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<LineUse>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LineUse {
    pub line: usize,
    pub directive: String,
    pub outcome: Outcome,
    pub note: String,
}

/// Counts over every annotation use of every Ingress (the ConfigMap's keys apart).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub ingresses: usize,
    pub uses: usize,
    pub by_outcome: BTreeMap<Outcome, usize>,
    /// Honoured and translated uses, in percent of all uses (100 when there are none).
    pub coverage: f64,
    /// Ingresses with at least one use that fails closed.
    pub closed_ingresses: usize,
}

const PREFIXES: [&str; 2] = ["nginx.ingress.kubernetes.io/", "tidegate.dev/"];
const LEGACY_CLASS: &str = "kubernetes.io/ingress.class";

/// Reports on `inputs`. `strict`: a reference to an object absent from the inputs (a Secret
/// in the cluster) fails closed, as `tidegate validate --strict` says; otherwise it counts as
/// honoured with a note.
pub fn report(inputs: &Inputs, strict: bool) -> Report {
    let mut inputs = inputs.clone();
    // Every Ingress as ours, whatever its class.
    for ingress in &mut inputs.ingresses {
        let ingress = Arc::make_mut(ingress);
        if let Some(annotations) = ingress.metadata.annotations.as_mut() {
            annotations.remove(LEGACY_CLASS);
        }
        ingress.spec.get_or_insert_with(Default::default).ingress_class_name =
            Some(inputs.options.ingress_class.clone());
    }
    let translation = translate::translate(&inputs);
    // Looked up once per Ingress: a map, not a scan of every status for each.
    let by_object: std::collections::HashMap<(&str, &str, &str), &ObjectStatus> = translation
        .statuses
        .iter()
        .map(|s| ((s.object.kind, s.object.namespace.as_deref().unwrap_or(""), s.object.name.as_str()), s))
        .collect();
    let status_of = |kind: &str, namespace: &str, name: &str| -> Option<&ObjectStatus> {
        by_object.get(&(kind, namespace, name)).copied()
    };
    let mut ingresses = Vec::new();
    for ingress in &inputs.ingresses {
        let namespace = ingress.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
        let name = ingress.metadata.name.clone().unwrap_or_default();
        let status = status_of("Ingress", &namespace, &name);
        let mut keys = Vec::new();
        for (key, value) in ingress.metadata.annotations.iter().flatten() {
            let Some(short) = PREFIXES.iter().find_map(|p| key.strip_prefix(p)) else { continue };
            let field = format!("metadata.annotations[{key:?}]");
            keys.push(key_use(key, short, Some(value), status, &field, strict));
        }
        ingresses.push(IngressReport { namespace, name, keys });
    }
    ingresses.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let configmap = inputs.options.configmap.as_ref().and_then(|(namespace, name)| {
        let map = inputs
            .config_maps
            .iter()
            .find(|c| c.metadata.namespace.as_deref() == Some(namespace) && c.metadata.name.as_deref() == Some(name))?;
        let status = status_of("ConfigMap", namespace, name);
        let keys = map
            .data
            .iter()
            .flatten()
            .map(|(key, _)| key_use(key, key, None, status, &format!("data[{key:?}]"), strict))
            .collect();
        Some(IngressReport { namespace: namespace.clone(), name: name.clone(), keys })
    });
    let totals = totals(&ingresses);
    Report { ingresses, configmap, totals }
}

fn key_use(
    key: &str,
    short: &str,
    value: Option<&String>,
    status: Option<&ObjectStatus>,
    field: &str,
    strict: bool,
) -> KeyUse {
    let problems: Vec<_> = status.iter().flat_map(|s| s.problems.iter()).filter(|p| p.field == field).collect();
    let snippet = matches!(short, "configuration-snippet" | "server-snippet");
    let lines: Vec<LineUse> = match value {
        Some(text) if snippet => translate::snippet_lines(text)
            .into_iter()
            .map(|l| {
                let (outcome, note) = match l.taken {
                    Taken::Lua(phase) => (Outcome::Translated, format!("runs as the route's Lua, {phase:?} phase")),
                    Taken::Translated => (Outcome::Translated, String::new()),
                    Taken::Refused(why) => (Outcome::FailsClosed, why),
                };
                LineUse { line: l.line, directive: l.directive, outcome, note }
            })
            .collect(),
        _ => Vec::new(),
    };
    let error = problems.iter().find(|p| p.severity == Severity::Error && (strict || !p.names_absent_object()));
    let (outcome, note) = if let Some(error) = error {
        (Outcome::FailsClosed, Some(error.message.clone()))
    } else if let Some(absent) = problems.iter().find(|p| p.names_absent_object()) {
        (Outcome::Honoured, Some(format!("{} (not among the objects read; it may be in the cluster)", absent.message)))
    } else if let Some(warning) = problems.iter().find(|p| p.severity == Severity::Warning) {
        let ignored = matches!(warning.reason, crate::Reason::UnsupportedAnnotation | crate::Reason::Unsupported)
            || warning.message.contains("unknown");
        (if ignored { Outcome::Ignored } else { Outcome::Invalid }, Some(warning.message.clone()))
    } else if snippet {
        (Outcome::Translated, None)
    } else {
        (Outcome::Honoured, None)
    };
    let instead = (!outcome.covered()).then(|| translate::instead(short)).flatten();
    KeyUse { key: key.to_owned(), outcome, note, instead, lines }
}

fn totals(ingresses: &[IngressReport]) -> Totals {
    let mut totals = Totals { ingresses: ingresses.len(), ..Totals::default() };
    let mut covered = 0;
    for ingress in ingresses {
        for key in &ingress.keys {
            totals.uses += 1;
            *totals.by_outcome.entry(key.outcome).or_default() += 1;
            covered += usize::from(key.outcome.covered());
        }
        totals.closed_ingresses += usize::from(ingress.keys.iter().any(|k| k.outcome == Outcome::FailsClosed));
    }
    totals.coverage = if totals.uses == 0 { 100.0 } else { covered as f64 * 100.0 / totals.uses as f64 };
    totals
}

impl Report {
    /// The report as text: one block per Ingress, a line per key (and per snippet line), then
    /// the totals.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut block = |title: String, keys: &[KeyUse]| {
            out.push_str(&title);
            out.push('\n');
            if keys.is_empty() {
                out.push_str("  (no annotations)\n");
            }
            for key in keys {
                out.push_str(&format!("  {:<14} {}", key.outcome.label(), key.key));
                if let Some(note) = &key.note {
                    out.push_str(&format!(": {note}"));
                }
                out.push('\n');
                for line in &key.lines {
                    out.push_str(&format!("    line {:<3} {:<22} {}", line.line, line.directive, line.outcome.label()));
                    if !line.note.is_empty() {
                        out.push_str(&format!(": {}", line.note));
                    }
                    out.push('\n');
                }
                if let Some(instead) = key.instead {
                    out.push_str(&format!("    instead: {instead}\n"));
                }
            }
        };
        for ingress in &self.ingresses {
            block(format!("Ingress {}/{}", ingress.namespace, ingress.name), &ingress.keys);
        }
        if let Some(map) = &self.configmap {
            block(format!("ConfigMap {}/{}", map.namespace, map.name), &map.keys);
        }
        let t = &self.totals;
        let count = |o: Outcome| t.by_outcome.get(&o).copied().unwrap_or(0);
        out.push_str(&format!(
            "\n{} Ingresses, {} annotation uses: {} honoured, {} translated, {} invalid, {} ignored, {} fail closed \
             ({} Ingresses would answer 503). Coverage {:.1}%.\n",
            t.ingresses,
            t.uses,
            count(Outcome::Honoured),
            count(Outcome::Translated),
            count(Outcome::Invalid),
            count(Outcome::Ignored),
            count(Outcome::FailsClosed),
            t.closed_ingresses,
            t.coverage
        ));
        out
    }
}
