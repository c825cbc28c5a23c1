//! Which Ingresses are ours.
//!
//! An Ingress is ours when
//! 1. its `spec.ingressClassName` names an IngressClass whose `spec.controller` is
//!    [`CONTROLLER_NAME`], or equals the configured class name (`--ingress-class`), or
//! 2. it names no class and carries the legacy `kubernetes.io/ingress.class` annotation with the
//!    configured class name, or
//! 3. it names no class at all, and an IngressClass of ours is marked default
//!    (`ingressclass.kubernetes.io/is-default-class: "true"`) or `--watch-ingress-without-class`
//!    is set.

use std::collections::BTreeSet;

use k8s_openapi::api::networking::v1::Ingress;

use crate::objects::{CONTROLLER_NAME, Inputs};

const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";

pub(super) struct Classes<'a> {
    ours: BTreeSet<&'a str>,
    take_classless: bool,
}

impl<'a> Classes<'a> {
    pub(super) fn new(inputs: &'a Inputs) -> Self {
        let mut ours: BTreeSet<&str> = BTreeSet::from([inputs.options.ingress_class.as_str()]);
        let mut default_is_ours = false;
        for class in &inputs.ingress_classes {
            let Some(name) = class.metadata.name.as_deref() else { continue };
            let controller = class.spec.as_ref().and_then(|s| s.controller.as_deref());
            if controller == Some(CONTROLLER_NAME) || name == inputs.options.ingress_class {
                ours.insert(name);
                let is_default = class.metadata.annotations.as_ref().and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION));
                default_is_ours |= is_default.is_some_and(|v| v == "true");
            }
        }
        Classes { ours, take_classless: default_is_ours || inputs.options.watch_ingress_without_class }
    }

    /// Whether a class name (from `spec.ingressClassName` or a LuaRoute) is ours.
    pub(super) fn is_ours_name(&self, class: Option<&str>) -> bool {
        match class {
            Some(name) => self.ours.contains(name),
            None => self.take_classless,
        }
    }

    pub(super) fn is_ours(&self, ingress: &Ingress) -> bool {
        if let Some(name) = ingress.spec.as_ref().and_then(|s| s.ingress_class_name.as_deref()) {
            return self.ours.contains(name);
        }
        let legacy = ingress.metadata.annotations.as_ref().and_then(|a| a.get(LEGACY_CLASS_ANNOTATION));
        match legacy {
            Some(name) => self.ours.contains(name.as_str()),
            None => self.take_classless,
        }
    }
}
