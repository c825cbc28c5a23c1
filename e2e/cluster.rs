//! End-to-end against a real cluster with the chart installed (`e2e/kind.sh` makes one).
//!
//! Skips with one line when `KUBECONFIG` (or `~/.kube/config`) reaches no API server, or when
//! tidegate is not installed there. Settings:
//! - `TIDEGATE_E2E_IMAGE`: the image the chart runs (the echo upstream uses it too);
//! - `TIDEGATE_E2E_HTTP`: where the proxy Service answers from this host (loopback; kind maps
//!   a NodePort there), default `127.0.0.1:18080`.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

const CLASS: &str = "tidegate";

fn skip(why: &str) {
    eprintln!("skipped: {why}");
}

async fn cluster() -> Option<Client> {
    let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(5), Client::try_default()).await else {
        skip("no Kubernetes cluster reachable (KUBECONFIG); e2e/kind.sh creates one");
        return None;
    };
    if !matches!(tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await, Ok(Ok(_))) {
        skip("the cluster in KUBECONFIG does not answer");
        return None;
    }
    if Api::<IngressClass>::all(client.clone()).get_opt(CLASS).await.ok().flatten().is_none() {
        skip("tidegate is not installed in this cluster (no IngressClass tidegate); e2e/kind.sh installs it");
        return None;
    }
    Some(client)
}

fn from(value: Value) -> DynamicObject {
    serde_json::from_value(value).expect("object")
}

async fn get(host: &str, path: &str) -> Option<(u16, String)> {
    let addr = std::env::var("TIDEGATE_E2E_HTTP").unwrap_or_else(|_| "127.0.0.1:18080".into());
    let stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&addr)).await.ok()?.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .ok()?;
    tokio::spawn(connection);
    let request = http::Request::get(path).header("host", host).body(http_body_util::Empty::new()).ok()?;
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request)).await.ok()?.ok()?;
    let status = response.status().as_u16();
    use http_body_util::BodyExt;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

fn condition(object: &DynamicObject, kind: &str) -> Option<Value> {
    object.data["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == kind).cloned()
}

#[tokio::test]
async fn routes_statuses_and_lua_on_a_real_cluster() {
    let Some(client) = cluster().await else { return };
    let ns = format!("tidegate-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"))
        .await
        .expect("namespace");
    let image = std::env::var("TIDEGATE_E2E_IMAGE").unwrap_or_else(|_| "ghcr.io/tidegate/tidegate:0.1.0".into());

    // An echo upstream: the tidegate image's own `echo` subcommand.
    let labels = json!({"app": "web"});
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "web", "image": image, "imagePullPolicy": "IfNotPresent",
                "args": ["echo", "--listen", "0.0.0.0:8080", "--service", "web", "--namespace", ns],
                "ports": [{"containerPort": 8080}]}]}}}
    }))
    .expect("deployment");
    Api::<Deployment>::namespaced(client.clone(), &ns).create(&PostParams::default(), &deployment).await.expect("web");
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .expect("service");
    Api::<Service>::namespaced(client.clone(), &ns).create(&PostParams::default(), &service).await.expect("web svc");

    // An Ingress: served, and its status says where.
    let host = format!("{ns}.e2e.test");
    let ingress: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"ingressClassName": CLASS, "rules": [{"host": host, "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}
    }))
    .expect("ingress");
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &ns);
    let created = Instant::now();
    ingresses.create(&PostParams::default(), &ingress).await.expect("ingress");
    let served = until("the Ingress served", Duration::from_secs(120), async || {
        get(&host, "/").await.is_some_and(|(status, body)| status == 200 && body.contains("\"service\":\"web\""))
    })
    .await;
    eprintln!("e2e: Ingress served {served:?} after creation (includes the upstream pod starting)");
    until("the Ingress status", Duration::from_secs(60), async || {
        let ingress = ingresses.get("web").await.expect("get");
        ingress.status.and_then(|s| s.load_balancer).and_then(|l| l.ingress).is_some_and(|i| !i.is_empty())
    })
    .await;

    // A LuaRoute, then one that does not compile.
    let gvk = GroupVersionKind::gvk("tidegate.dev", "v1alpha1", "LuaRoute");
    let lua: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ApiResource::from_gvk(&gvk));
    let route = |name: &str, host: &str, content: &str| {
        from(json!({"apiVersion": "tidegate.dev/v1alpha1", "kind": "LuaRoute", "metadata": {"name": name},
            "spec": {"hosts": [host], "routes": [{"name": "main", "match": {"path": {"type": "Prefix", "value": "/"}},
                "lua": {"content": content}}]}}))
    };
    let lua_host = format!("lua.{host}");
    let changed = Instant::now();
    lua.create(&PostParams::default(), &route("hello", &lua_host, "ngx.say('hello from lua')"))
        .await
        .expect("LuaRoute");
    until("the LuaRoute served", Duration::from_secs(30), async || {
        get(&lua_host, "/").await.is_some_and(|(status, body)| status == 200 && body == "hello from lua\n")
    })
    .await;
    eprintln!("e2e: LuaRoute served {:?} after creation", changed.elapsed());
    until("Accepted and Programmed", Duration::from_secs(30), async || {
        let route = lua.get("hello").await.expect("get");
        condition(&route, "Accepted").is_some_and(|c| c["status"] == "True")
            && condition(&route, "Programmed").is_some_and(|c| c["status"] == "True")
    })
    .await;
    lua.create(&PostParams::default(), &route("broken", &format!("broken.{host}"), "local x = = 1"))
        .await
        .expect("broken");
    until("Accepted=False LuaSyntaxError", Duration::from_secs(30), async || {
        let route = lua.get("broken").await.expect("get");
        condition(&route, "Accepted").is_some_and(|c| c["status"] == "False" && c["reason"] == "LuaSyntaxError")
    })
    .await;
    assert!(get(&lua_host, "/").await.is_some_and(|(status, _)| status == 200), "other routes keep serving");

    // Deleted: gone from the proxies.
    ingresses.delete("web", &DeleteParams::default()).await.expect("delete");
    until("the Ingress gone", Duration::from_secs(30), async || get(&host, "/").await.is_some_and(|(s, _)| s == 404))
        .await;
    eprintln!("e2e: whole scenario in {:?}; deleting namespace {ns}", created.elapsed());
    namespaces.delete(&ns, &DeleteParams::default()).await.expect("delete namespace");
}
