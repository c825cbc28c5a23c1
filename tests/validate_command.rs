//! `tidegate validate`: offline checks with messages naming file, document, object and field.

use std::process::Command;

fn validate(files: &[&std::path::Path]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tidegate")).arg("validate").args(files).output().expect("runs");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn the_shipped_examples_validate() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> =
        std::fs::read_dir(&examples).expect("examples").filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    let refs: Vec<&std::path::Path> = files.iter().map(std::path::PathBuf::as_path).collect();
    let (ok, out) = validate(&refs);
    assert!(ok, "{out}");
}

#[test]
fn problems_name_their_file_object_and_field() {
    let dir = tempfile::tempdir().expect("dir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: broken, namespace: shop}\nspec:\n  ingressClassName: tidegate\n  rules:\n  - host: a.com\n    http:\n      paths:\n      - {path: /, pathType: Regex, backend: {service: {name: ok, port: {number: 80}}}}\n",
    )
    .expect("write");
    let (ok, out) = validate(&[&bad]);
    assert!(!ok);
    assert!(out.contains("Ingress shop/broken: field spec.rules[0].http.paths[0].pathType"), "{out}");

    let unparsable = dir.path().join("unparsable.yaml");
    std::fs::write(&unparsable, "kind: [").expect("write");
    let (ok, out) = validate(&[&unparsable]);
    assert!(!ok);
    assert!(out.contains("unparsable.yaml") && out.contains("not valid YAML"), "{out}");
}

#[test]
fn lua_that_does_not_compile_is_reported_with_its_line() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("lua.yaml");
    std::fs::write(
        &file,
        "apiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: api, namespace: shop}\nspec:\n  routes:\n  - name: r\n    match: {path: {type: Prefix, value: /}}\n    lua:\n      content: |\n        ngx.say('ok')\n        if then\n",
    )
    .expect("write");
    let (ok, out) = validate(&[&file]);
    assert!(!ok);
    assert!(out.contains("LuaRoute shop/api: field spec.routes[0].lua.content: line 2:"), "{out}");
}

/// A LuaRoute whose backend Service is in the cluster, not in the file: a warning, exit 0; with
/// `--strict`, an error, exit 1. A Service that is in the files but lacks the port stays an
/// error either way.
#[test]
fn references_outside_the_files_are_warnings_unless_strict() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("route.yaml");
    std::fs::write(
        &file,
        "apiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: api, namespace: shop}\nspec:\n  hosts: [api.shop.example]\n  routes:\n  - name: r\n    match: {path: {type: Prefix, value: /}}\n    backend: {service: {name: web, port: {number: 80}}}\n",
    )
    .expect("write");
    let (ok, out) = validate(&[&file]);
    assert!(ok, "{out}");
    assert!(out.contains("Service shop/web not found") && out.contains("--strict"), "{out}");
    let output =
        Command::new(env!("CARGO_BIN_EXE_tidegate")).args(["validate", "--strict"]).arg(&file).output().expect("runs");
    assert!(!output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));

    let service = dir.path().join("service.yaml");
    std::fs::write(
        &service,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{port: 8080}]\n",
    )
    .expect("write");
    let (ok, out) = validate(&[&file, &service]);
    assert!(!ok && out.contains("has no port 80"), "{out}");
}
