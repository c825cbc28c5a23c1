//! Ingresses written for ingress-nginx, unchanged, through the real binary: regular-expression
//! paths (`use-regex`) and `rewrite-target` with capture groups, as ingress-nginx's rewrite
//! example and path-matching guide describe them.

mod support;

use http::StatusCode;
use support::{Tidegate, echo, get, manifest_dir, service_yaml, write_manifest};

/// An Ingress for `host` with annotations and (pathType, path, service) paths.
fn ingress(name: &str, host: &str, annotations: &[(&str, &str)], paths: &[(&str, &str, &str)]) -> String {
    let mut meta = format!("metadata:\n  name: {name}\n  namespace: t\n");
    if !annotations.is_empty() {
        meta.push_str("  annotations:\n");
        for (key, value) in annotations {
            meta.push_str(&format!("    {key}: {value:?}\n"));
        }
    }
    let mut rules = String::new();
    for (kind, path, service) in paths {
        rules.push_str(&format!(
            "      - {{path: {path:?}, pathType: {kind}, backend: {{service: {{name: {service}, port: {{number: 80}}}}}}}}\n"
        ));
    }
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\n{meta}spec:\n  ingressClassName: tidegate\n  rules:\n  - host: {host}\n    http:\n      paths:\n{rules}"
    )
}

/// `rewrite-target: /$2` with `/something(/|$)(.*)` (ingress-nginx's rewrite example): the
/// backend gets `/` for `/something`, `/new` for `/something/new`, the query kept. On a host
/// whose paths are expressions (another Ingress sets `use-regex`), the longest expression that
/// matches wins, ignoring case, and a path that is not an expression elsewhere stays a prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_paths_and_rewrite_target() {
    let dir = manifest_dir();
    let (web, api) = (echo("t", "web").await, echo("t", "api").await);
    let manifests = [
        service_yaml("t", "web", 80, "http", &[web]),
        service_yaml("t", "api", 80, "http", &[api]),
        ingress(
            "rewrite",
            "rewrite.test",
            &[("nginx.ingress.kubernetes.io/rewrite-target", "/$2")],
            &[("ImplementationSpecific", "/something(/|$)(.*)", "web")],
        ),
        ingress(
            "regex",
            "regex.test",
            &[("nginx.ingress.kubernetes.io/use-regex", "true")],
            &[("ImplementationSpecific", "/api/v[0-9]+/.*", "api")],
        ),
        // Another Ingress for the same host, without the annotation: its paths are expressions
        // too, and the shorter one comes after.
        ingress("other", "regex.test", &[], &[("Prefix", "/", "web")]),
        ingress("plain", "plain.test", &[], &[("Prefix", "/api/v[0-9]+", "api")]),
    ]
    .concat();
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");

    for (request, path, query) in [
        ("/something", "/", ""),
        ("/something/", "/", ""),
        ("/something/new", "/new", ""),
        ("/SomeThing/new/deep?a=1&b=2", "/new/deep", "a=1&b=2"),
    ] {
        let answer = get(tidegate.http, "rewrite.test", request).await.expect("answered");
        assert_eq!(answer.status, StatusCode::OK, "{request}");
        let seen = answer.json();
        assert_eq!((seen["path"].as_str(), seen["query"].as_str()), (Some(path), Some(query)), "{request}: {seen}");
    }
    let other = get(tidegate.http, "rewrite.test", "/somethingelse").await.expect("answered");
    assert_eq!(other.status, StatusCode::NOT_FOUND, "(/|$) does not match 'e'");

    let served_by = |host: &'static str, path: &'static str| {
        let addr = tidegate.http;
        async move {
            let answer = get(addr, host, path).await.expect("answered");
            assert_eq!(answer.status, StatusCode::OK, "{host}{path}");
            (answer.json()["service"].as_str().unwrap_or_default().to_owned(), answer.json()["path"].clone())
        }
    };
    assert_eq!(served_by("regex.test", "/API/V2/users").await.0, "api", "an expression, ignoring case");
    let (service, path) = served_by("regex.test", "/api/vx/users").await;
    assert_eq!((service.as_str(), path.as_str()), ("web", Some("/api/vx/users")), "no rewrite without rewrite-target");
    assert_eq!(served_by("plain.test", "/api/v[0-9]+/x").await.0, "api", "a prefix elsewhere, taken literally");
    assert_eq!(get(tidegate.http, "plain.test", "/api/v2/x").await.expect("answered").status, StatusCode::NOT_FOUND);
}
