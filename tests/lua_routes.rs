//! Lua through the real proxy: LuaRoutes that answer, guard and filter, and a sandbox that keeps
//! a tenant's runaway or hostile Lua to its own request.

mod support;

use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use support::{
    Body, Tidegate, echo, echoed_headers, get, get_request, h2c, manifest_dir, service_yaml, write_manifest,
};

/// A LuaRoute on `host` with one route per (name, path, lua phase, source); `backend` names the
/// Service `web` when true.
fn lua_route(name: &str, host: &str, budget: Option<&str>, routes: &[(&str, &str, &str, &str, bool)]) -> String {
    let budget = budget.map_or(String::new(), |b| format!("  cpuBudget: {b}\n"));
    let mut out = format!(
        "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  hosts: [{host}]\n{budget}  routes:\n"
    );
    for (route, path, phase, source, backend) in routes {
        out.push_str(&format!("  - name: {route}\n    match: {{path: {{type: Prefix, value: {path}}}}}\n"));
        if *backend {
            out.push_str("    backend: {service: {name: web, port: {number: 80}}}\n");
        }
        out.push_str(&format!("    lua:\n      {phase}: |\n"));
        for line in source.lines() {
            out.push_str(&format!("        {line}\n"));
        }
    }
    out
}

async fn start(manifests: &str) -> (Tidegate, tempfile::TempDir) {
    let dir = manifest_dir();
    let web = echo("t", "web").await;
    write_manifest(dir.path(), "all.yaml", &format!("{}{manifests}", service_yaml("t", "web", 80, "http", &[web])));
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &["--lua-cpu-budget-ms", "100"]))
        .await
        .expect("start");
    (tidegate, dir)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

const HOSTILE: &[(&str, &str)] = &[
    ("loop", "while true do end"),
    ("pcall-loop", "while true do pcall(function() while true do end end) end"),
    ("wrap-loop", "local f = coroutine.wrap(function() while true do end end) f() while true do end"),
    (
        "pattern",
        "local s = string.rep('a', 40) pcall(string.find, s, string.rep('a?', 40) .. string.rep('a', 40) .. 'b') ngx.say('unreachable')",
    ),
    ("sort", "local t = {} for i = 1, 3e6 do t[i] = (i * 7919) % 3e6 end table.sort(t) ngx.say('sorted')"),
    ("big-string", "local s = string.rep('x', 2^30) ngx.say(#s)"),
    ("growing-table", "local t = {} for i = 1, 1e9 do t[i] = i end"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_lua_fails_its_own_request_only() {
    let mut manifests = String::new();
    for (name, src) in HOSTILE {
        // Each hostile handler guards a real backend: a failure must never reach it.
        let path = format!("/{name}");
        manifests.push_str(&lua_route(name, "sandbox.test", None, &[(name, &path, "access", src, true)]));
    }
    manifests.push_str(&lua_route(
        "fine",
        "sandbox.test",
        None,
        &[("fine", "/fine", "content", "ngx.say('fine')", false)],
    ));
    let (tidegate, _dir) = start(&manifests).await;
    let rss_before = rss_kib(tidegate.pid());

    for (name, _) in HOSTILE {
        let started = Instant::now();
        let answer = get(tidegate.http, "sandbox.test", &format!("/{name}")).await.expect("answer");
        let took = started.elapsed();
        assert_eq!(
            answer.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{name} fails closed (never reaches the upstream)"
        );
        assert!(String::from_utf8_lossy(&answer.body).contains("500 Internal Server Error"));
        let memory_case = name.starts_with("big") || name.starts_with("growing");
        if !memory_case {
            assert!(took < Duration::from_millis(400), "{name}: stopped after {took:?} with a 100 ms budget");
        }
        // Both workers answer normally right after.
        for _ in 0..4 {
            let next = get(tidegate.http, "sandbox.test", "/fine").await.expect("answer");
            assert_eq!(
                (next.status, String::from_utf8_lossy(&next.body).into_owned()),
                (StatusCode::OK, "fine\n".into()),
                "after {name}"
            );
        }
    }
    let rss_after = rss_kib(tidegate.pid());
    // Two workers, each VM capped at 128 MiB; RSS may grow by what the VMs hold, not without bound.
    assert!(rss_after < rss_before + 300 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");

    let metrics = support::admin_get(tidegate.admin, "/metrics").expect("metrics");
    assert!(
        metrics.contains("tidegate_lua_errors_total{route=\"t/loop/loop\",phase=\"access\",kind=\"timeout\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("kind=\"memory\""), "{metrics}");
    let logged = tidegate.problems_mentioning("t/loop/loop");
    assert!(logged.iter().any(|l| l.contains("\"phase\":\"access\"") && l.contains("timeout")), "{logged:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_a_request_writes_leaks_into_the_next() {
    let writers = [
        ("global", "leak = 'from a previous request'"),
        ("string-upper", "pcall(function() string.upper = function() return 'pwned' end end)"),
        ("string-meta", "pcall(function() getmetatable('').__index = { upper = function() return 'pwned' end } end)"),
        ("ngx-say", "pcall(function() ngx.say = function() end end)"),
        ("ngx-field", "pcall(function() ngx.evil = true end)"),
    ];
    let mut manifests = String::new();
    for (name, src) in writers {
        let path = format!("/{name}");
        manifests.push_str(&lua_route(
            name,
            "leak.test",
            None,
            &[(name, &path, "content", &format!("{src}\nngx.say('wrote')"), false)],
        ));
    }
    let reader = "ngx.say(tostring(leak), ' ', string.upper('ok'), ' ', tostring(ngx.evil))";
    manifests.push_str(&lua_route("reader", "leak.test", None, &[("reader", "/reader", "content", reader, false)]));
    let (tidegate, _dir) = start(&manifests).await;
    for (name, _) in writers {
        let wrote = get(tidegate.http, "leak.test", &format!("/{name}")).await.expect("answer");
        assert_eq!(wrote.status, StatusCode::OK, "{name}: {:?}", String::from_utf8_lossy(&wrote.body));
        for _ in 0..4 {
            let read = get(tidegate.http, "leak.test", "/reader").await.expect("answer");
            assert_eq!(String::from_utf8_lossy(&read.body), "nil OK nil\n", "after {name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phases_run_in_order_around_the_upstream() {
    let guard = "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: guard, namespace: t}\nspec:\n  lua:\n    rewrite: ngx.ctx.seen = 'rewrite'\n    access: |\n      ngx.req.read_body()\n      local args = ngx.req.get_post_args()\n      if args.key ~= 'ok' then return ngx.exit(403) end\n      ngx.req.set_header('X-Seen', ngx.ctx.seen .. ',access')\n    headerFilter: |\n      ngx.header['X-Upstream-Status'] = ngx.status\n      ngx.header['X-Phases'] = ngx.ctx.seen\n    bodyFilter: ngx.arg[1] = string.upper(ngx.arg[1])\n    log: ngx.log(ngx.WARN, 'logged ', ngx.var.request_uri, ' status ', ngx.var.status, ' sent ', ngx.var.bytes_sent)\n";
    let ingress = "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: app\n  namespace: t\n  annotations: {tidegate.dev/lua-route: guard}\nspec:\n  ingressClassName: tidegate\n  rules:\n  - host: app.test\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}\n";
    let (tidegate, _dir) = start(&format!("{guard}{ingress}")).await;

    let post = |body: &'static str| {
        Request::post("/submit")
            .header("host", "app.test")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .expect("request")
    };
    let mut conn = support::H1::connect(tidegate.http).await.expect("connect");
    let denied = conn.send(post("key=no")).await.expect("answer");
    assert_eq!(denied.status, StatusCode::FORBIDDEN);

    let allowed = conn.send(post("key=ok&x=1")).await.expect("answer");
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(allowed.headers["x-upstream-status"], "200");
    assert_eq!(allowed.headers["x-phases"], "rewrite");
    assert!(!allowed.headers.contains_key("content-length"), "a body filter may change the length");
    let text = String::from_utf8_lossy(&allowed.body).into_owned();
    assert!(
        text.contains("\"X-SEEN\":[\"REWRITE,ACCESS\"]"),
        "the upstream saw the header, the body filter upper-cased the body: {text}"
    );
    assert!(text.contains("\"BODY_LENGTH\":10"), "the body read by Lua still reaches the upstream: {text}");

    // The log phase runs after the response, with what was sent.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tidegate.problems_mentioning("logged /submit status 200").is_empty() {
        assert!(Instant::now() < deadline, "log phase line missing:\n{}", tidegate.logs().join("\n"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_from_lua_and_match_methods_and_headers() {
    let route = "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: api, namespace: t}\nspec:\n  hosts: [api.test]\n  routes:\n  - name: canary\n    match: {path: {type: Prefix, value: /v1}, headers: [{name: X-Canary, value: \"1\"}]}\n    lua: {content: \"ngx.say('canary')\"}\n  - name: create\n    match: {path: {type: Prefix, value: /v1}, methods: [POST]}\n    lua: {content: \"ngx.status = 201 ngx.say('created')\"}\n  - name: upstream\n    match: {path: {type: Prefix, value: /v1}}\n    backend: {service: {name: web, port: {number: 80}}}\n";
    let (tidegate, _dir) = start(route).await;
    let canary = Request::get("/v1/x")
        .header("host", "api.test")
        .header("x-canary", "1")
        .body(Body::default())
        .expect("request");
    let answer = support::H1::connect(tidegate.http).await.expect("connect").send(canary).await.expect("answer");
    assert_eq!(String::from_utf8_lossy(&answer.body), "canary\n");
    assert_eq!(answer.headers["content-type"], "text/plain");
    let create = Request::post("/v1/x").header("host", "api.test").body(Body::default()).expect("request");
    let answer = support::H1::connect(tidegate.http).await.expect("connect").send(create).await.expect("answer");
    assert_eq!(
        (answer.status, String::from_utf8_lossy(&answer.body).into_owned()),
        (StatusCode::CREATED, "created\n".into())
    );
    let plain = get(tidegate.http, "api.test", "/v1/x").await.expect("answer");
    assert_eq!(plain.served_by(), "web");
    assert_eq!(echoed_headers(&plain)["Host"], vec!["api.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_that_does_not_compile_is_reported_and_the_rest_serves() {
    let broken = lua_route("broken", "broken.test", None, &[("r", "/", "access", "local a = 1\nif then", true)]);
    let fine = lua_route("fine", "fine.test", None, &[("r", "/", "content", "ngx.say('fine')", false)]);
    let (tidegate, _dir) = start(&format!("{broken}{fine}")).await;
    assert_eq!(get(tidegate.http, "fine.test", "/").await.expect("answer").status, StatusCode::OK);
    assert_eq!(
        get(tidegate.http, "broken.test", "/").await.expect("answer").status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "its routes fail closed: neither served without the Lua nor left to fall through to another route"
    );
    let lines = tidegate.problems_mentioning("LuaRoute t/broken");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("spec.routes[0].lua.access")
            && lines[0].contains("line 2:")
            && lines[0].contains("LuaSyntaxError"),
        "{}",
        lines[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_dict_counts_exactly_across_workers_and_stays_in_its_namespace() {
    let counter = "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: counter, namespace: t}\nspec:\n  hosts: [count.test]\n  sharedDicts: [{name: hits, size: 1Mi}, {name: tiny, size: 8Ki}]\n  routes:\n  - name: incr\n    match: {path: {type: Exact, value: /incr}}\n    lua: {content: \"ngx.say((ngx.shared.hits:incr('n', 1, 0)))\"}\n  - name: read\n    match: {path: {type: Exact, value: /read}}\n    lua: {content: \"ngx.say(ngx.shared.hits:get('n'))\"}\n  - name: fill\n    match: {path: {type: Exact, value: /fill}}\n    lua: {content: \"for i = 1, 200 do ngx.shared.tiny:set('k' .. i, string.rep('v', 100)) end ngx.say(tostring(ngx.shared.tiny:get('k1')))\"}\n";
    let stranger = "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: stranger, namespace: other}\nspec:\n  hosts: [other.test]\n  routes:\n  - name: peek\n    match: {path: {type: Prefix, value: /}}\n    lua: {content: \"ngx.say(tostring(ngx.shared.hits))\"}\n";
    let (tidegate, _dir) = start(&format!("{counter}{stranger}")).await;
    let http = tidegate.http;
    // Two clients, 1,000 requests each, on keep-alive connections the kernel spreads over both workers.
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(tokio::spawn(async move {
            let mut conn = support::H1::connect(http).await.expect("connect");
            for _ in 0..1000 {
                let answer = conn.get("count.test", "/incr").await.expect("answer");
                assert_eq!(answer.status, StatusCode::OK);
            }
        }));
    }
    for client in clients {
        client.await.expect("client");
    }
    let total = get(http, "count.test", "/read").await.expect("answer");
    assert_eq!(String::from_utf8_lossy(&total.body), "2000\n", "one store shared by all workers");
    let peek = get(http, "other.test", "/").await.expect("answer");
    assert_eq!(String::from_utf8_lossy(&peek.body), "nil\n", "another namespace does not see the dict");
    let filled = get(http, "count.test", "/fill").await.expect("answer");
    assert_eq!(String::from_utf8_lossy(&filled.body), "nil\n", "the oldest entries were evicted");
    let metrics = support::admin_get(tidegate.admin, "/metrics").expect("metrics");
    let evictions = metrics
        .lines()
        .find(|l| l.starts_with("tidegate_shared_dict_evictions{") && l.contains("dict=\"tiny\""))
        .expect("evictions metric");
    assert!(!evictions.ends_with(" 0"), "{evictions}");
    assert!(
        metrics.contains("tidegate_shared_dict_capacity_bytes{namespace=\"t\",dict=\"hits\"} 1048576"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_wide_dicts_reach_every_namespace_unless_shadowed() {
    let route = |name: &str, namespace: &str, dicts: &str| {
        format!(
            "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  hosts: [{name}.test]\n  sharedDicts: [{dicts}]\n  routes:\n  - name: incr\n    match: {{path: {{type: Prefix, value: /}}}}\n    lua: {{content: \"ngx.say((ngx.shared.limits:incr('n', 1, 0)))\"}}\n"
        )
    };
    let dir = manifest_dir();
    let manifests =
        route("a", "team-a", "") + &route("b", "team-b", "") + &route("own", "team-c", "{name: limits, size: 64Ki}");
    write_manifest(dir.path(), "all.yaml", &manifests);
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &["--shared-dict", "limits=1Mi"]))
        .await
        .expect("start");
    let body = async |host: &str| {
        String::from_utf8_lossy(&get(tidegate.http, host, "/").await.expect("answer").body).into_owned()
    };
    assert_eq!(body("a.test").await, "1\n");
    assert_eq!(body("b.test").await, "2\n", "one cluster-wide store for every namespace");
    assert_eq!(body("own.test").await, "1\n", "a namespace's own dictionary shadows the cluster-wide one");
    assert_eq!(body("a.test").await, "3\n");
    let metrics = support::admin_get(tidegate.admin, "/metrics").expect("metrics");
    assert!(
        metrics.contains("tidegate_shared_dict_capacity_bytes{namespace=\"\",dict=\"limits\"} 1048576"),
        "{metrics}"
    );
}

/// A line server on loopback: answers each line with `echo: LINE` and keeps what it got.
async fn line_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = std::sync::Arc::clone(&record);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    record.lock().expect("lock").push(line.clone());
                    if write.write_all(format!("echo: {line}\r\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosockets_work_in_content_header_filter_body_filter_and_log() {
    let (port, seen) = line_server().await;
    let call = |what: &str| {
        format!(
            "local sock = ngx.socket.tcp()\n        sock:settimeout(2000)\n        assert(sock:connect('127.0.0.1', {port}))\n        assert(sock:send('{what}\\n'))\n        local line = assert(sock:receive())\n        local reused = sock:getreusedtimes()\n        assert(sock:setkeepalive())\n"
        )
    };
    let routes = format!(
        "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {{name: sockets, namespace: t}}\nspec:\n  hosts: [sockets.test]\n  routes:\n  - name: content\n    match: {{path: {{type: Prefix, value: /line}}}}\n    lua:\n      content: |\n        {}        ngx.say(line, ' reused ', reused)\n  - name: filtered\n    match: {{path: {{type: Prefix, value: /up}}}}\n    backend: {{service: {{name: web, port: {{number: 80}}}}}}\n    lua:\n      headerFilter: |\n        {}        ngx.header['X-Line'] = line\n      bodyFilter: |\n        if ngx.arg[2] then\n          ngx.sleep(0.01)\n          {}          ngx.arg[1] = ngx.arg[1] .. line .. ' reused ' .. reused\n        end\n      log: |\n        {}",
        call("content"),
        call("header"),
        call("body"),
        call("log ' .. ngx.var.status .. '"),
    );
    let (tidegate, _dir) = start(&routes).await;

    let mut conn = support::H1::connect(tidegate.http).await.expect("connect");
    let get = |path: &str| Request::get(path).header("host", "sockets.test").body(Body::default()).expect("request");
    let first = conn.send(get("/line")).await.expect("answer");
    assert_eq!(String::from_utf8_lossy(&first.body), "echo: content reused 0\n");
    let second = conn.send(get("/line")).await.expect("answer");
    assert_eq!(
        String::from_utf8_lossy(&second.body),
        "echo: content reused 1\n",
        "the keep-alive pool of the worker gave the same connection back"
    );

    let filtered = conn.send(get("/up")).await.expect("answer");
    assert_eq!(filtered.status, StatusCode::OK);
    assert_eq!(filtered.headers["x-line"], "echo: header", "header_filter waited on its socket");
    let body = String::from_utf8_lossy(&filtered.body);
    let reused = body.rsplit_once("echo: body reused ").and_then(|(_, n)| n.parse::<u32>().ok());
    assert!(reused.is_some_and(|n| n > 0), "body_filter slept, then used a pooled socket at the end: {body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.lock().expect("lock").iter().any(|l| l == "log 200") {
        assert!(Instant::now() < deadline, "the log handler's line never arrived: {:?}", seen.lock().expect("lock"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tidegate.problems_mentioning("Lua").is_empty(), "{:?}", tidegate.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resty_http_calls_a_real_http_server_and_reuses_its_connection() {
    let api = echo("t", "api").await;
    let port = api.port();
    let content = format!(
        r#"local http = require "resty.http"
        local httpc = http.new()
        httpc:set_timeout(2000)
        local res, err = httpc:request_uri("http://127.0.0.1:{port}/lookup?id=7", {{
          method = "POST", body = "payload", headers = {{ ["X-From-Lua"] = "yes" }},
        }})
        if not res then ngx.status = 502 ngx.say(err) return end
        local seen = require("cjson").decode(res.body)
        local again = http.new()
        assert(again:connect("127.0.0.1", {port}))
        local res2 = assert(again:request({{ path = "/second", query = {{ a = "b c" }} }}))
        local seen2 = require("cjson").decode(assert(res2:read_body()))
        ngx.say(res.status, " ", res.headers["content-type"], " ", res.headers["Content-Type"])
        ngx.say(seen.method, " ", seen.path, "?", seen.query, " ", seen.headers["X-From-Lua"][1], " ", seen.body_length)
        ngx.say(seen2.path, "?", seen2.query, " reused ", again:get_reused_times())
        again:set_keepalive()"#
    );
    let route = lua_route("client", "client.test", None, &[("call", "/call", "content", &content, false)]);
    let (tidegate, _dir) = start(&route).await;
    let answer = get(tidegate.http, "client.test", "/call").await.expect("answer");
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    assert_eq!(answer.status, StatusCode::OK, "{text}");
    assert_eq!(
        text, "200 application/json application/json\nPOST /lookup?id=7 yes 7\n/second?a=b%20c reused 1\n",
        "the request went out as written, the response came back parsed, the keep-alive pool gave the connection back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ngx_resp_set_status_sends_a_reason_phrase() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let content = "local resp = require \"ngx.resp\"\nresp.set_status(500, \"user defined reason\")\nngx.say(\"set\")";
    let route = lua_route("reason", "reason.test", None, &[("r", "/", "content", content, false)]);
    let (tidegate, _dir) = start(&route).await;
    let mut stream = tokio::net::TcpStream::connect(tidegate.http).await.expect("connect");
    stream.write_all(b"GET / HTTP/1.1\r\nHost: reason.test\r\nConnection: close\r\n\r\n").await.expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 500 user defined reason\r\n"), "{answer}");
    assert!(answer.contains("set\n"), "the body follows: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ngx_exit_error_and_444_close_the_connection_without_a_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let route = lua_route(
        "closing",
        "closing.test",
        None,
        &[
            ("error", "/error", "access", "ngx.exit(ngx.ERROR)", true),
            ("nothing", "/444", "content", "ngx.say(\"never sent\")\nngx.exit(444)", false),
            ("fine", "/fine", "content", "ngx.say(\"fine\")", false),
        ],
    );
    let (tidegate, _dir) = start(&route).await;
    for path in ["/error", "/444"] {
        let mut stream = tokio::net::TcpStream::connect(tidegate.http).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: closing.test\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "{path}: the connection was closed");
        assert!(answer.is_empty(), "{path}: nothing is answered, got {:?}", String::from_utf8_lossy(&answer));
    }
    // Over HTTP/2 the stream is reset; the connection carries on.
    let reset = h2c(tidegate.http, get_request("closing.test", "/444")).await;
    assert!(reset.is_err(), "HTTP/2: the stream is reset, got {reset:?}");
    let fine = get(tidegate.http, "closing.test", "/fine").await.expect("a route that answers");
    assert_eq!((fine.status, &fine.body[..]), (StatusCode::OK, &b"fine\n"[..]), "other requests are served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_date_are_tidegates_unless_lua_sets_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let own = "ngx.header.Server = \"custom\"\nngx.header.Date = \"Sun, 06 Dec 2026 00:00:00 GMT\"\nngx.say(\"own\")";
    let route = lua_route(
        "names",
        "names.test",
        None,
        &[("own", "/own", "content", own, false), ("plain", "/", "content", "ngx.say(\"plain\")", false)],
    );
    let (tidegate, _dir) = start(&route).await;
    for (path, server, date) in
        [("/own", Some("custom"), Some("Sun, 06 Dec 2026 00:00:00 GMT")), ("/", Some("tidegate"), None)]
    {
        let mut stream = tokio::net::TcpStream::connect(tidegate.http).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: names.test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read");
        let answer = String::from_utf8_lossy(&answer).to_lowercase();
        let lines = |name: &str| answer.lines().filter(|l| l.starts_with(name)).map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(lines("server:"), [format!("server: {}", server.expect("server"))], "{answer}");
        let dates = lines("date:");
        assert_eq!(dates.len(), 1, "one Date: {answer}");
        if let Some(date) = date {
            assert_eq!(dates[0], format!("date: {}", date.to_lowercase()));
        }
        let h2 = h2c(tidegate.http, get_request("names.test", path)).await.expect("h2c");
        assert_eq!(h2.headers.get_all("server").iter().collect::<Vec<_>>(), [server.expect("server")], "HTTP/2 {path}");
        assert_eq!(h2.headers.get_all("date").iter().count(), 1, "HTTP/2 {path}");
    }
}

/// A ConfigMap of Lua modules (`tidegate.dev/lua-modules: PREFIX`) in `namespace`.
fn modules_yaml(namespace: &str, prefix: &str, modules: &[(&str, &str)]) -> String {
    let mut out = format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: libs, namespace: {namespace}, labels: {{tidegate.dev/lua-modules: {prefix}}}}}\ndata:\n"
    );
    for (key, source) in modules {
        out.push_str(&format!("  {key}: |\n"));
        for line in source.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_modules_keep_per_worker_state_within_their_namespace() {
    // A module-level counter: what OpenResty code uses for per-worker caches.
    let counter = |tag: &str| {
        format!(
            "local _M = {{ name = ..., tag = {tag:?} }}\nlocal hits = 0\nfunction _M.hit() hits = hits + 1 return hits end\nreturn _M"
        )
    };
    let handler = "local c = require \"shop.counter\"\nngx.say(ngx.worker.id(), \" \", c.name, \" \", c.tag, \" \", c.hit(), \" \", tostring(greeting))";
    let route = |namespace: &str, host: &str, init: Option<&str>| {
        let init = init.map_or(String::new(), |i| format!("  init: {i:?}\n"));
        format!(
            "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {{name: r, namespace: {namespace}}}\nspec:\n  hosts: [{host}]\n{init}  routes:\n  - name: r\n    match: {{path: {{type: Prefix, value: /}}}}\n    lua:\n      content: {handler:?}\n"
        )
    };
    let manifests = |tag: &str| {
        format!(
            "{}{}{}{}{}",
            modules_yaml("a", "shop", &[("counter.lua", &counter(tag)), ("broken.lua", "local x = = 1")]),
            modules_yaml("b", "shop", &[("counter.lua", &counter("b"))]),
            route("a", "a.test", Some("greeting = 'set by init'\nrequire('shop.counter').hit()")),
            route("b", "b.test", None),
            route("c", "c.test", None),
        )
    };
    let dir = manifest_dir();
    write_manifest(dir.path(), "all.yaml", &manifests("v1"));
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &[])).await.expect("start");

    // Per worker, one module table whose state lives across requests: each worker's counts go
    // up by one (from 2 in `a`, whose init hit it once).
    type Seen = std::collections::BTreeMap<String, Vec<u32>>;
    let counts =
        |tidegate: &Tidegate, host: &'static str, tag: &'static str, before: Option<Seen>, greeting: &'static str| {
            let addr = tidegate.http;
            async move {
                let mut seen: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
                for _ in 0..12 {
                    let answer = get(addr, host, "/").await.expect("answer");
                    let body = String::from_utf8_lossy(&answer.body).into_owned();
                    assert_eq!(answer.status, StatusCode::OK, "{host}: {body}");
                    let words: Vec<&str> = body.split_whitespace().collect();
                    assert_eq!(&words[1..3], ["shop.counter", tag], "{host}: {body}");
                    assert_eq!(words[4..].join(" "), greeting, "{host}: {body}");
                    seen.entry(words[0].to_owned()).or_default().push(words[3].parse().expect("count"));
                }
                for (worker, hits) in &seen {
                    // From 2 where init hit the counter once; after the requests before, when given.
                    let first = match &before {
                        Some(before) => before.get(worker).and_then(|h| h.last()).map_or(1, |last| last + 1),
                        None if greeting == "nil" => 1,
                        None => 2,
                    };
                    let expected: Vec<u32> = (first..first + u32::try_from(hits.len()).expect("few")).collect();
                    assert_eq!(*hits, expected, "{host}: worker {worker}'s module counts across requests");
                }
                seen
            }
        };
    counts(&tidegate, "a.test", "v1", None, "set by init").await;
    // Namespace b has a module of the same name: its own, starting from 1, and no init globals.
    let b_before = counts(&tidegate, "b.test", "b", None, "nil").await;
    // Namespace c has none: require fails there, naming the module.
    let c = get(tidegate.http, "c.test", "/").await.expect("answer");
    assert_eq!(c.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        tidegate.logged_within("module 'shop.counter' not found", Duration::from_secs(2)),
        "the failure names the module"
    );
    // The module that does not compile is reported with its key and Lua line; the others serve.
    let status = tidegate.status();
    let libs = status["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .find(|o| o["object"]["kind"] == "ConfigMap" && o["object"]["namespace"] == "a")
        .expect("the ConfigMap's status")
        .clone();
    assert_eq!(libs["problems"][0]["reason"], "LuaSyntaxError", "{libs}");
    assert_eq!(libs["problems"][0]["field"], "data[\"broken.lua\"]", "{libs}");
    assert!(libs["problems"][0]["message"].as_str().expect("message").starts_with("line 1:"), "{libs}");

    // A new version of the module applies live, its state anew.
    let before = tidegate.version();
    write_manifest(dir.path(), "all.yaml", &manifests("v2"));
    tidegate.wait_version_after(before);
    counts(&tidegate, "a.test", "v2", None, "set by init").await;
    // b's code did not change: its modules keep their state.
    counts(&tidegate, "b.test", "b", Some(b_before), "nil").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_worker_runs_on_every_worker_for_each_version_and_starts_timers() {
    let route = |version: &str| {
        format!(
            "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {{name: jobs, namespace: jobs}}\nspec:\n  hosts: [jobs.test]\n  sharedDicts: [{{name: d, size: 1Mi}}]\n  init: \"tag = '{version}'\"\n  initWorker: |\n    local d = ngx.shared.d\n    d:incr('workers', 1, 0)\n    d:set('tag', tag .. ' ' .. ngx.get_phase())\n    ngx.timer.every(0.05, function() d:incr('ticks', 1, 0) end)\n  routes:\n  - name: r\n    match: {{path: {{type: Prefix, value: /}}}}\n    lua:\n      content: |\n        local d = ngx.shared.d\n        ngx.say(d:get('workers'), ' ', d:get('tag'), ' ', d:get('ticks') or 0)\n"
        )
    };
    let dir = manifest_dir();
    write_manifest(dir.path(), "jobs.yaml", &route("v1"));
    let path = dir.path().to_owned();
    let tidegate =
        tokio::task::spawn_blocking(move || Tidegate::start(&path, &["--workers", "2"])).await.expect("start");
    let read = |tidegate: &Tidegate| {
        let addr = tidegate.http;
        async move {
            let answer = get(addr, "jobs.test", "/").await.expect("answer");
            let body = String::from_utf8_lossy(&answer.body).into_owned();
            let words: Vec<String> = body.split_whitespace().map(str::to_owned).collect();
            assert_eq!(words.len(), 4, "{body}");
            (
                words[0].parse::<u32>().expect("workers"),
                format!("{} {}", words[1], words[2]),
                words[3].parse::<u32>().expect("ticks"),
            )
        }
    };
    // Before any request, each of the two workers has run it once, and its timers tick.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (workers, tag, ticks) = read(&tidegate).await;
    assert_eq!((workers, tag.as_str()), (2, "v1 init_worker"), "once per worker, after init");
    assert!(ticks >= 10, "two workers' 50 ms timers for over a second: {ticks} ticks");

    // A new version runs it again on each worker; the old version's timers stop.
    let before = tidegate.version();
    write_manifest(dir.path(), "jobs.yaml", &route("v2"));
    tidegate.wait_version_after(before);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (workers, tag, _) = read(&tidegate).await;
        if workers == 4 && tag == "v2 init_worker" {
            break;
        }
        assert!(Instant::now() < deadline, "the new version ran on both workers: {workers} {tag}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, _, first) = read(&tidegate).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, _, second) = read(&tidegate).await;
    // 2 workers x 20 ticks a second from the new timers only (the old ones would double it).
    let rate = second - first;
    assert!((20..=60).contains(&rate), "{rate} ticks in a second: only the new version's timers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subrequests_and_internal_redirects_stay_inside_the_namespace() {
    let routes = lua_route(
        "internal",
        "in.test",
        None,
        &[
            (
                "api",
                "/api",
                "content",
                r#"ngx.say("api x=", ngx.var.arg_x, " ", ngx.req.get_method(), " sub=", tostring(ngx.is_subrequest()), " internal=", tostring(ngx.req.is_internal()), " ctx=", ngx.ctx.who or "-", " body=", ngx.req.get_body_data() or "-")"#,
                false,
            ),
            ("web", "/web", "access", "ngx.req.set_header('x-from', 'subrequest')", true),
            (
                "main",
                "/main",
                "content",
                r#"ngx.ctx.who = "main"
local a, b, c = ngx.location.capture_multi{
  {"/api", {args = {x = 1}, ctx = {who = "parent"}}},
  {"/api?x=2", {method = ngx.HTTP_POST, body = "sent"}},
  {"/web/page"},
}
ngx.print(a.status, " ", a.body, b.status, " ", b.body)
ngx.say(c.status, " ", c.header["Content-Type"], " ", c.body:find('"path":"/web/page"', 1, true) ~= nil, " ", c.body:find('"X-From":["subrequest"]', 1, true) ~= nil)
local other = ngx.location.capture("/secret")
local missing = ngx.location.capture("/nowhere")
ngx.say(other.status, " ", missing.status, " ctx=", ngx.ctx.who)"#,
                false,
            ),
            (
                "jump",
                "/jump",
                "rewrite",
                r#"ngx.ctx.who = "jump" ngx.req.read_body() return ngx.exec("/api", {x = "exec"})"#,
                true,
            ),
            ("loop", "/loop", "content", r#"return ngx.exec("/loop")"#, false),
        ],
    );
    // Another namespace's route on the same host: reachable directly, never internally.
    let other = "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {name: secret, namespace: u}\nspec:\n  hosts: [in.test]\n  routes:\n  - name: s\n    match: {path: {type: Prefix, value: /secret}}\n    lua:\n      content: ngx.say('secret')\n";
    let (tidegate, _dir) = start(&format!("{routes}{other}")).await;
    let answer = get(tidegate.http, "in.test", "/main").await.expect("main");
    assert_eq!(answer.status, StatusCode::OK, "{:?}", tidegate.logs());
    assert_eq!(
        String::from_utf8_lossy(&answer.body),
        "200 api x=1 GET sub=true internal=true ctx=parent body=-\n\
         200 api x=2 POST sub=true internal=true ctx=- body=sent\n\
         200 application/json true true\n\
         404 404 ctx=main\n"
    );
    let direct = get(tidegate.http, "in.test", "/secret").await.expect("secret");
    assert_eq!(String::from_utf8_lossy(&direct.body), "secret\n");

    let request = Request::post("/jump?ignored=1")
        .header("host", "in.test")
        .header("content-length", "4")
        .body(Body::from("kept"))
        .expect("request");
    let jumped = support::H1::connect(tidegate.http).await.expect("connect").send(request).await.expect("jump");
    assert_eq!(
        String::from_utf8_lossy(&jumped.body),
        "api x=exec POST sub=false internal=true ctx=- body=kept\n",
        "the request goes on at /api with its method and body, a new ngx.ctx, and the query ngx.exec gave"
    );
    let looped = get(tidegate.http, "in.test", "/loop").await.expect("loop");
    assert_eq!(looped.status, StatusCode::INTERNAL_SERVER_ERROR, "an internal redirection cycle ends");
    assert!(tidegate.logged_within("internal redirection cycle", Duration::from_secs(2)), "and is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_cosockets_talk_to_a_real_udp_server() {
    // A UDP echo server that answers each datagram in upper case, and one that never answers.
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let echo_port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut buffer = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buffer).await {
            let _ = echo.send_to(&buffer[..n].to_ascii_uppercase(), from).await;
        }
    });
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let source = format!(
        r#"local udp = ngx.socket.udp()
udp:settimeout(200)
assert(udp:setpeername("127.0.0.1", {echo_port}))
assert(udp:send({{"hello ", "udp"}}))
local first = assert(udp:receive())
assert(udp:send("again"))
local second = assert(udp:receive(3))
ngx.say(first, " ", second, " ", tostring(udp:close()))
local quiet = ngx.socket.udp()
quiet:settimeout(100)
assert(quiet:setpeername("localhost", {silent_port}))
assert(quiet:send("anyone?"))
local data, err = quiet:receive()
ngx.say(tostring(data), " ", err)
ngx.say(select(2, quiet:close()) == nil, " ", select(2, udp:send("x")))"#
    );
    let (tidegate, _dir) = start(&lua_route("udp", "udp.test", None, &[("r", "/", "content", &source, false)])).await;
    let answer = get(tidegate.http, "udp.test", "/").await.expect("answer");
    assert_eq!(String::from_utf8_lossy(&answer.body), "HELLO UDP AGA 1\nnil timeout\ntrue closed\n");
    assert!(tidegate.logged_within("lua udp socket read timed out", Duration::from_secs(2)), "the timeout is logged");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lua_balancer_spreads_requests_over_the_peers_it_picks_and_retries_the_next() {
    let a = echo("t", "a").await;
    let b = echo("t", "b").await;
    // A port nobody listens on: connecting is refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let balancer = format!(
        r#"local balancer = require "ngx.balancer"
local peers = {{ {{"127.0.0.1", {dead}}}, {{"127.0.0.1", {}}}, {{"127.0.0.1", {}}} }}
local ctx = ngx.ctx
if not ctx.tries then
  ctx.tries = 0
  assert(balancer.set_more_tries(2))
  ctx.start = ngx.shared.d:incr("turn", 1, 0)
end
local state, status = balancer.get_last_failure()
if state then ctx.failures = (ctx.failures or "") .. state .. status .. ";" end
local peer = peers[(ctx.start + ctx.tries) % 3 + 1]
ctx.tries = ctx.tries + 1
assert(balancer.set_current_peer(peer[1], peer[2]))"#,
        a.port(),
        b.port()
    );
    let manifest = format!(
        "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {{name: lb, namespace: t}}\nspec:\n  hosts: [lb.test]\n  sharedDicts: [{{name: d, size: 1Mi}}]\n  routes:\n  - name: picked\n    match: {{path: {{type: Prefix, value: /}}}}\n    lua:\n      balancer: {}\n      headerFilter: |\n        ngx.header['x-tries'] = ngx.ctx.tries\n        ngx.header['x-failures'] = ngx.ctx.failures or '-'\n  - name: refused\n    match: {{path: {{type: Prefix, value: /metadata}}}}\n    lua:\n      balancer: |\n        local ok, err = require('ngx.balancer').set_current_peer('169.254.169.254', 80)\n        ngx.ctx.err = err\n",
        serde_json::to_string(&balancer).expect("json")
    );
    let (tidegate, _dir) = start(&manifest).await;
    let mut served = std::collections::BTreeMap::<String, u32>::new();
    let mut retried = 0;
    for _ in 0..30 {
        let answer = get(tidegate.http, "lb.test", "/x").await.expect("answer");
        assert_eq!(answer.status, StatusCode::OK, "every request reaches a live peer");
        *served.entry(answer.served_by()).or_default() += 1;
        let tries = answer.headers["x-tries"].to_str().expect("tries");
        let failures = answer.headers["x-failures"].to_str().expect("failures");
        match tries {
            "1" => assert_eq!(failures, "-"),
            // The dead peer was picked first: refused, then the next one answered.
            "2" => {
                assert_eq!(failures, "failed502;");
                retried += 1;
            }
            other => panic!("{other} tries"),
        }
    }
    // Turns go round the three peers: a third of the requests start at the dead one, and go
    // on to the next, a.
    assert_eq!(retried, 10, "{served:?}");
    assert_eq!(served.get("a"), Some(&20), "{served:?}");
    assert_eq!(served.get("b"), Some(&10), "{served:?}");
    let refused = get(tidegate.http, "lb.test", "/metadata").await.expect("answer");
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY, "no peer, no backend: 502");
    assert!(tidegate.logged_within("--lua-socket-deny", Duration::from_secs(2)), "the refused peer is logged");
}

/// A plain HTTP server that answers every request with `body`, counting them.
async fn fixed_http_server(body: String) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            let counted = std::sync::Arc::clone(&counted);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssl_certificate_handler_serves_a_certificate_it_fetched_over_a_cosocket() {
    let (cert_pem, key_pem) = support::self_signed(&["auto.test"]);
    let (port, fetched) = fixed_http_server(format!("{cert_pem}{key_pem}")).await;
    let handler = format!(
        r#"local ssl = require "ngx.ssl"
local name = ssl.server_name()
local res = assert(require("resty.http").new():request_uri("http://127.0.0.1:{port}/cert?name=" .. name))
local cert = assert(ssl.parse_pem_cert(res.body))
local key = assert(ssl.parse_pem_priv_key(res.body))
assert(ssl.clear_certs())
assert(ssl.set_cert(cert))
assert(ssl.set_priv_key(key))
ngx.log(ngx.INFO, "certificate chosen for ", name, " in phase ", ngx.get_phase())"#
    );
    let manifest = format!(
        "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {{name: auto, namespace: t}}\nspec:\n  hosts: [auto.test]\n  sslCertificate: {}\n  sslCertificateCache: 30s\n  routes:\n  - name: r\n    match: {{path: {{type: Prefix, value: /}}}}\n    lua: {{content: 'ngx.say(\"served over \", ngx.var.scheme)'}}\n",
        serde_json::to_string(&handler).expect("json")
    );
    let (tidegate, _dir) = start(&manifest).await;
    // A client that trusts only the fetched certificate, checking the name auto.test.
    let trusting = support::tls_connector(Some(&[cert_pem.as_str()]), &[b"http/1.1"]);
    let expected = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("pem").as_ref().to_vec()
    };
    for _ in 0..3 {
        let answer =
            support::tls_request(&trusting, tidegate.https, "auto.test", support::get_request("auto.test", "/"))
                .await
                .expect("a handshake with the certificate Lua chose");
        assert_eq!(answer.peer_certificate, expected, "the certificate the handler fetched");
        assert_eq!(String::from_utf8_lossy(&answer.answer.body), "served over https\n");
    }
    assert_eq!(fetched.load(std::sync::atomic::Ordering::SeqCst), 1, "fetched once, then served from the cache");
    assert!(tidegate.logged_within("certificate chosen for auto.test in phase ssl_cert", Duration::from_secs(2)));
    // Another name is not the handler's: the usual (default) certificate, which the client
    // does not trust.
    let other =
        support::tls_request(&trusting, tidegate.https, "other.test", support::get_request("other.test", "/")).await;
    assert!(other.is_err(), "other.test gets the default certificate");
    assert_eq!(fetched.load(std::sync::atomic::Ordering::SeqCst), 1, "the handler did not run for other.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ngx_log_lines_take_openrestys_shape_when_asked() {
    let dir = manifest_dir();
    let source = "local x = 1\nngx.log(ngx.WARN, \"seen \", x)\nprint(\"printed\")\nngx.say(\"ok\")";
    write_manifest(
        dir.path(),
        "all.yaml",
        &lua_route("logs", "logs.test", None, &[("r", "/", "content", source, false)]),
    );
    let path = dir.path().to_owned();
    let tidegate = tokio::task::spawn_blocking(move || Tidegate::start(&path, &["--lua-openresty-log-lines"]))
        .await
        .expect("start");
    let answer = get(tidegate.http, "logs.test", "/").await.expect("answer");
    assert_eq!(String::from_utf8_lossy(&answer.body), "ok\n");
    for line in [
        "[lua] LuaRoute t/logs spec.routes[0].lua.content:2: seen 1",
        "[lua] LuaRoute t/logs spec.routes[0].lua.content:3: printed",
    ] {
        assert!(tidegate.logged_within(line, Duration::from_secs(2)), "{line:?} in {:?}", tidegate.logs());
    }
    // The structured fields stay.
    assert!(tidegate.logs().iter().any(|l| l.contains("seen 1") && l.contains("\"route\":\"t/logs/r\"")));
}
