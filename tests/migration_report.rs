//! `tidegate report` over a corpus of real Ingresses (`tests/migration_corpus/`: the Ingresses
//! widely used charts and documentation write for ingress-nginx, each file naming its source),
//! and over the objects of a cluster (the API server stand-in).
//!
//! The corpus is the migration's yardstick: at least 95% of its annotation uses are honoured or
//! translated, and each one that is not either closes its routes or is harmless and reported.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/migration_corpus")
}

/// Runs `tidegate report ARGS`: exit code, stdout.
fn run_report(args: &[&str], env: &[(&str, &std::path::Path)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tidegate"));
    command.arg("report").args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("runs");
    assert!(output.stderr.is_empty() || output.status.code() != Some(2), "{}", String::from_utf8_lossy(&output.stderr));
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

fn uses(report: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for ingress in report["ingresses"].as_array().expect("ingresses") {
        let name =
            format!("{}/{}", ingress["namespace"].as_str().unwrap_or(""), ingress["name"].as_str().unwrap_or(""));
        for key in ingress["keys"].as_array().expect("keys") {
            out.push((
                name.clone(),
                key["key"].as_str().unwrap_or("").to_owned(),
                key["outcome"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    out
}

#[test]
fn the_corpus_is_honoured_at_95_percent_and_the_rest_is_accounted_for() {
    let corpus = corpus();
    let corpus = corpus.to_str().expect("path");
    let configmap = ["--configmap", "ingress-nginx/ingress-nginx-controller"];
    let (code, out) = run_report(&[&configmap[..], &["--format", "json", corpus]].concat(), &[]);
    let report: Value = serde_json::from_str(&out).expect("JSON");
    let totals = &report["totals"];
    let coverage = totals["coverage"].as_f64().expect("coverage");
    let all = uses(&report);
    println!("{} Ingresses, {} uses, coverage {coverage:.1}%", totals["ingresses"], all.len());
    assert!(all.len() >= 90, "a corpus of some size: {} uses", all.len());
    assert!(
        coverage >= 95.0,
        "coverage {coverage:.1}%: {:?}",
        all.iter().filter(|u| u.2 != "honoured" && u.2 != "translated").collect::<Vec<_>>()
    );
    // What is not honoured is reported, each as failing closed or as harmless to ignore.
    for (ingress, key, outcome) in &all {
        assert!(
            ["honoured", "translated", "ignored", "fails-closed"].contains(&outcome.as_str()),
            "{ingress} {key}: {outcome}"
        );
    }
    let outcome_of = |ingress: &str, key: &str| {
        all.iter().find(|u| u.0 == ingress && u.1.ends_with(key)).map(|u| u.2.clone()).unwrap_or_default()
    };
    // Closed, never served without what they ask: nginx's cache and location blocks.
    assert_eq!(outcome_of("mattermost/mattermost", "configuration-snippet"), "fails-closed");
    assert_eq!(outcome_of("nextcloud/nextcloud", "server-snippet"), "fails-closed");
    // Translated: the reference's server-snippet example (set / if / return).
    assert_eq!(outcome_of("default/mobile-redirect", "server-snippet"), "translated");
    assert_eq!(outcome_of("default/security-headers", "configuration-snippet"), "translated");
    // Access rules are honoured, never ignored.
    assert_eq!(outcome_of("default/internal-or-auth", "satisfy"), "honoured");
    assert_eq!(outcome_of("default/cm-acme-http-solver-x7k2p", "whitelist-source-range"), "honoured");
    // Refused lines are listed with what to write instead.
    let nextcloud = report["ingresses"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["name"] == "nextcloud"))
        .expect("nextcloud");
    let snippet = nextcloud["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["key"].as_str().is_some_and(|n| n.ends_with("server-snippet"))))
        .expect("snippet");
    let lines = snippet["lines"].as_array().expect("lines");
    assert!(lines.iter().any(|l| l["directive"] == "proxy_hide_header" && l["outcome"] == "translated"), "{lines:?}");
    assert!(lines.iter().any(|l| l["directive"] == "location" && l["outcome"] == "fails-closed"), "{lines:?}");
    assert!(snippet["instead"].is_string());
    // Some Ingresses would answer 503: exit 1, unless allowed; the coverage bar alone passes.
    assert_eq!(code, Some(1), "an Ingress that would answer 503 fails the run");
    let (code, _) = run_report(&[&configmap[..], &["--allow-closed", "--min-coverage", "95", corpus]].concat(), &[]);
    assert_eq!(code, Some(0));
    let (code, _) = run_report(&[&configmap[..], &["--allow-closed", "--min-coverage", "99.5", corpus]].concat(), &[]);
    assert_eq!(code, Some(1), "under the bar");
    // Text for people: a line per key, the totals last.
    let (_, text) = run_report(&[&configmap[..], &[corpus]].concat(), &[]);
    assert!(text.contains("Ingress argocd/argocd-server-ingress") && text.contains("Coverage "), "{text}");
    assert!(text.contains("instead: the controller's `--enable-ssl-passthrough`"), "ssl-passthrough's advice: {text}");
    // With the flag the migrant had on ingress-nginx, ssl-passthrough is honoured too.
    let (_, out) =
        run_report(&[&configmap[..], &["--enable-ssl-passthrough", "--format", "json", corpus]].concat(), &[]);
    let with_flag: Value = serde_json::from_str(&out).expect("JSON");
    let passthrough = uses(&with_flag).into_iter().find(|u| u.1.ends_with("ssl-passthrough")).expect("a use");
    assert_eq!(passthrough.2, "honoured");
}

#[test]
fn unreadable_input_exits_2() {
    let dir = tempfile::tempdir().expect("dir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "kind: [").expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_tidegate")).args(["report"]).arg(&bad).output().expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad.yaml"));
}

/// `--cluster` reads the objects from the API server the kubeconfig names (the stand-in).
#[test]
fn the_report_reads_a_cluster() {
    let api = support::apiserver::ApiServer::start();
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = api.kubeconfig(dir.path());
    api.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: shop\n  namespace: web\n  annotations:\n    nginx.ingress.kubernetes.io/proxy-body-size: 8m\n    nginx.ingress.kubernetes.io/enable-opentelemetry: \"true\"\n    nginx.ingress.kubernetes.io/auth-snippet: \"return 401;\"\nspec:\n  ingressClassName: nginx\n  rules:\n  - host: shop.example.com\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: shop, port: {number: 80}}}}\n",
    );
    let (code, out) = run_report(&["--cluster", "--format", "json"], &[("KUBECONFIG", &kubeconfig)]);
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let all = uses(&report);
    let outcome = |key: &str| all.iter().find(|u| u.1.ends_with(key)).map(|u| u.2.as_str()).unwrap_or("");
    assert_eq!(outcome("proxy-body-size"), "honoured", "{all:?}");
    assert_eq!(outcome("enable-opentelemetry"), "ignored");
    assert_eq!(outcome("auth-snippet"), "fails-closed");
    assert_eq!(code, Some(1), "the Ingress would answer 503");
}
