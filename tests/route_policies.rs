//! Route policies through the real binary: what an Ingress's annotations ask of a route, and
//! what happens when tidegate cannot honour it (the route answers 503, never served open).

mod support;

use http::StatusCode;
use support::{Tidegate, echo, get, manifest_dir, service_yaml, write_manifest};

/// An Ingress `name` for `host` to Service `web`, with annotations.
fn ingress(name: &str, host: &str, annotations: &[(&str, &str)]) -> String {
    let mut meta = format!("metadata:\n  name: {name}\n  namespace: t\n");
    if !annotations.is_empty() {
        meta.push_str("  annotations:\n");
        for (key, value) in annotations {
            meta.push_str(&format!("    {key}: {value:?}\n"));
        }
    }
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\n{meta}spec:\n  ingressClassName: tidegate\n  rules:\n  - host: {host}\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}\n"
    )
}

async fn start(manifests: &str) -> (Tidegate, tempfile::TempDir) {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    write_manifest(dir.path(), "all.yaml", &format!("{}{manifests}", service_yaml("t", "web", 80, "http", &[web])));
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");
    (tidegate, dir)
}

/// The problems `/status` lists for Ingress `t/name`.
fn problems(tidegate: &Tidegate, name: &str) -> Vec<serde_json::Value> {
    let status = tidegate.status();
    let objects = status["objects"].as_array().cloned().unwrap_or_default();
    let object = objects
        .into_iter()
        .find(|o| o["object"]["kind"] == "Ingress" && o["object"]["name"] == name)
        .unwrap_or_else(|| panic!("Ingress {name} in /status: {status}"));
    object["problems"].as_array().cloned().unwrap_or_default()
}

/// Each key that restricts who may reach a route, or how much, and that tidegate does not
/// honour, under either prefix: the Ingress's routes answer 503 and `/status` names the key as
/// an `UnsupportedAnnotation` error. An Ingress beside it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restrictive_annotations_not_honoured_answer_503() {
    let restrictive = [
        ("nginx.ingress.kubernetes.io/whitelist-source-range", "10.0.0.0/8"),
        ("nginx.ingress.kubernetes.io/denylist-source-range", "127.0.0.0/8"),
        ("nginx.ingress.kubernetes.io/auth-type", "basic"),
        ("nginx.ingress.kubernetes.io/auth-url", "http://127.0.0.1:1/auth"),
        ("nginx.ingress.kubernetes.io/auth-tls-verify-client", "on"),
        ("nginx.ingress.kubernetes.io/satisfy", "any"),
        ("nginx.ingress.kubernetes.io/limit-rps", "1"),
        ("nginx.ingress.kubernetes.io/limit-connections", "1"),
        ("nginx.ingress.kubernetes.io/enable-global-auth", "false"),
        ("tidegate.dev/allowlist-source-range", "10.0.0.0/8"),
        ("tidegate.dev/configuration-snippet", "deny all;"),
    ];
    let mut manifests = ingress("open", "open.test", &[]);
    for (i, (key, value)) in restrictive.iter().enumerate() {
        manifests.push_str(&ingress(&format!("guarded-{i}"), &format!("guarded-{i}.test"), &[(key, value)]));
    }
    let (tidegate, _dir) = start(&manifests).await;

    let open = get(tidegate.http, "open.test", "/").await.expect("open");
    assert_eq!(open.status, StatusCode::OK, "an Ingress without such keys is served");
    for (i, (key, _)) in restrictive.iter().enumerate() {
        let host = format!("guarded-{i}.test");
        let answer = get(tidegate.http, &host, "/").await.expect("guarded");
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{key} is not honoured: 503, never open");
        assert!(String::from_utf8_lossy(&answer.body).contains("503"), "an error page, not the backend");
        let problems = problems(&tidegate, &format!("guarded-{i}"));
        assert!(
            problems.iter().any(|p| p["reason"] == "UnsupportedAnnotation"
                && p["severity"] == "error"
                && p["field"] == format!("metadata.annotations[{key:?}]")),
            "{key} is named in /status: {problems:?}"
        );
        let logged = tidegate.problems_mentioning(key);
        assert!(!logged.is_empty(), "{key} is logged");
    }
}

/// A key that changes behaviour but not access is ignored with a warning: the route serves,
/// `/status` and the log say the key was not honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_annotations_not_honoured_serve_with_a_warning() {
    let key = "nginx.ingress.kubernetes.io/proxy-buffering";
    let (tidegate, _dir) = start(&ingress("buffered", "buffered.test", &[(key, "on")])).await;
    let answer = get(tidegate.http, "buffered.test", "/").await.expect("served");
    assert_eq!(answer.status, StatusCode::OK);
    let problems = problems(&tidegate, "buffered");
    assert!(
        problems.iter().any(|p| p["reason"] == "UnsupportedAnnotation" && p["severity"] == "warning"),
        "{problems:?}"
    );
    assert!(!tidegate.problems_mentioning(key).is_empty(), "logged as a warning");
}
