//! The CustomResourceDefinition in `crds/` is the one the code generates, and its schema
//! rejects what it should, checked the way the API server checks a structural schema.

use std::path::PathBuf;

use kube::CustomResourceExt;
use serde_json::Value;
use tidegate_controller::luaroute::{LuaRouteResource, crd_yaml};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_committed_crds_are_the_generated_one() {
    // The chart carries its own copy: Helm installs CRDs from the chart's `crds/` folder.
    for copy in ["crds/luaroute.yaml", "charts/tidegate/crds/luaroute.yaml"] {
        let path = repo().join(copy);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == crd_yaml(),
            "{} differs from what the code generates; regenerate it with `cargo run -- crd > {copy}`",
            path.display()
        );
    }
}

fn schema() -> Value {
    let crd = serde_json::to_value(LuaRouteResource::crd()).expect("crd");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// What the API server would say about `object` (an empty list: accepted).
fn problems(yaml: &str) -> Vec<String> {
    let object: Value = serde_saphyr::from_str(yaml).expect("test YAML");
    let mut errors = Vec::new();
    check(&schema(), &object, "", &mut errors);
    errors
}

/// The OpenAPI v3 subset of structural schemas: types, `nullable`, `required`, `properties`
/// (unknown fields rejected, as strict field validation does), `items`, `enum`, `pattern`,
/// lengths and ranges.
fn check(schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let mut fail = |why: String| errors.push(format!("{}: {why}", if at.is_empty() { "<root>" } else { at }));
    if value.is_null() {
        if schema["nullable"] != Value::Bool(true) && schema.get("type").is_some() {
            fail("must not be null".into());
        }
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        fail(format!("{value} is not one of {allowed:?}"));
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(map) = value.as_object() else { return fail(format!("{value} is not an object")) };
            for name in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !map.contains_key(name) {
                    fail(format!("{name} is required"));
                }
            }
            let properties = schema["properties"].as_object();
            for (name, field) in map {
                // The API server checks these itself; a CRD's schema leaves them out.
                if at.is_empty() && ["apiVersion", "kind", "metadata"].contains(&name.as_str()) {
                    continue;
                }
                let path = if at.is_empty() { name.clone() } else { format!("{at}.{name}") };
                match (properties.and_then(|p| p.get(name)), schema.get("additionalProperties")) {
                    (Some(sub), _) => check(sub, field, &path, errors),
                    (None, Some(sub)) if sub.is_object() => check(sub, field, &path, errors),
                    // Kept for the controller to judge (a misspelt Lua phase).
                    (None, _) if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true) => {}
                    (None, _) if properties.is_some() => errors.push(format!("{path}: unknown field")),
                    (None, _) => {}
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else { return fail(format!("{value} is not an array")) };
            for (i, item) in items.iter().enumerate() {
                check(&schema["items"], item, &format!("{at}[{i}]"), errors);
            }
        }
        Some("string") => {
            let Some(s) = value.as_str() else { return fail(format!("{value} is not a string")) };
            if let Some(pattern) = schema["pattern"].as_str()
                && !regex::Regex::new(pattern).expect("schema pattern").is_match(s)
            {
                fail(format!("{s:?} does not match {pattern}"));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && (s.chars().count() as u64) < min
            {
                fail(format!("shorter than {min}"));
            }
        }
        Some("integer") => {
            let Some(n) = value.as_i64() else { return fail(format!("{value} is not an integer")) };
            #[allow(clippy::cast_precision_loss)]
            let n = n as f64;
            if schema["minimum"].as_f64().is_some_and(|min| n < min)
                || schema["maximum"].as_f64().is_some_and(|max| n > max)
            {
                fail(format!("{n} is out of range"));
            }
        }
        Some("boolean") if !value.is_boolean() => fail(format!("{value} is not a boolean")),
        _ => {}
    }
}

const GOOD: &str = r#"
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: { name: api, namespace: shop }
spec:
  hosts: ["api.example.com"]
  tls: { secretName: api-tls }
  sharedDicts: [{ name: cache, size: 10Mi }]
  cpuBudget: 50ms
  lua:
    access: |
      if not ngx.var.http_authorization then return ngx.exit(401) end
  routes:
    - name: v1
      match:
        path: { type: Prefix, value: /v1 }
        methods: [GET, POST]
        headers: [{ name: x-canary, value: "1" }]
      backend: { service: { name: api, port: { number: 80 } } }
"#;

#[test]
fn the_schema_accepts_the_shipped_examples_and_the_design_shape() {
    assert_eq!(problems(GOOD), Vec::<String>::new());
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("examples")).expect("examples") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("example");
        for document in text.split("\n---") {
            if document.contains("kind: LuaRoute") {
                seen += 1;
                assert_eq!(problems(document), Vec::<String>::new(), "{}", path.display());
            }
        }
    }
    assert!(seen >= 2, "the examples hold LuaRoutes");
}

/// An unknown Lua phase passes the schema, so that the API server keeps it rather than prune
/// it (which would serve the route without that handler); the controller refuses it.
#[test]
fn an_unknown_lua_phase_is_kept_for_the_controller() {
    let yaml = GOOD.replacen("    access: |", "    acess: |", 1);
    assert_eq!(problems(&yaml), Vec::<String>::new());
    let (_, errors) = tidegate_controller::manifests::parse_str(&yaml);
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(messages.iter().any(|m| m.contains("spec.lua.acess")), "{messages:?}");
}

#[test]
fn the_schema_rejects_what_a_schema_can() {
    let cases = [
        ("type: Prefix, value: /v1", "type: Regex, value: /v1", "spec.routes[0].match.path.type"),
        ("type: Prefix, value: /v1", "type: Prefix, value: v1", "spec.routes[0].match.path.value"),
        ("number: 80", "number: 70000", "spec.routes[0].backend.service.port.number"),
        ("number: 80", "number: 0", "spec.routes[0].backend.service.port.number"),
        ("size: 10Mi", "size: 10MB", "spec.sharedDicts[0].size"),
        ("name: cache,", "name: my-cache,", "spec.sharedDicts[0].name"),
        ("cpuBudget: 50ms", "cpuBudget: 5 minutes", "spec.cpuBudget"),
        ("- name: v1", "- name: \"\"", "spec.routes[0].name"),
        ("  hosts:", "  hostnames:", "spec.hostnames"),
    ];
    for (good, bad, field) in cases {
        assert!(GOOD.contains(good), "{good}");
        let errors = problems(&GOOD.replacen(good, bad, 1));
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{field}:"))),
            "{bad}: expected a problem at {field}, got {errors:?}"
        );
    }
}
