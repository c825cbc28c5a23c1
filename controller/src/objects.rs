//! The Kubernetes objects translation reads, and how statuses refer to them.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use crate::luaroute::LuaRoute;
pub use crate::status::ObjectRef;

/// Controller name in `IngressClass.spec.controller` that marks a class as ours.
pub const CONTROLLER_NAME: &str = "tidegate.dev/ingress-controller";

/// Everything [`crate::translate`] reads. Objects may come from a folder of manifests or from
/// the API server; order does not matter, translation sorts.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub ingresses: Vec<Arc<Ingress>>,
    pub ingress_classes: Vec<Arc<IngressClass>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub secrets: Vec<Arc<Secret>>,
    /// The global ConfigMap (`--configmap`) and the ConfigMaps of headers it and annotations
    /// name (`add-headers`, `proxy-set-headers`, `custom-headers`, `auth-proxy-set-headers`).
    pub config_maps: Vec<Arc<ConfigMap>>,
    pub lua_routes: Vec<Arc<LuaRoute>>,
    pub options: Options,
}

/// Settings that change how objects are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// IngressClass name that is ours even without an IngressClass object (`--ingress-class`).
    pub ingress_class: String,
    /// Serve Ingresses that name no class (`--watch-ingress-without-class`).
    pub watch_ingress_without_class: bool,
    /// Accept inline Lua in Ingress annotations (`--allow-snippet-annotations`). Off by default:
    /// anyone who may edit an Ingress could then run code in the proxy, while LuaRoutes are a
    /// separate kind that RBAC can grant to fewer people.
    pub allow_snippet_annotations: bool,
    /// `--default-ssl-certificate NAMESPACE/NAME`: the TLS Secret served for names no Ingress
    /// or LuaRoute claims.
    pub default_certificate: Option<(String, String)>,
    /// `--shared-dict NAME=SIZE`: dictionaries Lua of every namespace reaches.
    pub shared_dicts: Vec<(String, u64)>,
    /// `--global-auth-url` and its options: external auth for every Ingress that has none of
    /// its own and does not set `enable-global-auth: "false"` (see [`crate::translate::global_auth`]).
    pub global_auth: Option<tidegate_snapshot::ExternalAuth>,
    /// `--configmap NAMESPACE/NAME`: the ConfigMap of cluster-wide settings, with ingress-nginx's
    /// keys (see [`crate::translate::configmap_table`]).
    pub configmap: Option<(String, String)>,
    /// `--default-backend-service NAMESPACE/NAME`: the Service that answers requests no route
    /// matches (unless an Ingress's `spec.defaultBackend` does), and the error pages of
    /// `custom-http-errors` for Ingresses without the `default-backend` annotation.
    pub default_backend_service: Option<(String, String)>,
    /// `--enable-ssl-passthrough`: Ingresses may ask for `ssl-passthrough`.
    pub enable_ssl_passthrough: bool,
    /// `--lua-modules-namespace`: the namespace whose Lua modules (labelled ConfigMaps) every
    /// namespace may `require` (see [`crate::translate::lua_modules`]).
    pub lua_modules_namespace: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ingress_class: "tidegate".into(),
            watch_ingress_without_class: false,
            allow_snippet_annotations: false,
            default_certificate: None,
            shared_dicts: Vec::new(),
            global_auth: None,
            configmap: None,
            default_backend_service: None,
            enable_ssl_passthrough: false,
            lua_modules_namespace: None,
        }
    }
}

/// The namespace an object lives in: `default` when a manifest leaves it out, as kubectl does.
pub fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// The name of an object, empty when missing (validation reports that).
pub fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}
