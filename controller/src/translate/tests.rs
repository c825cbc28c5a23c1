//! Translation rules, one test per rule: objects in, the snapshot or status that rule demands out.

use tidegate_snapshot::{Endpoint, HostMatch, PathKind};

use super::*;
use crate::manifests::{into_inputs, parse_str};
use crate::objects::Options;

fn inputs_with(yaml: &str, options: Options) -> Inputs {
    let (objects, errors) = parse_str(yaml);
    assert!(errors.is_empty(), "test manifests must parse: {errors:?}");
    into_inputs(objects, options)
}

fn run(yaml: &str) -> Translation {
    translate(&inputs_with(yaml, Options::default()))
}

/// An Ingress of class `tidegate` with the given spec (indented YAML under `spec:`).
fn ingress(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  ingressClassName: tidegate\n{spec}\n"
    )
}

/// A rule: host (or none) with paths of (type, path, service).
fn rule(host: Option<&str>, paths: &[(&str, &str, &str)]) -> String {
    let mut out = String::new();
    match host {
        Some(h) => out.push_str(&format!("  - host: {h:?}\n    http:\n      paths:\n")),
        None => out.push_str("  - http:\n      paths:\n"),
    }
    for (kind, path, service) in paths {
        out.push_str(&format!(
            "      - {{pathType: {kind}, path: {path:?}, backend: {{service: {{name: {service}, port: {{number: 80}}}}}}}}\n"
        ));
    }
    out
}

fn rules(rules: &[String]) -> String {
    format!("  rules:\n{}", rules.concat())
}

/// A Service with port 80 (named http) and a ready endpoint 127.0.0.1:<target>.
fn service(namespace: &str, name: &str, target: u16) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: {target}}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {namespace}\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {target}}}]\nendpoints:\n- addresses: [127.0.0.1]\n"
    )
}

/// (path kind, path, backend id) of each route of a host, in precedence order.
fn routes(t: &Translation, host: &HostMatch) -> Vec<(PathKind, String, String)> {
    let vhost = t.snapshot.routing.virtual_hosts.iter().find(|v| &v.host == host);
    let vhost = vhost.unwrap_or_else(|| panic!("no virtual host {host} in {:#?}", t.snapshot.routing));
    vhost
        .routes
        .iter()
        .map(|r| (r.path.kind, r.path.value.clone(), r.action.backend.as_ref().map_or(String::new(), |b| b.0.clone())))
        .collect()
}

fn exact(h: &str) -> HostMatch {
    HostMatch::Exact(h.into())
}

fn status<'a>(t: &'a Translation, kind: &str, ns: &str, name: &str) -> &'a ObjectStatus {
    let found = t
        .statuses
        .iter()
        .find(|s| s.object.kind == kind && s.object.namespace.as_deref() == Some(ns) && s.object.name == name);
    found.unwrap_or_else(|| panic!("no status for {kind} {ns}/{name} in {:#?}", t.statuses))
}

fn problem_fields(s: &ObjectStatus, reason: Reason) -> Vec<&str> {
    s.problems.iter().filter(|p| p.reason == reason).map(|p| p.field.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// Which Ingresses are ours

fn class_case(class_line: &str, extra: &str, options: Options) -> bool {
    let yaml = format!(
        "{extra}---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i, namespace: ns}}\nspec:\n{class_line}  defaultBackend: {{service: {{name: s, port: {{number: 80}}}}}}\n"
    );
    let t = translate(&inputs_with(&yaml, options));
    t.snapshot.routing.default_backend.is_some()
}

const OUR_CLASS: &str = "---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: edge}\nspec: {controller: tidegate.dev/ingress-controller}\n";
const OUR_DEFAULT_CLASS: &str = "---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata:\n  name: edge\n  annotations: {ingressclass.kubernetes.io/is-default-class: \"true\"}\nspec: {controller: tidegate.dev/ingress-controller}\n";
const OTHER_DEFAULT_CLASS: &str = "---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata:\n  name: nginx\n  annotations: {ingressclass.kubernetes.io/is-default-class: \"true\"}\nspec: {controller: k8s.io/ingress-nginx}\n";

/// The class rules, as a table: (case, class line, extra objects, watch-without-class, ours?).
#[test]
fn ingress_class_selection() {
    let cases: &[(&str, &str, &str, bool, bool)] = &[
        ("class named by --ingress-class", "  ingressClassName: tidegate\n", "", false, true),
        ("IngressClass with our controller", "  ingressClassName: edge\n", OUR_CLASS, false, true),
        ("another controller's class", "  ingressClassName: nginx\n", OTHER_DEFAULT_CLASS, false, false),
        ("unknown class", "  ingressClassName: some-invalid-class-name\n", "", true, false),
        ("no class, nothing default", "", "", false, false),
        ("no class, our class is default", "", OUR_DEFAULT_CLASS, false, true),
        ("no class, another class is default", "", OTHER_DEFAULT_CLASS, false, false),
        ("no class, --watch-ingress-without-class", "", "", true, true),
    ];
    for (case, class_line, extra, watch, ours) in cases {
        let options = Options { watch_ingress_without_class: *watch, ..Options::default() };
        assert_eq!(class_case(class_line, extra, options), *ours, "rule: {case}");
    }
}

/// The legacy `kubernetes.io/ingress.class` annotation selects the class when the spec names none.
#[test]
fn legacy_class_annotation() {
    let yaml = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: i\n  annotations: {kubernetes.io/ingress.class: tidegate}\nspec:\n  defaultBackend: {service: {name: s, port: {number: 80}}}\n";
    assert!(run(yaml).snapshot.routing.default_backend.is_some());
    let theirs = yaml.replace("ingress.class: tidegate", "ingress.class: nginx");
    let t = translate(&inputs_with(&theirs, Options { watch_ingress_without_class: true, ..Options::default() }));
    assert!(t.snapshot.routing.default_backend.is_none(), "an Ingress annotated for another class is not ours");
}

/// Objects not ours get no status: their controller writes it.
#[test]
fn foreign_ingresses_get_no_status() {
    let yaml = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\nspec:\n  ingressClassName: nginx\n  defaultBackend: {service: {name: s, port: {number: 80}}}\n";
    assert!(run(yaml).statuses.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Paths and precedence

/// Exact routes come before Prefix routes; longer prefixes before shorter ones.
#[test]
fn exact_before_prefix_then_longest_first() {
    let spec = rules(&[rule(
        Some("a.com"),
        &[
            ("Prefix", "/", "root"),
            ("Prefix", "/aaa", "aaa"),
            ("Exact", "/aaa", "aaa-exact"),
            ("Prefix", "/aaa/bbb", "bbb"),
        ],
    )]);
    let t = run(&ingress("ns", "i", &spec));
    assert_eq!(
        routes(&t, &exact("a.com")),
        vec![
            (PathKind::Exact, "/aaa".into(), "ns/aaa-exact:80".into()),
            (PathKind::Prefix, "/aaa/bbb".into(), "ns/bbb:80".into()),
            (PathKind::Prefix, "/aaa".into(), "ns/aaa:80".into()),
            (PathKind::Prefix, "/".into(), "ns/root:80".into()),
        ]
    );
}

/// ImplementationSpecific is treated as Prefix; a path left out of it means `/`.
#[test]
fn implementation_specific_is_prefix() {
    let spec = "  rules:\n  - host: a.com\n    http:\n      paths:\n      - {pathType: ImplementationSpecific, path: /x, backend: {service: {name: s, port: {number: 80}}}}\n      - {pathType: ImplementationSpecific, backend: {service: {name: t, port: {number: 80}}}}\n";
    let t = run(&ingress("ns", "i", spec));
    assert_eq!(
        routes(&t, &exact("a.com")),
        vec![(PathKind::Prefix, "/x".into(), "ns/s:80".into()), (PathKind::Prefix, "/".into(), "ns/t:80".into())]
    );
}

/// A trailing slash on a Prefix rule is insignificant: `/a/` and `/a` are the same route, so the
/// second is shadowed and reported.
#[test]
fn prefix_trailing_slash_is_insignificant_for_conflicts() {
    let spec = rules(&[rule(Some("a.com"), &[("Prefix", "/a/", "one"), ("Prefix", "/a", "two")])]);
    let t = run(&ingress("ns", "i", &spec));
    assert_eq!(routes(&t, &exact("a.com")), vec![(PathKind::Prefix, "/a/".into(), "ns/one:80".into())]);
    assert_eq!(problem_fields(status(&t, "Ingress", "ns", "i"), Reason::Conflict), vec!["spec.rules[0].http.paths[1]"]);
}

/// Exact `/foo/` and Exact `/foo` are different routes.
#[test]
fn exact_trailing_slash_is_significant() {
    let spec = rules(&[rule(Some("a.com"), &[("Exact", "/foo/", "slash"), ("Exact", "/foo", "bare")])]);
    let t = run(&ingress("ns", "i", &spec));
    assert_eq!(routes(&t, &exact("a.com")).len(), 2);
}

/// Between Ingresses, the older one (creationTimestamp) wins a contested path, whatever its name.
#[test]
fn older_ingress_wins_a_contested_path() {
    let young = ingress("ns", "a-young", &rules(&[rule(Some("a.com"), &[("Prefix", "/x", "young")])]))
        .replace("namespace: ns}", "namespace: ns, creationTimestamp: \"2026-02-01T00:00:00Z\"}");
    let old = ingress("ns", "z-old", &rules(&[rule(Some("a.com"), &[("Prefix", "/x", "old")])]))
        .replace("namespace: ns}", "namespace: ns, creationTimestamp: \"2025-01-01T00:00:00Z\"}");
    let t = run(&format!("{young}{old}"));
    assert_eq!(routes(&t, &exact("a.com")), vec![(PathKind::Prefix, "/x".into(), "ns/old:80".into())]);
    assert_eq!(problem_fields(status(&t, "Ingress", "ns", "a-young"), Reason::Conflict).len(), 1);
    assert!(problem_fields(status(&t, "Ingress", "ns", "z-old"), Reason::Conflict).is_empty());
}

/// Without creation times, namespace then name breaks the tie.
#[test]
fn namespace_and_name_break_ties() {
    let b = ingress("b", "i", &rules(&[rule(Some("a.com"), &[("Exact", "/x", "s")])]));
    let a = ingress("a", "z", &rules(&[rule(Some("a.com"), &[("Exact", "/x", "s")])]));
    let t = run(&format!("{b}{a}"));
    assert_eq!(routes(&t, &exact("a.com")), vec![(PathKind::Exact, "/x".into(), "a/s:80".into())]);
}

/// Several Ingresses naming one host are merged into one virtual host in precedence order.
#[test]
fn ingresses_merge_per_host() {
    let one = ingress("ns", "one", &rules(&[rule(Some("a.com"), &[("Prefix", "/", "root")])]));
    let two = ingress("ns", "two", &rules(&[rule(Some("a.com"), &[("Prefix", "/api", "api")])]));
    let t = run(&format!("{one}{two}"));
    assert_eq!(t.snapshot.routing.virtual_hosts.len(), 1);
    assert_eq!(
        routes(&t, &exact("a.com")).iter().map(|r| r.2.as_str()).collect::<Vec<_>>(),
        vec!["ns/api:80", "ns/root:80"]
    );
}

// ---------------------------------------------------------------------------------------------
// Hosts

/// `*.foo.com` becomes a wildcard host; a rule without a host becomes the catch-all.
#[test]
fn host_kinds() {
    let spec = rules(&[
        rule(Some("*.foo.com"), &[("Prefix", "/", "w")]),
        rule(None, &[("Prefix", "/", "any")]),
        rule(Some("foo.com"), &[("Prefix", "/", "e")]),
    ]);
    let t = run(&ingress("ns", "i", &spec));
    let hosts: Vec<_> = t.snapshot.routing.virtual_hosts.iter().map(|v| v.host.clone()).collect();
    assert_eq!(hosts, vec![exact("foo.com"), HostMatch::Wildcard("foo.com".into()), HostMatch::Any]);
}

// ---------------------------------------------------------------------------------------------
// Default backend

/// The oldest Ingress with a defaultBackend provides it; others are reported.
#[test]
fn default_backend_oldest_wins() {
    let a = ingress("ns", "a", "  defaultBackend: {service: {name: first, port: {number: 80}}}");
    let b = ingress("ns", "b", "  defaultBackend: {service: {name: second, port: {number: 80}}}");
    let t = run(&format!("{b}{a}"));
    assert_eq!(
        t.snapshot.routing.default_backend.as_ref().and_then(|d| d.backend.as_ref()).map(|b| b.0.as_str()),
        Some("ns/first:80")
    );
    assert_eq!(problem_fields(status(&t, "Ingress", "ns", "b"), Reason::Conflict), vec!["spec.defaultBackend"]);
}

/// No defaultBackend anywhere: none in the snapshot (the proxy answers 404).
#[test]
fn no_default_backend() {
    let t = run(&ingress("ns", "i", &rules(&[rule(Some("a.com"), &[("Prefix", "/", "s")])])));
    assert!(t.snapshot.routing.default_backend.is_none());
}

// ---------------------------------------------------------------------------------------------
// Backends and endpoints

/// A port by number or by name resolves through the Service to its EndpointSlice's ready
/// endpoints on the matching (named) port.
#[test]
fn ports_by_number_and_name_resolve_to_endpoints() {
    let spec = "  rules:\n  - host: a.com\n    http:\n      paths:\n      - {pathType: Prefix, path: /n, backend: {service: {name: web, port: {number: 80}}}}\n      - {pathType: Prefix, path: /s, backend: {service: {name: web, port: {name: http}}}}\n";
    let t = run(&format!("{}{}", ingress("ns", "i", spec), service("ns", "web", 9001)));
    let expected = vec![Endpoint { address: "127.0.0.1".into(), port: 9001 }];
    assert_eq!(t.snapshot.endpoints[&BackendId("ns/web:80".into())], expected);
    assert_eq!(t.snapshot.endpoints[&BackendId("ns/web:http".into())], expected);
    assert!(status(&t, "Ingress", "ns", "i").problems.is_empty());
}

/// Only ready endpoints are served; a missing `ready` condition counts as ready.
#[test]
fn only_ready_endpoints() {
    let slice = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec:\n  ports: [{port: 80}]\n\
        ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}\n\
        addressType: IPv4\nports: [{port: 9000}]\nendpoints:\n- addresses: [127.0.0.1]\n  conditions: {ready: true}\n- addresses: [127.0.0.2]\n  conditions: {ready: false}\n- addresses: [127.0.0.3]\n";
    let t =
        run(&format!("{}{slice}", ingress("ns", "i", "  defaultBackend: {service: {name: web, port: {number: 80}}}")));
    let addresses: Vec<_> =
        t.snapshot.endpoints[&BackendId("ns/web:80".into())].iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addresses, vec!["127.0.0.1", "127.0.0.3"]);
}

/// A missing Service keeps the route (it answers 503) and is reported on the field.
#[test]
fn missing_service_is_reported_and_route_kept() {
    let t = run(&ingress("ns", "i", &rules(&[rule(Some("a.com"), &[("Prefix", "/", "ghost")])])));
    assert_eq!(routes(&t, &exact("a.com")).len(), 1);
    assert!(t.snapshot.endpoints[&BackendId("ns/ghost:80".into())].is_empty());
    let s = status(&t, "Ingress", "ns", "i");
    assert!(s.accepted);
    assert_eq!(problem_fields(s, Reason::BackendNotFound), vec!["spec.rules[0].http.paths[0].backend.service"]);
}

/// A port the Service does not have is reported.
#[test]
fn missing_service_port_is_reported() {
    let spec = "  defaultBackend: {service: {name: web, port: {number: 8080}}}";
    let t = run(&format!("{}{}", ingress("ns", "i", spec), service("ns", "web", 9001)));
    assert_eq!(
        problem_fields(status(&t, "Ingress", "ns", "i"), Reason::BackendNotFound),
        vec!["spec.defaultBackend.service"]
    );
}

/// Resource backends are reported as unsupported, never dropped silently. An ExternalName
/// Service is a backend by name, with the port the Ingress names, for the proxies to resolve.
#[test]
fn resource_backends_are_reported_and_external_names_are_named() {
    let spec = "  rules:\n  - http:\n      paths:\n      - {pathType: Prefix, path: /r, backend: {resource: {kind: Bucket, name: b}}}\n      - {pathType: Prefix, path: /e, backend: {service: {name: ext, port: {number: 8443}}}}\n";
    let ext = "---\napiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: ns}\nspec: {type: ExternalName, externalName: api.example.com., ports: [{port: 80}]}\n";
    let t = run(&format!("{}{ext}", ingress("ns", "i", spec)));
    let s = status(&t, "Ingress", "ns", "i");
    assert_eq!(problem_fields(s, Reason::Unsupported), vec!["spec.rules[0].http.paths[0].backend.resource"]);
    assert_eq!(routes(&t, &HostMatch::Any).len(), 1, "the resource path is not served");
    let id = tidegate_snapshot::BackendId("ns/ext:8443".into());
    assert_eq!(
        t.snapshot.names.get(&id),
        Some(&tidegate_snapshot::NamedEndpoint { name: "api.example.com".into(), port: 8443 })
    );
    assert_eq!(t.snapshot.endpoints.get(&id), Some(&Vec::new()), "resolved by the proxies");
}

// ---------------------------------------------------------------------------------------------
// Validation

/// An invalid Ingress is rejected whole, naming the field; other Ingresses keep serving.
#[test]
fn invalid_ingress_is_rejected_and_others_serve() {
    let bad = ingress("ns", "bad", &rules(&[rule(Some("a.com"), &[("Regex", "/x", "s")])]));
    let bad_host = ingress("ns", "bad-host", &rules(&[rule(Some("A.com"), &[("Prefix", "/", "s")])]));
    let bad_path = ingress("ns", "bad-path", &rules(&[rule(Some("c.com"), &[("Exact", "x", "s")])]));
    let good = ingress("ns", "good", &rules(&[rule(Some("b.com"), &[("Prefix", "/", "s")])]));
    let t = run(&format!("{bad}{bad_host}{bad_path}{good}"));
    for (name, field) in [
        ("bad", "spec.rules[0].http.paths[0].pathType"),
        ("bad-host", "spec.rules[0].host"),
        ("bad-path", "spec.rules[0].http.paths[0].path"),
    ] {
        let s = status(&t, "Ingress", "ns", name);
        assert!(!s.accepted, "{name} is rejected");
        assert_eq!(problem_fields(s, Reason::Invalid), vec![field], "{name} names its field");
    }
    let hosts: Vec<_> = t.snapshot.routing.virtual_hosts.iter().map(|v| v.host.clone()).collect();
    assert_eq!(hosts, vec![exact("b.com")]);
}

/// An Ingress naming a LuaRoute that does not exist keeps its routes, marked misconfigured: they
/// answer 500 instead of skipping the Lua or falling through to another route.
#[test]
fn lua_route_annotation_without_the_lua_route_fails_closed() {
    let yaml = ingress("ns", "i", &rules(&[rule(Some("a.com"), &[("Prefix", "/", "s")])]))
        .replace("namespace: ns}", "namespace: ns, annotations: {tidegate.dev/lua-route: api}}");
    let t = run(&yaml);
    assert!(!status(&t, "Ingress", "ns", "i").accepted);
    assert_fails_closed(&t, &exact("a.com"));
}

/// Every route of `host` matches but answers 500: misconfigured, with no Lua to run.
fn assert_fails_closed(t: &Translation, host: &HostMatch) {
    let vhost = t.snapshot.routing.virtual_hosts.iter().find(|v| &v.host == host).expect("the host still matches");
    assert!(!vhost.routes.is_empty());
    for route in &vhost.routes {
        assert!(
            route.action.refusal.as_ref().is_some_and(|r| r.status == 500),
            "{} is marked misconfigured",
            route.name
        );
        assert!(route.action.lua.is_none());
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

fn tls_secret(namespace: &str, name: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: \"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\"\n  tls.key: \"-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----\\n\"\n"
    )
}

/// `spec.tls` binds the Secret's certificate to its hosts; those hosts redirect plain HTTP.
#[test]
fn tls_binds_certificates_and_redirects() {
    let spec = format!(
        "  tls: [{{hosts: [a.com], secretName: a-tls}}]\n{}",
        rules(&[rule(Some("a.com"), &[("Prefix", "/", "s")]), rule(Some("b.com"), &[("Prefix", "/", "s")])])
    );
    let t = run(&format!("{}{}", ingress("ns", "i", &spec), tls_secret("ns", "a-tls")));
    let vhosts = &t.snapshot.routing.virtual_hosts;
    assert_eq!(vhosts[0].tls.as_deref(), Some("ns/a-tls"));
    assert!(vhosts[0].routes[0].ssl_redirect, "hosts with TLS redirect");
    assert_eq!(vhosts[1].tls, None);
    assert!(!vhosts[1].routes[0].ssl_redirect, "hosts without TLS do not");
    assert_eq!(t.snapshot.routing.certificates.len(), 1);
}

/// `ssl-redirect: "false"` (ingress-nginx's or tidegate's name) turns the redirect off.
#[test]
fn ssl_redirect_can_be_disabled() {
    for key in ["nginx.ingress.kubernetes.io/ssl-redirect", "tidegate.dev/ssl-redirect"] {
        let spec = format!(
            "  tls: [{{hosts: [a.com], secretName: a-tls}}]\n{}",
            rules(&[rule(Some("a.com"), &[("Prefix", "/", "s")])])
        );
        let yaml = ingress("ns", "i", &spec)
            .replace("namespace: ns}", &format!("namespace: ns, annotations: {{{key}: \"false\"}}}}"));
        let t = run(&format!("{yaml}{}", tls_secret("ns", "a-tls")));
        assert!(!t.snapshot.routing.virtual_hosts[0].routes[0].ssl_redirect, "{key}");
    }
}

/// `force-ssl-redirect: "true"` redirects plain HTTP to HTTPS on a host without TLS of its own
/// too (TLS ending in front of the proxy, or the default certificate serving it).
#[test]
fn force_ssl_redirect_needs_no_certificate() {
    let yaml = ingress("ns", "i", &rules(&[rule(Some("b.com"), &[("Prefix", "/", "s")])])).replace(
        "namespace: ns}",
        "namespace: ns, annotations: {nginx.ingress.kubernetes.io/force-ssl-redirect: \"true\"}}",
    );
    let t = run(&yaml);
    let vhost = &t.snapshot.routing.virtual_hosts[0];
    assert_eq!(vhost.tls, None);
    assert!(vhost.routes[0].ssl_redirect, "forced without a certificate");
}

/// A wildcard certificate covers the exact hosts under it.
#[test]
fn wildcard_certificate_covers_exact_hosts() {
    let spec = format!(
        "  tls: [{{hosts: [\"*.a.com\"], secretName: w}}]\n{}",
        rules(&[rule(Some("x.a.com"), &[("Prefix", "/", "s")])])
    );
    let t = run(&format!("{}{}", ingress("ns", "i", &spec), tls_secret("ns", "w")));
    let x = t.snapshot.routing.virtual_hosts.iter().find(|v| v.host == exact("x.a.com")).expect("x.a.com");
    assert_eq!(x.tls.as_deref(), Some("ns/w"));
}

/// A missing or unusable Secret is reported; the host falls back to the default certificate and
/// everything else is served.
#[test]
fn bad_secrets_are_reported_and_hosts_still_served() {
    let spec = format!(
        "  tls: [{{hosts: [a.com], secretName: missing}}, {{hosts: [b.com], secretName: opaque}}]\n{}",
        rules(&[rule(Some("a.com"), &[("Prefix", "/", "s")]), rule(Some("b.com"), &[("Prefix", "/", "s")])])
    );
    let opaque =
        "---\napiVersion: v1\nkind: Secret\nmetadata: {name: opaque, namespace: ns}\nstringData: {password: x}\n";
    let t = run(&format!("{}{opaque}", ingress("ns", "i", &spec)));
    let s = status(&t, "Ingress", "ns", "i");
    assert_eq!(problem_fields(s, Reason::SecretNotFound), vec!["spec.tls[0].secretName"]);
    assert_eq!(problem_fields(s, Reason::InvalidCertificate), vec!["spec.tls[1].secretName"]);
    assert!(s.accepted);
    assert!(t.snapshot.routing.virtual_hosts.iter().all(|v| v.tls.is_none() && !v.routes[0].ssl_redirect));
    assert_eq!(t.snapshot.routing.virtual_hosts.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// LuaRoute

/// Schema rules a CRD cannot express are checked and named; an invalid LuaRoute is not served.
#[test]
fn invalid_lua_routes_name_their_fields() {
    let yaml = "apiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: api, namespace: shop}\nspec:\n  hosts: [api.example.com]\n  sharedDicts: [{name: cache, size: 10Mx}]\n  routes:\n  - name: v1\n    match: {path: {type: Prefix, value: v1}}\n";
    let t = run(yaml);
    let s = status(&t, "LuaRoute", "shop", "api");
    assert!(!s.accepted);
    let invalid = problem_fields(s, Reason::Invalid);
    assert_eq!(invalid, vec!["spec.sharedDicts[0].size", "spec.routes[0].match.path.value", "spec.routes[0].backend"]);
    assert!(t.snapshot.routing.virtual_hosts.is_empty());
}

const LUA_ROUTE: &str = r#"
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  cpuBudget: 50ms
  lua:
    access: |
      if not ngx.var.http_x_api_key then return ngx.exit(401) end
  routes:
  - name: hello
    match: {path: {type: Exact, value: /hello}, methods: [GET]}
    lua:
      content: ngx.say("hello")
  - name: v1
    match: {path: {type: Prefix, value: /v1}, headers: [{name: X-Canary, value: "1"}]}
    backend: {service: {name: web, port: {number: 80}}}
    lua:
      access: ngx.req.set_header("x-canary-seen", "1")
  - name: v1-stable
    match: {path: {type: Prefix, value: /v1}}
    backend: {service: {name: web, port: {number: 80}}}
"#;

/// A valid LuaRoute becomes routes whose handlers are the LuaRoute's then the route's own, in
/// each phase; content-only routes have no backend; more specific matches come first.
#[test]
fn lua_routes_become_routes_with_handlers() {
    let t = run(&format!("{LUA_ROUTE}{}", service("shop", "web", 9000)));
    let s = status(&t, "LuaRoute", "shop", "api");
    assert!(s.accepted, "{:?}", s.problems);
    let vhost = &t.snapshot.routing.virtual_hosts[0];
    assert_eq!(vhost.host, exact("api.example.com"));
    let names: Vec<&str> = vhost.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["shop/api/hello", "shop/api/v1", "shop/api/v1-stable"],
        "exact first, then the header-matched prefix"
    );
    let hello = &vhost.routes[0];
    assert_eq!(hello.methods, vec!["GET"]);
    assert!(hello.action.backend.is_none());
    let lua = hello.action.lua.as_ref().expect("lua");
    assert_eq!((lua.access.len(), lua.content.len(), lua.cpu_budget_ms), (1, 1, Some(50)));
    let v1 = &vhost.routes[1];
    assert_eq!(v1.headers, vec![tidegate_snapshot::HeaderMatch { name: "x-canary".into(), value: "1".into() }]);
    let v1_lua = v1.action.lua.as_ref().expect("lua");
    assert_eq!(v1_lua.access.len(), 2, "the LuaRoute's access handler, then the route's");
    assert_eq!(v1_lua.access[0], lua.access[0], "one script for the shared handler");
    let script = |id: &str| t.snapshot.routing.scripts.iter().find(|s| s.id == id).expect("script listed");
    assert_eq!(script(&v1_lua.access[0]).name, "LuaRoute shop/api spec.lua.access");
    assert_eq!(script(&v1_lua.access[1]).name, "LuaRoute shop/api spec.routes[1].lua.access");
    assert_eq!(t.snapshot.routing.scripts.len(), 3);
}

/// Lua that does not compile is reported on its field with the Lua line; the LuaRoute's routes
/// answer 500, and everything else is served.
#[test]
fn lua_syntax_errors_name_field_and_line() {
    let broken = LUA_ROUTE.replace(
        "      access: ngx.req.set_header(\"x-canary-seen\", \"1\")",
        "      access: |\n        local a = 1\n        local b = = 2",
    );
    let good = ingress("shop", "site", &rules(&[rule(Some("www.example.com"), &[("Prefix", "/", "web")])]));
    let t = run(&format!("{broken}{good}"));
    let s = status(&t, "LuaRoute", "shop", "api");
    assert!(!s.accepted);
    let problem = s.problems.iter().find(|p| p.reason == Reason::LuaSyntaxError).expect("syntax error reported");
    assert_eq!(problem.field, "spec.routes[1].lua.access");
    assert!(problem.message.starts_with("line 2:"), "{}", problem.message);
    assert_fails_closed(&t, &exact("api.example.com"));
    assert!(t.snapshot.routing.scripts.is_empty(), "no Lua of the broken LuaRoute is shipped");
    let site = t.snapshot.routing.virtual_hosts.iter().find(|v| v.host == exact("www.example.com")).expect("served");
    assert!(site.routes[0].action.refusal.is_none(), "other objects are not affected");
}

fn attaching(name: &str, annotations: &str) -> String {
    ingress("shop", name, &rules(&[rule(Some("www.example.com"), &[("Prefix", "/", "web")])]))
        .replace("namespace: shop}", &format!("namespace: shop, annotations: {{{annotations}}}}}"))
}

/// An Ingress naming a LuaRoute runs that LuaRoute's spec.lua handlers on its paths.
#[test]
fn ingresses_attach_lua_route_handlers() {
    let t = run(&format!("{LUA_ROUTE}{}", attaching("site", "tidegate.dev/lua-route: api")));
    let s = status(&t, "Ingress", "shop", "site");
    assert!(s.accepted, "{:?}", s.problems);
    let site = t.snapshot.routing.virtual_hosts.iter().find(|v| v.host == exact("www.example.com")).expect("served");
    let lua = site.routes[0].action.lua.as_ref().expect("handlers attached");
    assert_eq!(lua.access.len(), 1);
    assert!(lua.content.is_empty(), "only spec.lua is attached, not a route's handlers");
    assert_eq!(lua.cpu_budget_ms, Some(50));
}

/// Attaching a LuaRoute that is missing or invalid leaves the Ingress unserved (fail closed).
#[test]
fn attaching_a_missing_or_invalid_lua_route_fails_closed() {
    let t = run(&attaching("site", "tidegate.dev/lua-route: nope"));
    assert!(!status(&t, "Ingress", "shop", "site").accepted);
    assert_fails_closed(&t, &exact("www.example.com"));
    let broken = LUA_ROUTE.replace("cpuBudget: 50ms", "cpuBudget: forever");
    let t = run(&format!("{broken}{}", attaching("site", "tidegate.dev/lua-route: api")));
    let s = status(&t, "Ingress", "shop", "site");
    assert!(!s.accepted);
    assert_fails_closed(&t, &exact("www.example.com"));
    assert!(
        !t.snapshot.routing.virtual_hosts.iter().any(|v| v.host == exact("api.example.com")),
        "a LuaRoute whose fields are invalid has no routes to keep"
    );
}

/// Inline Lua annotations are refused unless the controller allows them; then they compile.
#[test]
fn snippet_annotations_need_the_flag() {
    let yaml = attaching("site", "tidegate.dev/access-by-lua: \"ngx.exit(403)\"");
    let t = run(&yaml);
    let s = status(&t, "Ingress", "shop", "site");
    assert!(!s.accepted);
    assert_eq!(problem_fields(s, Reason::Unsupported), vec!["metadata.annotations[\"tidegate.dev/access-by-lua\"]"]);

    let allowed = Options { allow_snippet_annotations: true, ..Options::default() };
    let t = translate(&inputs_with(&yaml, allowed.clone()));
    let lua = t.snapshot.routing.virtual_hosts[0].routes[0].action.lua.clone().expect("attached");
    assert_eq!(lua.access.len(), 1);

    let bad = attaching("site", "tidegate.dev/log-by-lua: \"ngx.log(\"");
    let t = translate(&inputs_with(&bad, allowed));
    assert_eq!(problem_fields(status(&t, "Ingress", "shop", "site"), Reason::LuaSyntaxError).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Determinism

/// The same objects in any order give the same snapshot and statuses.
#[test]
fn order_of_inputs_does_not_matter() {
    let parts = [
        ingress("ns", "a", &rules(&[rule(Some("a.com"), &[("Prefix", "/", "web"), ("Exact", "/x", "web")])])),
        ingress(
            "ns",
            "b",
            &rules(&[rule(Some("a.com"), &[("Prefix", "/", "web")]), rule(None, &[("Prefix", "/y", "web")])]),
        ),
        ingress("other", "c", "  defaultBackend: {service: {name: web, port: {number: 80}}}"),
        service("ns", "web", 9000),
    ];
    let forward = run(&parts.concat());
    let mut reversed = parts.to_vec();
    reversed.reverse();
    assert_eq!(run(&reversed.concat()), forward);
}

/// Secrets carry their keys base64-encoded in `data` (or plain in `stringData`); both are read.
#[test]
fn tls_secret_from_base64_data() {
    let secret = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: d, namespace: ns}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=\n  tls.key: LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCk1JSUUKLS0tLS1FTkQgUFJJVkFURSBLRVktLS0tLQo=\n";
    let spec = format!(
        "  tls: [{{hosts: [a.com], secretName: d}}]\n{}",
        rules(&[rule(Some("a.com"), &[("Prefix", "/", "s")])])
    );
    let t = run(&format!("{}{secret}", ingress("ns", "i", &spec)));
    let certificate = &t.snapshot.routing.certificates[0];
    assert!(certificate.cert_pem.starts_with("-----BEGIN CERTIFICATE-----\nMIIB"));
    assert!(certificate.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
}

/// An Ingress with annotations, one rule for `host` to Service `web`.
fn annotated(name: &str, host: &str, annotations: &[(&str, &str)]) -> String {
    let list: String = annotations.iter().map(|(k, v)| format!("    {k}: {v:?}\n")).collect();
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: {name}\n  namespace: ns\n  annotations:\n{list}spec:\n  ingressClassName: tidegate\n{}\n",
        rules(&[rule(Some(host), &[("Prefix", "/", "web")])])
    )
}

fn opaque(name: &str, entries: &[(&str, &str)]) -> String {
    let data: String = entries.iter().map(|(k, v)| format!("  {k}: {v:?}\n")).collect();
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: ns}}\ntype: Opaque\nstringData:\n{data}"
    )
}

/// Basic auth: the htpasswd file under `auth` (comments, blank lines and a repeated user, whose
/// first line counts, as nginx reads it) or one key per user becomes typed users on every
/// route; what cannot be read closes the routes (503) with the field named.
#[test]
fn basic_auth_reads_the_secret_and_fails_closed() {
    let sha = "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=";
    let file = format!("# staff\nann:{sha}\n\nbob:$apr1$lZL6V/ci$PR6QJXkRFUzdUuaYcwrI//\nann:$1$x$y\n");
    fn auth(secret: &str) -> Vec<(&'static str, &str)> {
        vec![
            ("nginx.ingress.kubernetes.io/auth-type", "basic"),
            ("nginx.ingress.kubernetes.io/auth-secret", secret),
            ("nginx.ingress.kubernetes.io/auth-realm", "Staff"),
        ]
    }
    let mut map = auth("users-map");
    map.push(("tidegate.dev/auth-secret-type", "auth-map"));
    let yaml = [
        service("ns", "web", 8080),
        opaque("users", &[("auth", &file)]),
        opaque("users-map", &[("cy", sha)]),
        opaque("bad", &[("auth", "ann:plaintext\n")]),
        annotated("file", "file.test", &auth("ns/users")),
        annotated("map", "map.test", &map),
        annotated("bad", "bad.test", &auth("bad")),
        annotated("missing", "missing.test", &auth("nobody")),
        annotated("elsewhere", "elsewhere.test", &auth("other/users")),
        annotated("half", "half.test", &[("nginx.ingress.kubernetes.io/auth-secret", "users")]),
    ]
    .concat();
    let t = run(&yaml);
    let action = |host: &str| {
        let vhost = t.snapshot.routing.virtual_hosts.iter().find(|v| v.host == exact(host)).expect("host");
        vhost.routes[0].action.clone()
    };
    let users = |host: &str| -> Vec<String> {
        let auth = action(host).policies.basic_auth.unwrap_or_else(|| panic!("{host} has basic auth"));
        assert_eq!(auth.realm, "Staff");
        auth.users.iter().map(|c| format!("{}:{}", c.user, c.hash.as_str())).collect()
    };
    assert_eq!(users("file.test"), [format!("ann:{sha}"), "bob:$apr1$lZL6V/ci$PR6QJXkRFUzdUuaYcwrI//".into()]);
    assert_eq!(users("map.test"), [format!("cy:{sha}")]);
    assert!(status(&t, "Ingress", "ns", "file").problems.is_empty());
    for (name, reason, field) in [
        ("bad", Reason::Invalid, "nginx.ingress.kubernetes.io/auth-secret"),
        ("missing", Reason::SecretNotFound, "nginx.ingress.kubernetes.io/auth-secret"),
        ("elsewhere", Reason::Invalid, "nginx.ingress.kubernetes.io/auth-secret"),
        ("half", Reason::Invalid, "nginx.ingress.kubernetes.io/auth-secret"),
    ] {
        let refusal = action(&format!("{name}.test")).refusal.unwrap_or_else(|| panic!("{name} is refused"));
        assert_eq!(refusal.status, 503, "{name}");
        assert_eq!(
            problem_fields(status(&t, "Ingress", "ns", name), reason),
            [format!("metadata.annotations[{field:?}]")],
            "{name}"
        );
    }
    let bad = status(&t, "Ingress", "ns", "bad");
    assert!(bad.problems[0].message.contains("line 1"), "the line is named: {:?}", bad.problems);
}

/// `service-upstream: "true"`: the route's backend is the Service's cluster IP and port, one
/// endpoint kube-proxy balances; a headless Service keeps its endpoints, with a warning.
#[test]
fn service_upstream_sends_to_the_cluster_ip() {
    let annotated = |name: &str, service: &str| {
        ingress("ns", name, &rules(&[rule(Some(&format!("{name}.test")), &[("Prefix", "/", service)])])).replace(
            &format!("name: {name}, namespace: ns}}"),
            &format!(
                "name: {name}, namespace: ns, annotations: {{nginx.ingress.kubernetes.io/service-upstream: \"true\"}}}}"
            ),
        )
    };
    let with_ip = service("ns", "web", 8080).replace("spec:\n  ports:", "spec:\n  clusterIP: 10.96.0.7\n  ports:");
    let headless = service("ns", "db", 8081).replace("spec:\n  ports:", "spec:\n  clusterIP: None\n  ports:");
    let t = run(&format!("{with_ip}{headless}{}{}", annotated("web", "web"), annotated("db", "db")));
    let web = routes(&t, &exact("web.test"));
    assert_eq!(web[0].2, "ns/web:80#service");
    let endpoints = &t.snapshot.endpoints[&tidegate_snapshot::BackendId("ns/web:80#service".into())];
    assert_eq!(endpoints, &vec![Endpoint { address: "10.96.0.7".into(), port: 80 }]);
    assert_eq!(routes(&t, &exact("db.test"))[0].2, "ns/db:80", "headless: its endpoints");
    let db = status(&t, "Ingress", "ns", "db");
    assert!(db.problems.iter().any(|p| p.message.contains("no cluster IP")), "{:?}", db.problems);
}

/// Only ready endpoints take traffic; when none is ready, the terminating ones that still
/// serve do (kube-proxy's rule), and ones neither ready nor serving never do.
#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let slice = |conditions: &[(&str, &str)]| {
        let mut out = String::from(
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec:\n  ports: [{name: http, port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: ns\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n",
        );
        for (address, condition) in conditions {
            out.push_str(&format!("- addresses: [{address}]\n  conditions: {condition}\n"));
        }
        out
    };
    let endpoints = |yaml: String| {
        let ingress = ingress("ns", "i", &rules(&[rule(Some("a.test"), &[("Prefix", "/", "web")])]));
        let t = run(&format!("{yaml}{ingress}"));
        let id = tidegate_snapshot::BackendId("ns/web:80".into());
        t.snapshot.endpoints.get(&id).cloned().unwrap_or_default().into_iter().map(|e| e.address).collect::<Vec<_>>()
    };
    let draining = "{ready: false, serving: true, terminating: true}";
    let gone = "{ready: false, serving: false, terminating: true}";
    assert_eq!(endpoints(slice(&[("10.0.0.1", "{ready: true}"), ("10.0.0.2", draining)])), vec!["10.0.0.1"]);
    assert_eq!(endpoints(slice(&[("10.0.0.2", draining), ("10.0.0.3", gone)])), vec!["10.0.0.2"]);
    assert!(endpoints(slice(&[("10.0.0.3", gone)])).is_empty());
}

/// A LuaRoute's backend takes ingress-nginx's backend keys as typed fields: protocol, TLS,
/// balance, affinity and retries, read by the annotations' own parsers; a value that cannot
/// be honoured closes the route (503) and names its field.
#[test]
fn lua_route_backends_take_typed_upstream_settings() {
    let yaml = r#"
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  routes:
  - name: grpc
    match: {path: {type: Prefix, value: /grpc}}
    backend:
      service: {name: web, port: {number: 80}}
      upstream:
        protocol: GRPC
        loadBalance: ewma
        affinity: {cookieName: route, mode: persistent}
        retries: {on: [error, http_502], tries: 2}
  - name: verified
    match: {path: {type: Prefix, value: /verified}}
    backend:
      service: {name: web, port: {number: 80}}
      upstream: {protocol: HTTPS, tls: {verify: true}}
"#;
    let t = run(&format!("{yaml}{}", service("shop", "web", 9000)));
    let vhost = &t.snapshot.routing.virtual_hosts[0];
    let route = |name: &str| vhost.routes.iter().find(|r| r.name.ends_with(name)).expect("route");
    let grpc = &route("/grpc").action;
    assert_eq!(grpc.upstream.protocol, tidegate_snapshot::UpstreamProtocol::H2c);
    assert_eq!(grpc.upstream.balance, tidegate_snapshot::Balance::Ewma);
    let affinity = grpc.upstream.affinity.as_ref().expect("affinity");
    assert_eq!(
        (affinity.cookie.as_str(), affinity.persistent, affinity.path.as_deref()),
        ("route", true, Some("/grpc"))
    );
    assert_eq!((grpc.upstream.retry.on_statuses.clone(), grpc.upstream.retry.tries), (vec![502], 2));
    assert!(grpc.refusal.is_none());
    let verified = &route("/verified").action;
    assert_eq!(verified.refusal.as_ref().map(|r| r.status), Some(503), "verification without a CA: closed");
    let s = status(&t, "LuaRoute", "shop", "api");
    let fields: Vec<&str> = s.problems.iter().map(|p| p.field.as_str()).collect();
    assert!(fields.contains(&"spec.routes[1].backend.upstream.tls.verify"), "{fields:?}");
}

/// The controller's global external auth reaches LuaRoutes too, unless a route sets its own
/// `externalAuth` or turns it off (`policies.globalAuth: false`).
#[test]
fn global_auth_applies_to_lua_routes() {
    let yaml = r#"
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  routes:
  - name: guarded
    match: {path: {type: Prefix, value: /guarded}}
    lua: {content: "ngx.say('x')"}
  - name: public
    match: {path: {type: Prefix, value: /public}}
    lua: {content: "ngx.say('x')"}
    policies: {globalAuth: false}
"#;
    let global = annotations::global_auth(&[("auth-url", "http://auth.internal/check")]).expect("reads");
    let options = Options { global_auth: global, ..Options::default() };
    let t = translate(&inputs_with(yaml, options));
    let vhost = &t.snapshot.routing.virtual_hosts[0];
    let auth = |name: &str| {
        vhost.routes.iter().find(|r| r.name.ends_with(name)).expect("route").action.policies.external_auth.is_some()
    };
    assert!(auth("/guarded"), "global auth applies");
    assert!(!auth("/public"), "turned off by the route");
}

/// A LuaRoute's `externalAuth` takes the cache and the auth request's headers as typed fields
/// (`cacheKey`, `cacheDuration`, `proxySetHeaders`), read by the annotations' parsers; a
/// ConfigMap it names that is missing closes the route, naming the field.
#[test]
fn lua_route_external_auth_cache_and_headers() {
    let route = |headers: &str| {
        format!(
            r#"
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com]
  policies:
    externalAuth:
      url: http://auth.internal/check
      cacheKey: $remote_user$http_authorization
      cacheDuration: 200 10m
      proxySetHeaders: {headers}
  routes:
  - name: all
    match: {{path: {{type: Prefix, value: /}}}}
    lua: {{content: "ngx.say('x')"}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: auth-headers, namespace: shop}}
data: {{X-Client: $remote_addr}}
"#
        )
    };
    let t = run(&route("auth-headers"));
    let action = &t.snapshot.routing.virtual_hosts[0].routes[0].action;
    let auth = action.policies.external_auth.as_ref().expect("external auth");
    let cache = auth.cache.as_ref().expect("cache");
    assert_eq!(cache.key.as_str(), "$remote_user$http_authorization");
    assert_eq!((cache.durations[0].statuses.as_slice(), cache.durations[0].seconds), (&[200][..], 600));
    assert_eq!(auth.set_headers.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["x-client"]);
    assert!(action.refusal.is_none());

    let t = run(&route("missing"));
    let action = &t.snapshot.routing.virtual_hosts[0].routes[0].action;
    assert!(action.refusal.is_some(), "closed, not served without the headers");
    assert_eq!(
        problem_fields(&t.statuses[0], Reason::ConfigMapNotFound),
        vec!["spec.policies.externalAuth.proxySetHeaders"]
    );
}

/// ingress-nginx's regular-expression paths: once an Ingress for a host sets `use-regex` (or
/// `rewrite-target`), every Ingress path of that host is an expression, whichever Ingress
/// defines it, tried longest first; `?` is allowed in them; an expression that does not compile
/// is a field error for that path alone.
#[test]
fn regex_paths_take_a_whole_host() {
    let annotated = |name: &str, annotations: &str, paths: &[(&str, &str, &str)]| {
        ingress("ns", name, &rules(&[rule(Some("r.test"), paths)])).replacen(
            "namespace: ns}",
            &format!("namespace: ns, annotations: {{{annotations}}}}}"),
            1,
        )
    };
    let yaml = [
        annotated(
            "a",
            "nginx.ingress.kubernetes.io/use-regex: \"true\"",
            &[("ImplementationSpecific", "/api/v[0-9]+", "api")],
        ),
        ingress(
            "ns",
            "b",
            &rules(&[rule(Some("r.test"), &[("Prefix", "/orders/?(.*)", "orders"), ("Exact", "/x", "x")])]),
        ),
        annotated("c", "tidegate.dev/rewrite-target: /$1", &[("Prefix", "/bad(", "bad"), ("Prefix", "/ok/(.*)", "ok")]),
        ingress("ns", "d", &rules(&[rule(Some("plain.test"), &[("Prefix", "/api/v[0-9]+", "api")])])),
    ]
    .concat();
    let t = run(&yaml);
    assert_eq!(
        routes(&t, &HostMatch::Exact("r.test".into())),
        vec![
            (PathKind::Regex, "/orders/?(.*)".into(), "ns/orders:80".into()),
            (PathKind::Regex, "/api/v[0-9]+".into(), "ns/api:80".into()),
            (PathKind::Regex, "/ok/(.*)".into(), "ns/ok:80".into()),
            (PathKind::Regex, "/x".into(), "ns/x:80".into()),
        ],
        "longest first, Exact too"
    );
    assert_eq!(routes(&t, &HostMatch::Exact("plain.test".into()))[0].0, PathKind::Prefix, "other hosts keep theirs");
    let c = t.statuses.iter().find(|s| s.object.name == "c").expect("c");
    assert_eq!(problem_fields(c, Reason::Invalid), vec!["spec.rules[0].http.paths[0].path"]);
    assert!(c.accepted, "its other path serves");
    let b = t.statuses.iter().find(|s| s.object.name == "b").expect("b");
    assert!(problem_fields(b, Reason::Invalid).is_empty(), "'?' is part of an expression: {:?}", b.problems);
}
