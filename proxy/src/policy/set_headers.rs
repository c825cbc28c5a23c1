//! Headers a route sets on its responses (`custom-headers`, the global ConfigMap's
//! `add-headers`) and on its upstream requests (the ConfigMap's `proxy-set-headers`).
//!
//! A value without variables is made into a header once, when the route's filters are
//! compiled, and costs a copy per request. A value with nginx variables is expanded in the
//! rewrite step, where the request's facts are at hand, by a filter that leaves it among the
//! request's effects.

use http::header::{HeaderName, HeaderValue};
use tidegate_snapshot::{SetHeader, TemplatePart};

use super::variables::expand;
use super::{Effects, Facts, Verdict};

/// A header with its value made once.
pub(super) type Fixed = (HeaderName, HeaderValue);
/// A header whose value has variables.
pub(super) type Templated = (HeaderName, SetHeader);

/// Headers whose values are fixed, and those with variables.
pub(super) fn split(headers: &[SetHeader]) -> (Vec<Fixed>, Vec<Templated>) {
    let mut fixed = Vec::new();
    let mut templated = Vec::new();
    for header in headers {
        let Ok(name) = HeaderName::from_bytes(header.name.as_bytes()) else { continue };
        if header.value.parts().iter().all(|p| matches!(p, TemplatePart::Text(_))) {
            if let Ok(value) = HeaderValue::from_str(header.value.as_str()) {
                fixed.push((name, value));
            }
        } else {
            templated.push((name, header.clone()));
        }
    }
    (fixed, templated)
}

/// Expands the headers with variables into the request's effects.
#[derive(Debug)]
pub(super) struct SetHeadersFilter {
    pub(super) response: Vec<Templated>,
    pub(super) upstream: Vec<Templated>,
}

impl SetHeadersFilter {
    pub(super) fn check(&self, facts: &Facts<'_>, slot: &mut Option<Box<Effects>>) -> Verdict {
        let effects = Effects::of(slot);
        let value = |header: &SetHeader| HeaderValue::from_str(&expand(&header.value, facts)).ok();
        for (name, header) in &self.response {
            if let Some(value) = value(header) {
                effects.headers.push((name.clone(), value));
            }
        }
        for (name, header) in &self.upstream {
            if let Some(value) = value(header) {
                effects.upstream_headers.push((name.clone(), value));
            }
        }
        Verdict::Continue
    }
}
