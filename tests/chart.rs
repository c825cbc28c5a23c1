//! The Helm chart, rendered by the real `helm template` with its default values and with each
//! values file in `charts/tidegate/ci/`:
//! - every object deserializes into its Kubernetes type with no unknown field;
//! - every flag the chart passes is one the binary's subcommand accepts;
//! - RBAC is exact: no wildcards, the proxy bound to nothing, Secrets read-only, and the
//!   controller granted precisely what it uses;
//! - pods meet the restricted Pod Security Standard and the proxy's grace period covers its
//!   preStop pause and drain.
//!
//! helm comes from `TIDEGATE_HELM`, `target/tools/helm` (where `.ci/chart-checks` installs it)
//! or `PATH`; without it these tests skip with a one-line message (and fail when `CI` is set).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::de::DeserializeOwned;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn helm() -> Option<PathBuf> {
    let candidates = [std::env::var_os("TIDEGATE_HELM").map(PathBuf::from), Some(repo().join("target/tools/helm"))];
    for candidate in candidates.into_iter().flatten() {
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    Command::new("helm").arg("version").output().ok().filter(|o| o.status.success()).map(|_| PathBuf::from("helm"))
}

/// Renders the chart once per values set: (name, objects).
fn renders(helm: &Path) -> Vec<(String, Vec<Value>)> {
    let chart = repo().join("charts/tidegate");
    let mut sets = vec![("default".to_owned(), None)];
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(chart.join("ci")).expect("ci values").map(|e| e.expect("entry").path()).collect();
    files.sort();
    for file in files {
        sets.push((file.file_name().expect("name").to_string_lossy().into_owned(), Some(file)));
    }
    sets.into_iter()
        .map(|(name, values)| {
            let mut command = Command::new(helm);
            command.args(["template", "edge", "--namespace", "edge", "--include-crds"]).arg(&chart);
            if let Some(values) = values {
                command.arg("--values").arg(values);
            }
            let out = command.output().expect("helm runs");
            assert!(out.status.success(), "helm template ({name}): {}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8(out.stdout).expect("utf-8");
            let objects: Vec<Value> = serde_saphyr::from_multiple(&text)
                .expect("rendered YAML")
                .into_iter()
                .filter(|v: &Value| !v.is_null())
                .collect();
            (name, objects)
        })
        .collect()
}

fn with_renders(mut test: impl FnMut(&str, &[Value])) {
    let Some(helm) = helm() else {
        assert!(std::env::var_os("CI").is_none(), "CI must have helm (.ci/chart-checks installs it)");
        eprintln!("skipped: no helm (set TIDEGATE_HELM or run .ci/chart-checks, which installs it)");
        return;
    };
    for (name, objects) in renders(&helm) {
        assert!(!objects.is_empty(), "{name}: nothing rendered");
        test(&name, &objects);
    }
}

fn strict<T: DeserializeOwned>(object: &Value) -> Result<(), String> {
    let mut unknown = Vec::new();
    let parsed: Result<T, _> = serde_ignored::deserialize(object.clone(), |path| unknown.push(path.to_string()));
    parsed.map_err(|e| e.to_string())?;
    if unknown.is_empty() { Ok(()) } else { Err(format!("unknown fields: {}", unknown.join(", "))) }
}

fn name(object: &Value) -> String {
    format!("{} {}", object["kind"].as_str().unwrap_or("?"), object["metadata"]["name"].as_str().unwrap_or("?"))
}

#[test]
fn every_rendered_object_matches_its_kubernetes_schema() {
    use k8s_openapi::api::{apps, autoscaling, core, networking, policy, rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    with_renders(|set, objects| {
        let mut service_ports = BTreeSet::new();
        for object in objects {
            let api_version = object["apiVersion"].as_str().unwrap_or("");
            let kind = object["kind"].as_str().unwrap_or("");
            let result = match (api_version, kind) {
                ("v1", "ServiceAccount") => strict::<core::v1::ServiceAccount>(object),
                ("v1", "Secret") => strict::<core::v1::Secret>(object),
                ("v1", "Service") => {
                    for port in object["spec"]["ports"].as_array().into_iter().flatten() {
                        service_ports.insert(port["name"].as_str().unwrap_or("").to_owned());
                    }
                    strict::<core::v1::Service>(object)
                }
                ("v1", "ConfigMap") => strict::<core::v1::ConfigMap>(object),
                ("apps/v1", "Deployment") => strict::<apps::v1::Deployment>(object),
                ("apps/v1", "DaemonSet") => strict::<apps::v1::DaemonSet>(object),
                ("networking.k8s.io/v1", "IngressClass") => strict::<networking::v1::IngressClass>(object),
                ("policy/v1", "PodDisruptionBudget") => strict::<policy::v1::PodDisruptionBudget>(object),
                ("autoscaling/v2", "HorizontalPodAutoscaler") => {
                    strict::<autoscaling::v2::HorizontalPodAutoscaler>(object)
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<rbac::v1::ClusterRole>(object),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    strict::<rbac::v1::ClusterRoleBinding>(object)
                }
                ("rbac.authorization.k8s.io/v1", "Role") => strict::<rbac::v1::Role>(object),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => strict::<rbac::v1::RoleBinding>(object),
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => strict::<CustomResourceDefinition>(object),
                // Prometheus Operator's kind has no type here: check the fields the chart sets.
                ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                    let endpoints = object["spec"]["endpoints"].as_array().cloned().unwrap_or_default();
                    let ok = !endpoints.is_empty()
                        && endpoints.iter().all(|e| e["port"].is_string() && e["path"].is_string())
                        && object["spec"]["selector"]["matchLabels"].is_object();
                    if ok {
                        Ok(())
                    } else {
                        Err("needs spec.selector.matchLabels and endpoints with port and path".into())
                    }
                }
                _ => Err(format!("a kind this test does not know: {api_version} {kind}")),
            };
            if let Err(e) = result {
                panic!("{set}: {} does not match its schema: {e}", name(object));
            }
            if kind == "DaemonSet" {
                assert_eq!(object["spec"].get("replicas"), None, "{set}: a DaemonSet has no replicas");
            }
        }
        for object in objects.iter().filter(|o| o["kind"] == "ServiceMonitor") {
            for endpoint in object["spec"]["endpoints"].as_array().into_iter().flatten() {
                let port = endpoint["port"].as_str().unwrap_or("");
                assert!(service_ports.contains(port), "{set}: ServiceMonitor port {port} is on no Service");
            }
        }
    });
}

fn pod_specs(objects: &[Value]) -> Vec<(String, &Value)> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "DaemonSet")
        .map(|o| (name(o), &o["spec"]["template"]["spec"]))
        .collect()
}

#[test]
fn every_flag_the_chart_passes_is_one_the_binary_accepts() {
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    with_renders(|set, objects| {
        for (workload, pod) in pod_specs(objects) {
            for container in pod["containers"].as_array().into_iter().flatten() {
                let args: Vec<&str> =
                    container["args"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                let subcommand = args.iter().find(|a| !a.starts_with('-')).expect("a subcommand");
                let text = help.entry((*subcommand).to_owned()).or_insert_with(|| {
                    let out = Command::new(env!("CARGO_BIN_EXE_tidegate"))
                        .args([subcommand, "--help"])
                        .output()
                        .expect("help");
                    String::from_utf8_lossy(&out.stdout).into_owned()
                });
                for flag in args.iter().filter(|a| a.starts_with("--")) {
                    let flag = flag.split('=').next().unwrap_or(flag);
                    assert!(
                        text.contains(&format!("{flag} "))
                            || text.contains(&format!("{flag}\n"))
                            || text.contains(&format!("{flag} <")),
                        "{set}: {workload} passes {flag}, which `tidegate {subcommand}` does not take"
                    );
                }
            }
        }
    });
}

/// Every (apiGroup, resource, verb) the controller uses, and nothing more.
const CONTROLLER_NEEDS: &[(&str, &str, &[&str])] = &[
    ("networking.k8s.io", "ingressclasses", &["get", "list", "watch"]),
    ("networking.k8s.io", "ingresses", &["get", "list", "watch"]),
    ("networking.k8s.io", "ingresses/status", &["patch"]),
    ("", "services", &["get", "list", "watch"]),
    ("", "secrets", &["get", "list", "watch"]),
    ("", "configmaps", &["get", "list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["get", "list", "watch"]),
    ("tidegate.dev", "luaroutes", &["get", "list", "watch"]),
    ("tidegate.dev", "luaroutes/status", &["patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    ("coordination.k8s.io", "leases", &["get", "list", "watch", "create", "update", "patch", "delete"]),
];

#[test]
fn rbac_is_exact_and_the_proxy_gets_none() {
    with_renders(|set, objects| {
        let roles: BTreeMap<(String, String), &Value> = objects
            .iter()
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
            .map(|o| {
                (
                    (
                        o["kind"].as_str().unwrap_or("").to_owned(),
                        o["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                    ),
                    o,
                )
            })
            .collect();
        let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
        for role in roles.values() {
            for rule in role["rules"].as_array().into_iter().flatten() {
                let list = |key: &str| -> Vec<String> {
                    rule[key].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
                };
                for key in ["apiGroups", "resources", "verbs", "resourceNames"] {
                    assert!(!list(key).iter().any(|v| v.contains('*')), "{set}: wildcard in {}: {rule}", name(role));
                }
                if list("resources").iter().any(|r| r == "secrets") {
                    let verbs: BTreeSet<String> = list("verbs").into_iter().collect();
                    assert_eq!(
                        verbs,
                        ["get", "list", "watch"].map(String::from).into(),
                        "{set}: Secrets are read-only"
                    );
                }
                for group in list("apiGroups") {
                    for resource in list("resources") {
                        for verb in list("verbs") {
                            granted.insert((group.clone(), resource.clone(), verb));
                        }
                    }
                }
            }
        }
        let needed: BTreeSet<(String, String, String)> = CONTROLLER_NEEDS
            .iter()
            .flat_map(|(g, r, verbs)| verbs.iter().map(|v| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned())))
            .collect();
        assert_eq!(granted, needed, "{set}: the roles grant exactly what the controller uses");
        for binding in objects.iter().filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding") {
            for subject in binding["subjects"].as_array().into_iter().flatten() {
                let who = subject["name"].as_str().unwrap_or("");
                assert!(
                    who.ends_with("-controller"),
                    "{set}: {} binds {who}; only the controller has API access",
                    name(binding)
                );
            }
            let role = (
                binding["roleRef"]["kind"].as_str().unwrap_or("").to_owned(),
                binding["roleRef"]["name"].as_str().unwrap_or("").to_owned(),
            );
            assert!(roles.contains_key(&role), "{set}: {} refers to a role the chart does not render", name(binding));
        }
        for (workload, pod) in pod_specs(objects) {
            if workload.ends_with("-proxy") {
                assert_eq!(pod["automountServiceAccountToken"], false, "{set}: the proxy mounts no API token");
            }
        }
    });
}

#[test]
fn pods_meet_the_restricted_pod_security_standard() {
    with_renders(|set, objects| {
        for (workload, pod) in pod_specs(objects) {
            let context = &pod["securityContext"];
            assert_eq!(context["runAsNonRoot"], true, "{set}: {workload}");
            assert_eq!(context["seccompProfile"]["type"], "RuntimeDefault", "{set}: {workload}");
            assert!(pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none(), "{set}: {workload}");
            for container in pod["containers"].as_array().into_iter().flatten() {
                let c = &container["securityContext"];
                assert_eq!(c["allowPrivilegeEscalation"], false, "{set}: {workload}");
                assert_eq!(c["readOnlyRootFilesystem"], true, "{set}: {workload}");
                assert!(c.get("privileged").is_none_or(|p| p == false), "{set}: {workload}");
                let drops: Vec<&str> =
                    c["capabilities"]["drop"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                assert_eq!(drops, ["ALL"], "{set}: {workload}");
                assert!(c["capabilities"].get("add").is_none(), "{set}: {workload} adds capabilities");
                for port in container["ports"].as_array().into_iter().flatten() {
                    assert!(port["containerPort"].as_u64() >= Some(1024), "{set}: {workload} binds a privileged port");
                }
                assert!(
                    container["readinessProbe"]["httpGet"]["port"] == "admin",
                    "{set}: {workload} probes the admin port"
                );
            }
            if workload.ends_with("-proxy") {
                let container = &pod["containers"][0];
                let sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().expect("preStop sleep");
                let drain = container["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .find_map(|a| a.strip_prefix("--drain-timeout-seconds="))
                    .and_then(|d| d.parse::<u64>().ok())
                    .expect("drain flag");
                let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("grace period");
                assert!(grace > sleep + drain, "{set}: grace {grace}s must exceed preStop {sleep}s + drain {drain}s");
            }
        }
    });
}
