//! The Ingress conformance features (kubernetes-sigs/ingress-controller-conformance), run as they
//! are from `$TIDEGATE_SHARED_DIR/conformance/ingress-conformance` (default `../shared`).
//!
//! Each scenario gets a new namespace, its manifests (the feature's Ingress, plus a Service,
//! EndpointSlice and echo backend for every service it names, plus any TLS Secret) in a fresh
//! folder, and a fresh `tidegate standalone` on loopback. Steps are matched by their text; a step
//! this harness does not know fails the scenario, so nothing passes by being skipped.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::{Request, StatusCode};
use support::{
    Answer, Body, Tidegate, echo, manifest_dir, self_signed, service_yaml, tls_connector, tls_request, tls_secret_yaml,
    write_manifest,
};

// ---------------------------------------------------------------------------------------------
// Gherkin, as much of it as the features use

#[derive(Clone, Debug, Default)]
struct Step {
    text: String,
    docstring: Option<String>,
    table: Vec<Vec<String>>,
}

#[derive(Debug, Default)]
struct Scenario {
    name: String,
    steps: Vec<Step>,
    outline: bool,
    examples: Vec<Vec<String>>,
}

#[derive(Debug, Default)]
struct Feature {
    background: Vec<Step>,
    scenarios: Vec<Scenario>,
}

const STEP_KEYWORDS: [&str; 5] = ["Given ", "When ", "Then ", "And ", "But "];

fn parse_feature(text: &str) -> Feature {
    enum Target {
        None,
        Background,
        Scenario,
        Examples,
    }
    let mut feature = Feature::default();
    let mut target = Target::None;
    let mut docstring: Option<(usize, Vec<String>)> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if let Some((indent, lines)) = docstring.as_mut() {
            if line == "\"\"\"" {
                let doc = lines.join("\n");
                let steps = match target {
                    Target::Background => &mut feature.background,
                    _ => &mut feature.scenarios.last_mut().expect("docstring in a scenario").steps,
                };
                steps.last_mut().expect("docstring after a step").docstring = Some(doc);
                docstring = None;
            } else {
                let cut = raw.char_indices().nth(*indent).map_or(raw.len(), |(i, _)| i);
                lines.push(if raw.len() >= cut && raw[..cut].trim().is_empty() {
                    raw[cut..].to_owned()
                } else {
                    line.to_owned()
                });
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
            continue;
        }
        if line == "\"\"\"" {
            docstring = Some((raw.find('"').unwrap_or(0), Vec::new()));
        } else if line.starts_with("Background:") {
            target = Target::Background;
        } else if let Some(name) = line.strip_prefix("Scenario Outline:").or_else(|| line.strip_prefix("Scenario:")) {
            feature.scenarios.push(Scenario {
                name: name.trim().to_owned(),
                outline: line.starts_with("Scenario Outline:"),
                ..Scenario::default()
            });
            target = Target::Scenario;
        } else if line.starts_with("Examples:") {
            target = Target::Examples;
        } else if line.starts_with('|') {
            let row: Vec<String> = line.trim_matches('|').split('|').map(|c| c.trim().to_owned()).collect();
            match target {
                Target::Examples => feature.scenarios.last_mut().expect("examples in a scenario").examples.push(row),
                Target::Background => feature.background.last_mut().expect("table after a step").table.push(row),
                Target::Scenario => feature
                    .scenarios
                    .last_mut()
                    .and_then(|s| s.steps.last_mut())
                    .expect("table after a step")
                    .table
                    .push(row),
                Target::None => {}
            }
        } else if let Some(keyword) = STEP_KEYWORDS.iter().find(|k| line.starts_with(**k)) {
            let step = Step { text: line[keyword.len()..].to_owned(), ..Step::default() };
            match target {
                Target::Background => feature.background.push(step),
                Target::Scenario => feature.scenarios.last_mut().expect("step in a scenario").steps.push(step),
                _ => {}
            }
        }
        // Anything else is free-text description.
    }
    feature
}

/// The runnable cases of a feature: plain scenarios once, outlines once per Examples row (an
/// outline without Examples runs nothing).
fn cases(feature: &Feature) -> Vec<(String, Vec<Step>)> {
    let mut out = Vec::new();
    for scenario in &feature.scenarios {
        if !scenario.outline {
            out.push((scenario.name.clone(), [feature.background.clone(), scenario.steps.clone()].concat()));
            continue;
        }
        let Some((header, rows)) = scenario.examples.split_first() else { continue };
        for row in rows {
            let fill =
                |s: &str| header.iter().zip(row).fold(s.to_owned(), |acc, (k, v)| acc.replace(&format!("<{k}>"), v));
            let steps = feature.background.iter().chain(&scenario.steps).map(|s| Step {
                text: fill(&s.text),
                docstring: s.docstring.as_deref().map(fill),
                table: s.table.iter().map(|r| r.iter().map(|c| fill(c)).collect()).collect(),
            });
            out.push((format!("{} [{}]", scenario.name, row.join(", ")), steps.collect()));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running a case

struct World {
    namespace: String,
    dir: tempfile::TempDir,
    ingresses: Vec<serde_json::Value>,
    secrets: Vec<String>,
    trusted: Vec<String>,
    /// Echo replicas per service, and the ports each Ingress names it by.
    replicas: BTreeMap<String, Vec<SocketAddr>>,
    tidegate: Option<Tidegate>,
    last: Option<Answer>,
    last_answers: Vec<Answer>,
    verified_host: Option<String>,
}

fn quoted(text: &str) -> Vec<String> {
    text.split('"').skip(1).step_by(2).map(str::to_owned).collect()
}

impl World {
    fn new(case: usize) -> World {
        World {
            namespace: format!("conformance-{case}-{}", std::process::id()),
            dir: manifest_dir(),
            ingresses: Vec::new(),
            secrets: Vec::new(),
            trusted: Vec::new(),
            replicas: BTreeMap::new(),
            tidegate: None,
            last: None,
            last_answers: Vec::new(),
            verified_host: None,
        }
    }

    fn add_ingress(&mut self, yaml: &str, name: Option<&str>) -> Result<(), String> {
        let parsed: serde_json::Value = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        let mut ingress = if name.is_some() {
            serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {}, "spec": parsed})
        } else {
            parsed
        };
        if let Some(name) = name {
            ingress["metadata"]["name"] = name.into();
        }
        ingress["metadata"]["namespace"] = self.namespace.clone().into();
        // The runner gives an Ingress without a class the class under test.
        if ingress["spec"].get("ingressClassName").is_none() {
            ingress["spec"]["ingressClassName"] = "tidegate".into();
        }
        self.ingresses.push(ingress);
        Ok(())
    }

    /// Services the Ingresses name, with the port each is named by (number, or 8080 for a name).
    fn services(&self) -> BTreeMap<String, u16> {
        let mut out = BTreeMap::new();
        let mut note = |backend: &serde_json::Value| {
            let Some(service) = backend.get("service") else { return };
            let name = service["name"].as_str().unwrap_or_default().to_owned();
            let port = service["port"]["number"].as_u64().and_then(|n| u16::try_from(n).ok()).unwrap_or(8080);
            out.insert(name, port);
        };
        for ingress in &self.ingresses {
            if let Some(b) = ingress["spec"].get("defaultBackend") {
                note(b);
            }
            for rule in ingress["spec"]["rules"].as_array().into_iter().flatten() {
                for path in rule["http"]["paths"].as_array().into_iter().flatten() {
                    note(&path["backend"]);
                }
            }
        }
        out
    }

    async fn write_manifests(&mut self) {
        let mut text = String::new();
        for ingress in &self.ingresses {
            text.push_str("---\n");
            text.push_str(&serde_json::to_string(ingress).expect("json is yaml"));
            text.push('\n');
        }
        for (service, port) in self.services() {
            if !self.replicas.contains_key(&service) {
                let addr = echo(&self.namespace, &service).await;
                self.replicas.insert(service.clone(), vec![addr]);
            }
            text.push_str(&service_yaml(&self.namespace, &service, port, "http", &self.replicas[&service]));
        }
        for secret in &self.secrets {
            text.push_str(secret);
        }
        write_manifest(self.dir.path(), "scenario.yaml", &text);
    }

    async fn deploy(&mut self) {
        if self.tidegate.is_some() {
            return;
        }
        self.write_manifests().await;
        let dir = self.dir.path().to_owned();
        self.tidegate =
            Some(tokio::task::spawn_blocking(move || Tidegate::start(&dir, &[])).await.expect("start tidegate"));
    }

    fn tidegate(&self) -> &Tidegate {
        self.tidegate.as_ref().expect("deployed")
    }

    fn ingress_exposed(&self) -> bool {
        let status = self.tidegate().status();
        let names: BTreeSet<String> =
            self.ingresses.iter().map(|i| i["metadata"]["name"].as_str().unwrap_or_default().to_owned()).collect();
        status["objects"].as_array().into_iter().flatten().any(|o| {
            o["object"]["kind"] == "Ingress"
                && o["object"]["namespace"] == self.namespace.as_str()
                && names.contains(o["object"]["name"].as_str().unwrap_or_default())
                && o["load_balancer"].as_array().is_some_and(|a| !a.is_empty())
        })
    }

    /// Sends a request as the Go runner did (Go's User-Agent, redirects followed).
    async fn send(&mut self, method: &str, url: &str) -> Result<Answer, String> {
        let mut url = url.to_owned();
        for _ in 0..10 {
            let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("bad url {url}"))?;
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            // A redirect's Location carries our listener's port; SNI takes the bare name.
            let host = host.split(':').next().unwrap_or(host);
            let tidegate = self.tidegate();
            let host_header = if host.is_empty() { tidegate.http.to_string() } else { host.to_owned() };
            let mut builder = Request::builder()
                .method(method)
                .uri(path)
                .header("host", &host_header)
                .header("user-agent", "Go-http-client/1.1");
            if matches!(method, "POST" | "PUT" | "PATCH") {
                builder = builder.header("content-length", "0");
            }
            let request = builder.body(Body::default()).map_err(|e| e.to_string())?;
            let answer = if scheme == "https" {
                let trusted: Vec<&str> = self.trusted.iter().map(String::as_str).collect();
                let connector = tls_connector(Some(&trusted), &[b"http/1.1"]);
                let answer = tls_request(&connector, tidegate.https, host, request).await?;
                self.verified_host = Some(host.to_owned());
                answer.answer
            } else {
                support::H1::connect(tidegate.http).await?.send(request).await?
            };
            let redirect = matches!(answer.status.as_u16(), 301 | 302 | 303 | 307 | 308);
            match answer.headers.get("location").and_then(|l| l.to_str().ok()) {
                Some(location) if redirect => url = location.to_owned(),
                _ => return Ok(answer),
            }
        }
        Err("too many redirects".into())
    }

    async fn step(&mut self, step: &Step) -> Result<(), String> {
        let text = step.text.as_str();
        let q = quoted(text);
        let last = || self.last.as_ref().ok_or("no response yet");
        let echoed = |key: &str| -> Result<serde_json::Value, String> { Ok(last()?.json()[key].clone()) };
        match text {
            t if t.starts_with("a new random namespace") => Ok(()),
            t if t.starts_with("an Ingress resource named") => {
                self.add_ingress(step.docstring.as_deref().ok_or("no spec given")?, Some(q.first().ok_or("no name")?))
            }
            t if t.starts_with("an Ingress resource") => {
                self.add_ingress(step.docstring.as_deref().ok_or("no manifest given")?, None)
            }
            t if t.starts_with("a self-signed TLS secret named") => {
                let (name, host) = (q.first().ok_or("no name")?, q.get(1).ok_or("no host")?);
                let (cert, key) = self_signed(&[host]);
                self.secrets.push(tls_secret_yaml(&self.namespace, name, &cert, &key));
                self.trusted.push(cert);
                Ok(())
            }
            t if t.starts_with("The Ingress status shows the IP address or FQDN") => {
                self.deploy().await;
                if self.ingress_exposed() { Ok(()) } else { Err("the Ingress status shows no address".into()) }
            }
            t if t.starts_with("The Ingress status should not contain the IP address or FQDN") => {
                self.deploy().await;
                if self.ingress_exposed() { Err("the Ingress status shows an address".into()) } else { Ok(()) }
            }
            t if t.starts_with("The backend deployment") => {
                let service = q.first().ok_or("no deployment")?.clone();
                let count: usize = t.rsplit(' ').next().and_then(|n| n.parse().ok()).ok_or("no replica count")?;
                let mut addrs = self.replicas.remove(&service).unwrap_or_default();
                while addrs.len() < count {
                    addrs.push(echo(&self.namespace, &service).await);
                }
                self.replicas.insert(service, addrs);
                let before = self.tidegate().version();
                self.write_manifests().await;
                self.tidegate().wait_version_after(before);
                Ok(())
            }
            t if t.starts_with("I send a") && t.contains("request to http://\"") => {
                // `I send a "GET" request to http://"host"/"path"` (an outline's placeholders).
                let url = format!("http://{}/{}", q.get(1).ok_or("no host")?, q.get(2).ok_or("no path")?);
                self.deploy().await;
                self.last = Some(self.send(q.first().ok_or("no method")?, &url).await?);
                Ok(())
            }
            t if t.starts_with("I send a") => {
                self.deploy().await;
                self.last = Some(self.send(q.first().ok_or("no method")?, q.get(1).ok_or("no url")?).await?);
                Ok(())
            }
            t if t.starts_with("I send") && t.contains("requests to") => {
                let count: usize = t.split(' ').nth(2).and_then(|n| n.parse().ok()).ok_or("no request count")?;
                self.deploy().await;
                self.last_answers.clear();
                for _ in 0..count {
                    let answer = self.send("GET", q.first().ok_or("no url")?).await?;
                    self.last_answers.push(answer);
                }
                Ok(())
            }
            t if t.starts_with("all the responses status-code must be") => {
                let pods: BTreeSet<String> =
                    self.last_answers.iter().map(|a| a.json()["pod"].as_str().unwrap_or("").to_owned()).collect();
                let want: usize = t
                    .split("of ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .ok_or("no pod count")?;
                if self.last_answers.iter().any(|a| a.status != StatusCode::OK) || pods.len() != want {
                    return Err(format!("{} different pods answered, wanted {want}", pods.len()));
                }
                Ok(())
            }
            t if t.starts_with("the response status-code must be") => {
                let want: u16 = t.rsplit(' ').next().and_then(|n| n.parse().ok()).ok_or("no status")?;
                let got = last()?.status.as_u16();
                if got == want {
                    Ok(())
                } else {
                    Err(format!("status {got}, wanted {want}; body {:?}", String::from_utf8_lossy(&last()?.body)))
                }
            }
            t if t.starts_with("the response must be served by the") => expect_eq(&last()?.served_by(), &q[0]),
            t if t.starts_with("the response proto must be") => expect_eq(&format!("{:?}", last()?.version), &q[0]),
            t if t.starts_with("the response headers must contain") => {
                for row in step.table.iter().skip(1) {
                    let value = last()?.headers.get(row[0].as_str()).ok_or(format!("no {} header", row[0]))?;
                    if row[1] != "*" && value.as_bytes() != row[1].as_bytes() {
                        return Err(format!("header {} is {value:?}, wanted {}", row[0], row[1]));
                    }
                }
                Ok(())
            }
            t if t.starts_with("the request method must be") => {
                expect_eq(echoed("method")?.as_str().unwrap_or(""), &q[0])
            }
            t if t.starts_with("the request path must be") => {
                // The runner compares paths without their leading '/'.
                let got = echoed("path")?;
                expect_eq(got.as_str().unwrap_or("").trim_start_matches('/'), q[0].trim_start_matches('/'))
            }
            t if t.starts_with("the request proto must be") => {
                expect_eq(echoed("proto")?.as_str().unwrap_or(""), &q[0])
            }
            t if t.starts_with("the request host must be") => expect_eq(echoed("host")?.as_str().unwrap_or(""), &q[0]),
            t if t.starts_with("the request headers must contain") => {
                let headers = support::echoed_headers(last()?);
                for row in step.table.iter().skip(1) {
                    let values = headers.get(&row[0]).ok_or(format!("upstream saw no {} header", row[0]))?;
                    if row[1] != "*" && !values.contains(&row[1]) {
                        return Err(format!("upstream saw {} = {values:?}, wanted {}", row[0], row[1]));
                    }
                }
                Ok(())
            }
            t if t.starts_with("the secure connection must verify the") => {
                if self.verified_host.as_deref() == Some(q[0].as_str()) {
                    Ok(())
                } else {
                    Err(format!("no verified TLS connection to {}", q[0]))
                }
            }
            _ => Err(format!("step not implemented by this harness: {text}")),
        }
    }
}

fn expect_eq(got: &str, want: &str) -> Result<(), String> {
    if got == want { Ok(()) } else { Err(format!("got {got:?}, wanted {want:?}")) }
}

fn conformance_dir() -> Option<PathBuf> {
    let shared = std::env::var_os("TIDEGATE_SHARED_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"), PathBuf::from);
    let dir = shared.join("conformance/ingress-conformance");
    dir.is_dir().then_some(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_conformance_features() {
    let mut out = std::io::stderr();
    let Some(dir) = conformance_dir() else {
        assert!(std::env::var_os("CI").is_none(), "CI must have the conformance features (set TIDEGATE_SHARED_DIR)");
        let _ = writeln!(
            out,
            "skipping Ingress conformance: ../shared/conformance/ingress-conformance not found (set TIDEGATE_SHARED_DIR)"
        );
        return;
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read features")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "feature"))
        .collect();
    files.sort();
    let (mut passed, mut failures, mut case_no) = (0, Vec::new(), 0);
    for file in &files {
        let feature = parse_feature(&std::fs::read_to_string(file).expect("read feature"));
        let (mut file_passed, mut file_failed) = (0, 0);
        for (name, steps) in cases(&feature) {
            case_no += 1;
            let mut world = World::new(case_no);
            let mut outcome = Ok(());
            for step in &steps {
                if let Err(e) = world.step(step).await {
                    outcome = Err(format!("{}: {name}: step `{}`: {e}", file.display(), step.text));
                    break;
                }
            }
            match outcome {
                Ok(()) => file_passed += 1,
                Err(e) => {
                    file_failed += 1;
                    failures.push(e);
                }
            }
        }
        let feature_name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let _ = writeln!(out, "ingress conformance {feature_name}: {file_passed} passed, {file_failed} failed");
        passed += file_passed;
    }
    let _ = writeln!(out, "ingress conformance total: {passed} passed, {} failed", failures.len());
    assert!(failures.is_empty(), "conformance failures:\n{}", failures.join("\n"));
    assert_eq!(passed, 29, "the features hold 29 runnable cases");
}

#[test]
fn gherkin_outlines_expand_per_example_row() {
    let text = "Feature: x\n  Background:\n    Given a thing\n    \"\"\"\n    a: 1\n    \"\"\"\n  Scenario Outline: o\n    When I use \"<v>\"\n    Then it has <key>\n      | key |\n      | k   |\n    Examples:\n      | v |\n      | 1 |\n      | 2 |\n  Scenario Outline: none\n    When nothing\n";
    let feature = parse_feature(text);
    let cases = cases(&feature);
    assert_eq!(cases.len(), 2);
    assert_eq!(cases[1].1[1].text, "I use \"2\"");
    assert_eq!(cases[0].1[0].docstring.as_deref(), Some("a: 1"));
    assert_eq!(cases[0].1[2].table, vec![vec!["key".to_owned()], vec!["k".to_owned()]]);
}
