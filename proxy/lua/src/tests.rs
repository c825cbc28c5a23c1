//! The VM on its own: phases, the ngx API, the sandbox and the limits.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Version};

use crate::{FailureKind, LuaConfig, LuaRequest, Outcome, Phase, RequestHead, RequestId, Script, Vm, compile};

fn vm_with(budget: Duration, memory: usize) -> Vm {
    Vm::new(LuaConfig { cpu_budget: budget, memory_limit: memory, ..LuaConfig::default() }).expect("vm")
}

fn vm() -> Vm {
    vm_with(Duration::from_millis(100), 64 << 20)
}

fn headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("host", "example.com".parse().expect("header"));
    headers.insert("x-api-key", "secret".parse().expect("header"));
    headers.insert("cookie", "a=1; session=abc".parse().expect("header"));
    headers
}

fn head(uri: &str) -> RequestHead {
    RequestHead {
        method: Method::GET,
        request_uri: uri.into(),
        version: Version::HTTP_11,
        remote: "127.0.0.9:5555".parse().expect("addr"),
        server_port: 8080,
        https: false,
        host: "example.com".into(),
        route: "test".into(),
        namespace: "ns".into(),
        request_id: Some(RequestId { process: 1, worker: 0, sequence: 1 }),
    }
}

fn script(source: &str) -> Arc<Script> {
    Arc::new(compile("test", source).unwrap_or_else(|e| panic!("compiles: {e}")))
}

/// Runs one phase of one handler on a fresh request.
fn run(vm: &Vm, phase: Phase, source: &str) -> (Outcome, Rc<LuaRequest>) {
    let request = vm.begin(head("/p?a=1&b=x%20y&b=2&flag"), headers()).expect("request");
    let outcome = block_on(vm.run(&request, phase, &[script(source)]));
    (outcome, request)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, f)
}

fn output(request: &LuaRequest) -> String {
    String::from_utf8_lossy(&crate::join_output(request.state.take_output())).into_owned()
}

/// [`say`], and how long the handler took (its waits included).
fn say_timed(vm: &Vm, source: &str) -> (String, Duration) {
    let started = Instant::now();
    let out = say(vm, source);
    (out, started.elapsed())
}

fn say(vm: &Vm, source: &str) -> String {
    let (outcome, request) = run(vm, Phase::Content, source);
    assert_eq!(outcome, Outcome::Continue, "handler ran: {source}\noutput so far: {}", output(&request));
    output(&request)
}

#[test]
fn say_and_print_write_output() {
    let vm = vm();
    assert_eq!(
        say(&vm, r#"ngx.say("Hello, ", 1, " ", 1.5, " ", true, " ", nil, " ", ngx.null) ngx.print({"a", {"b"}})"#),
        "Hello, 1 1.5 true nil null\nab"
    );
}

#[test]
fn what_a_handler_reads_is_its_own_request_s_on_every_run() {
    // Request environments are `safeenv`: a handler's imports come from what the loader
    // resolved when the chunk was first loaded, during the first request. Nothing of that
    // request may be among them.
    let vm = vm();
    let source = r#"local before = ngx.ctx.mine
        ngx.ctx.mine = ngx.var.request_uri
        local f = loadstring("return ngx.var.request_uri, ngx.status")
        ngx.status = 201
        local uri, status = f()
        ngx.say(tostring(before), " ", ngx.var.request_uri, " ", uri, " ", status, " ", type(ngx.shared))"#;
    let script = script(source);
    for uri in ["/first", "/second", "/third"] {
        let request = vm.begin(head(uri), headers()).expect("request");
        let outcome = block_on(vm.run(&request, Phase::Content, std::slice::from_ref(&script)));
        assert_eq!(outcome, Outcome::Continue, "{}", output(&request));
        assert_eq!(output(&request), format!("nil {uri} {uri} 201 table\n"));
    }
}

#[test]
fn exit_in_access_ends_the_request_even_inside_pcall() {
    let vm = vm();
    let (outcome, _) = run(&vm, Phase::Access, "pcall(function() ngx.exit(403) end) error('not reached')");
    assert_eq!(outcome, Outcome::Exit(403));
    let (outcome, _) = run(&vm, Phase::Access, "ngx.exit(ngx.OK) error('not reached')");
    assert_eq!(outcome, Outcome::Continue, "ngx.exit(ngx.OK) only ends the handler");
    let (outcome, _) = run(&vm, Phase::Content, "ngx.say('x') ngx.exit(200)");
    assert_eq!(outcome, Outcome::Exit(200));
}

/// OpenResty's own tests (005-exit.t) use ngx.exit in header_filter to replace the response;
/// in body_filter and log it is refused.
#[test]
fn exit_replaces_the_response_in_header_filter_only() {
    let vm = vm();
    let request = vm.begin(head("/"), headers()).expect("request");
    assert_eq!(
        block_on(vm.run(&request, Phase::HeaderFilter, &[script("ngx.exit(403) error('not reached')")])),
        Outcome::Exit(403)
    );
    let outcome = block_on(vm.run(&request, Phase::Log, &[script("ngx.exit(500)")]));
    assert!(
        matches!(outcome, Outcome::Failed { kind: FailureKind::Error, ref message } if message.contains("API disabled")),
        "{outcome:?}"
    );
    let (outcome, _) = run(&vm, Phase::Content, "ngx.exit(ngx.AGAIN)");
    assert!(
        matches!(outcome, Outcome::Failed { ref message, .. } if message.contains("does not accept NGX_AGAIN")),
        "{outcome:?}"
    );
}

#[test]
fn variables_and_request_api() {
    let vm = vm();
    let out = say(
        &vm,
        r#"
        ngx.say(ngx.var.uri, " ", ngx.var.args, " ", ngx.var.arg_a, " ", ngx.var.http_x_api_key, " ", ngx.var.cookie_session)
        ngx.say(ngx.var.remote_addr, " ", ngx.var.server_port, " ", ngx.var.scheme, " ", ngx.var.request_method, " ", ngx.var.host)
        local args = ngx.req.get_uri_args()
        ngx.say(args.a, " ", args.b[1], "|", args.b[2], " ", tostring(args.flag))
        local h = ngx.req.get_headers()
        ngx.say(h["X-API-Key"], " ", h.x_api_key)
        ngx.req.set_header("X-Added", "1")
        ngx.req.clear_header("x-api-key")
        ngx.var.my_var = "set"
        ngx.say(ngx.var.my_var, " ", tostring(ngx.var.http_x_api_key), " ", ngx.req.get_headers()["x-added"])
        "#,
    );
    assert_eq!(
        out,
        "/p a=1&b=x%20y&b=2&flag 1 secret abc\n127.0.0.9 8080 http GET example.com\n1 x y|2 true\nsecret secret\nset nil 1\n"
    );
}

#[test]
fn ctx_is_shared_across_phases_of_one_request_only() {
    let vm = vm();
    let request = vm.begin(head("/"), headers()).expect("request");
    let set = block_on(vm.run(&request, Phase::Access, &[script("ngx.ctx.user = 'alice'")]));
    assert_eq!(set, Outcome::Continue);
    block_on(vm.run(&request, Phase::Content, &[script("ngx.say(ngx.ctx.user)")]));
    assert_eq!(output(&request), "alice\n");
    assert_eq!(say(&vm, "ngx.say(tostring(ngx.ctx.user))"), "nil\n", "another request has its own ctx");
}

#[test]
fn globals_written_by_one_request_are_not_seen_by_the_next() {
    let vm = vm();
    assert_eq!(say(&vm, "counter = (counter or 0) + 1 ngx.say(counter)"), "1\n");
    assert_eq!(say(&vm, "counter = (counter or 0) + 1 ngx.say(counter)"), "1\n");
}

/// loadstring compiles source only, into the calling request's environment.
#[test]
fn loadstring_stays_in_the_request() {
    let vm = vm();
    assert_eq!(say(&vm, "local f = loadstring('leaked = 1 return 2') ngx.say(f(), ' ', leaked)"), "2 1\n");
    assert_eq!(say(&vm, "ngx.say(tostring(leaked))"), "nil\n", "the global stayed in the request that ran it");
    assert_eq!(
        say(&vm, "local f, err = loadstring('\\27Lua') ngx.say(tostring(f), ' ', type(err))"),
        "nil string\n",
        "bytecode is not loadable"
    );
}

#[test]
fn shared_tables_are_read_only() {
    let vm = vm();
    for attempt in [
        "string.upper = function() return 'pwned' end",
        "getmetatable('').__index = {}",
        "ngx.say = nil",
        "ngx.exit = function() end",
        "ngx.var = {}",
        "table.insert = nil",
        "cjson = require('cjson') cjson.encode = nil",
        "ngx.req.get_method = function() return 'PWNED' end",
        "ngx.re.match = nil",
        "ngx.socket.tcp = nil",
        "ngx.thread.spawn = nil",
        "ngx.timer.at = nil",
        "ngx.worker.id = nil",
        "ngx.config.debug = true",
        "ngx.resp.get_headers = nil",
    ] {
        let (outcome, _) = run(&vm, Phase::Content, attempt);
        assert!(matches!(outcome, Outcome::Failed { .. }), "{attempt} must fail: {outcome:?}");
    }
    assert_eq!(say(&vm, "ngx.say(string.upper('ok'))"), "OK\n");
}

#[test]
fn removed_functions_are_unreachable() {
    let vm = vm();
    let out = say(
        &vm,
        r#"
        local names = {"io", "debug", "package", "dofile", "loadfile", "getfenv", "setfenv", "module", "gcinfo_is_fine", "newproxy_is_fine"}
        for _, n in ipairs(names) do ngx.say(n, "=", tostring(_G and _G[n] or nil)) end
        ngx.say("os.execute=", tostring(os.execute), " os.getenv=", tostring(os.getenv), " os.exit=", tostring(os.exit))
        ngx.say(collectgarbage("collect"), " ", collectgarbage("stop"))
        ngx.say(type(collectgarbage("count")))
        ngx.say(require("os") == os, " ", tostring(require("os").execute), " ", pcall(require, "io"))
        "#,
    );
    for line in out.lines().take(10) {
        assert!(line.ends_with("=nil"), "{line}");
    }
    assert!(out.contains("os.execute=nil os.getenv=nil os.exit=nil"), "{out}");
    assert!(out.contains("number"), "{out}");
    // `require` finds the standard libraries as the sandbox has them: the reduced `os`, no `io`.
    assert!(out.lines().any(|l| l.starts_with("true nil false") && l.contains("module 'io' not found")), "{out}");
}

fn assert_times_out(vm: &Vm, source: &str, budget: Duration) {
    let started = Instant::now();
    let (outcome, _) = run(vm, Phase::Access, source);
    let took = started.elapsed();
    assert!(matches!(outcome, Outcome::Failed { kind: FailureKind::Timeout, .. }), "{source}: {outcome:?}");
    assert!(took < budget + Duration::from_millis(150), "{source} stopped after {took:?}");
    // The worker is fine: the next request runs normally.
    assert_eq!(say(vm, "ngx.say('next')"), "next\n");
}

#[test]
fn runaway_code_is_stopped_within_the_budget() {
    let budget = Duration::from_millis(100);
    let vm = vm_with(budget, 256 << 20);
    assert_times_out(&vm, "while true do end", budget);
    assert_times_out(&vm, "while true do pcall(function() while true do end end) end", budget);
    assert_times_out(&vm, "pcall(function() while true do end end) while true do end", budget);
    assert_times_out(&vm, "local f = coroutine.wrap(function() while true do end end) f() while true do end", budget);
    assert_times_out(
        &vm,
        r#"local s = string.rep("a", 40) .. "b" string.find(s, string.rep("a?", 40) .. string.rep("a", 40)) while true do end"#,
        budget,
    );
    assert_times_out(
        &vm,
        r#"local s = string.rep("a", 40) pcall(string.find, s, string.rep("a?", 40) .. string.rep("a", 40) .. "b") ngx.say("unreachable")"#,
        budget,
    );
}

#[test]
fn a_memory_hog_fails_and_the_vm_recovers() {
    let vm = vm_with(Duration::from_secs(5), 64 << 20);
    let (outcome, _) = run(&vm, Phase::Access, r#"local s = string.rep("x", 2^30)"#);
    assert!(matches!(outcome, Outcome::Failed { kind: FailureKind::Memory, .. }), "{outcome:?}");
    let (outcome, _) = run(&vm, Phase::Access, "local t = {} for i = 1, 1e9 do t[i] = i end");
    assert!(matches!(outcome, Outcome::Failed { kind: FailureKind::Memory, .. }), "{outcome:?}");
    vm.collect_if_needed();
    assert_eq!(say(&vm, "ngx.say('alive')"), "alive\n");
    assert!(vm.used_memory() < 64 << 20);
}

#[test]
fn errors_name_the_script_and_line() {
    let vm = vm();
    let (outcome, _) = run(&vm, Phase::Content, "local a = 1\nngx.echo('x')");
    match outcome {
        Outcome::Failed { kind: FailureKind::Error, message } => assert!(message.starts_with("test:2:"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn status_and_headers() {
    let vm = vm();
    let (outcome, request) = run(
        &vm,
        Phase::Content,
        r#"ngx.status = 201 ngx.header.content_type = "application/json" ngx.header["X-Multi"] = {"a", "b"} ngx.say(ngx.header["Content-Type"], " ", #ngx.header.x_multi)"#,
    );
    assert_eq!(outcome, Outcome::Continue);
    assert_eq!(request.state.status.get(), 201);
    let headers = request.state.response_headers.borrow();
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers.get_all("x-multi").iter().count(), 2);
    drop(headers);
    assert_eq!(output(&request), "application/json 2\n");
}

#[test]
fn header_values_of_every_kind() {
    let vm = vm();
    let (outcome, request) = run(
        &vm,
        Phase::Content,
        r#"ngx.header.x_int = 42 ngx.header.x_float = 1.5 ngx.header.x_bool = true
           ngx.header.x_gone = "a" ngx.header.x_gone = nil ngx.header.x_line = "a\nb"
           ngx.header.content_length = "12" ngx.req.set_header("X-Req", 7)
           local ok, err = pcall(function() ngx.header.content_length = "twelve" end)
           local ok_fn, err_fn = pcall(function() ngx.header.x_fn = function() end end)
           ngx.header.x_multi = {"a", "b"}
           pcall(function() ngx.header.x_multi = {"c", "bad\0"} end)
           ngx.header.content_type = {"text/a", "text/b"}
           -- Output sends the headers: set no more after this.
           ngx.say(ok, " ", err:match("invalid Content%-Length") ~= nil, " ", ngx.header.x_int)
           ngx.say(ok_fn, " ", err_fn:match("bad header value") ~= nil, " ", ngx.req.get_headers()["x-req"])"#,
    );
    assert_eq!(outcome, Outcome::Continue);
    let headers = request.state.response_headers.borrow();
    assert_eq!(headers["x-int"], "42");
    assert_eq!(headers["x-float"], "1.5");
    assert_eq!(headers["x-bool"], "true");
    assert!(!headers.contains_key("x-gone"));
    assert_eq!(headers["x-line"], "a%0Ab");
    assert_eq!(headers["content-length"], "12", "a refused value changes nothing");
    let multi: Vec<_> = headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"], "nor does a table with one refused value");
    assert_eq!(headers["content-type"], "text/b", "a single-valued header takes a table's last");
    drop(headers);
    assert_eq!(output(&request), "false true 42\nfalse true 7\n");
}

#[test]
fn redirect_sets_location_and_exits() {
    let vm = vm();
    let (outcome, request) = run(&vm, Phase::Rewrite, r#"ngx.redirect("/new", ngx.HTTP_MOVED_PERMANENTLY)"#);
    assert_eq!(outcome, Outcome::Exit(301));
    assert_eq!(request.state.response_headers.borrow()["location"], "/new");
}

#[test]
fn codecs_and_time() {
    let vm = vm();
    let out = say(
        &vm,
        r#"
        ngx.say(ngx.encode_base64("hello"), " ", ngx.decode_base64("aGVsbG8="), " ", ngx.md5("hello"))
        ngx.say(ngx.encode_base64(ngx.sha1_bin("abc")), " ", ngx.encode_base64(ngx.hmac_sha1("key", "msg")))
        ngx.say(ngx.crc32_short("hello"), " ", ngx.escape_uri("a b/c"), " ", ngx.unescape_uri("a%20b+c"))
        ngx.say(ngx.encode_args({b = "2 3", a = true, c = false, d = {"x", "y"}}), " ", ngx.decode_args("x=1&y=2").y)
        ngx.say(ngx.quote_sql_str("it's"), " ", ngx.http_time(1290079655), " ", ngx.parse_http_time("Thu, 18 Nov 2010 11:27:35 GMT"))
        ngx.say(type(ngx.now()), " ", type(ngx.time()), " ", #ngx.today(), " ", ngx.get_phase(), " ", ngx.worker.count(), " ", ngx.config.subsystem)
        "#,
    );
    assert_eq!(
        out,
        "aGVsbG8= hello 5d41402abc4b2a76b9719d911017c592\nqZk+NkcGgWq6PiVxeFDCbJzQ2J0= ECkAtyt78QMe7Ha0gEtmBSN2iWs=\n907060870 a%20b%2Fc a b c\na&b=2%203&d=x&d=y 2\n'it\\'s' Thu, 18 Nov 2010 11:27:35 GMT 1290079655\nnumber number 10 content 1 http\n"
    );
}

#[test]
fn cjson_round_trips() {
    let vm = vm();
    let out = say(
        &vm,
        r#"
        local cjson = require "cjson"
        ngx.say(cjson.encode({1, 2.5, "a/b", true, cjson.null}))
        ngx.say(cjson.encode({}), cjson.encode(cjson.empty_array), cjson.encode(setmetatable({}, cjson.array_mt)))
        local t = cjson.decode('{"a":[1,2,{"b":null}],"c":"d"}')
        ngx.say(t.a[2], " ", t.c, " ", tostring(t.a[3].b == cjson.null))
        local safe = require "cjson.safe"
        local v, err = safe.decode("{bad")
        ngx.say(tostring(v), " ", type(err))
        ngx.say(pcall(cjson.decode, "{bad"))
        "#,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], r#"[1,2.5,"a\/b",true,null]"#);
    assert_eq!(lines[1], "{}[][]");
    assert_eq!(lines[2], "2 d true");
    assert_eq!(lines[3], "nil string");
    assert!(lines[4].starts_with("false"));
}

#[test]
fn bit_module_matches_luajit() {
    let vm = vm();
    let out = say(
        &vm,
        r#"local bit = require "bit" ngx.say(bit.band(0xff, 0x0f), " ", bit.bor(1, 2), " ", bit.lshift(1, 31), " ", bit.tohex(255, 4), " ", bit.bnot(0))"#,
    );
    assert_eq!(out, "15 3 -2147483648 00ff -1\n");
}

#[test]
fn read_body_waits_for_the_body() {
    let vm = vm();
    let request = vm.begin(head("/"), headers()).expect("request");
    *request.body_reader.borrow_mut() = Some(Box::new(|| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(bytes::Bytes::from_static(b"a=1&b=2"))
        })
    }));
    let outcome = block_on(vm.run(
        &request,
        Phase::Content,
        &[script(
            "ngx.req.read_body() local args = ngx.req.get_post_args() ngx.say(ngx.req.get_body_data(), ' ', args.b)",
        )],
    ));
    assert_eq!(outcome, Outcome::Continue);
    assert_eq!(output(&request), "a=1&b=2 2\n");
}

#[test]
fn sorting_millions_of_items_is_stopped_within_the_budget() {
    let budget = Duration::from_millis(100);
    let vm = vm_with(budget, 512 << 20);
    assert_times_out(&vm, "local t = {} for i = 1, 3e6 do t[i] = (i * 7919) % 3e6 end table.sort(t)", budget);
    assert_times_out(
        &vm,
        "local t = {} for i = 1, 3e6 do t[i] = (i * 7919) % 3e6 end table.sort(t, function(a, b) return a > b end)",
        budget,
    );
}

fn vm_with_dicts(dicts: &std::sync::Arc<crate::SharedDicts>) -> Vm {
    Vm::new(LuaConfig { shared_dicts: std::sync::Arc::clone(dicts), ..LuaConfig::default() }).expect("vm")
}

/// A VM with these dictionaries (namespace, name, size) declared.
fn vm_with_declared(declared: &[(String, String, u64)]) -> (std::sync::Arc<crate::SharedDicts>, Vm) {
    let dicts = crate::SharedDicts::new();
    dicts.configure(declared);
    let vm = vm_with_dicts(&dicts);
    (dicts, vm)
}

#[test]
fn shared_dicts_follow_openresty() {
    let (_, vm) = vm_with_declared(&[("ns".into(), "dogs".into(), 1 << 20)]);
    let out = say(
        &vm,
        r#"
        local dogs = ngx.shared.dogs
        ngx.say(dogs:set("foo", 32, 0, 199), " ", dogs:set("bar", "x"))
        local v, flags = dogs:get("foo") ngx.say(v, " ", flags)
        local v, flags = dogs:get("bar") ngx.say(v, " ", tostring(flags))
        ngx.say(dogs:add("foo", 1))
        ngx.say(dogs:replace("nope", 1))
        ngx.say(dogs:incr("foo", 10), " ", dogs:incr("n", 1, 0), " ", dogs:incr("n", 1, 0))
        ngx.say(dogs:incr("missing", 1))
        ngx.say(dogs:incr("bar", 1))
        ngx.say(dogs:lpush("l", "a"), dogs:rpush("l", 2), dogs:llen("l"), dogs:lpop("l"), dogs:rpop("l"), dogs:llen("l"))
        ngx.say(dogs:lpush("foo", 1))
        ngx.say(dogs:set("t", {}))
        dogs:set("gone", 1, 0.001)
        ngx.say(tostring(ngx.shared.cats), " ", dogs:capacity())
        "#,
    );
    assert_eq!(
        out,
        "true truenilfalse\n32 199\nx nil\nfalseexistsfalse\nfalsenot foundfalse\n42 1 2nilfalse\nnilnot found\nnilnot a number\n122a20\nnilvalue not a list\nfalsebad value typefalse\nnil 1048576\n"
    );
}

#[test]
fn a_full_dict_evicts_least_recently_used_entries() {
    let (dicts, vm) = vm_with_declared(&[("ns".into(), "small".into(), 4096)]);
    let out = say(
        &vm,
        r#"
        local d = ngx.shared.small
        local forced
        for i = 1, 100 do
            local ok, err, forcible = d:set("k" .. i, string.rep("v", 100))
            if forcible then forced = forced or i end
        end
        ngx.say(forced ~= nil, " ", tostring(d:get("k1")), " ", d:get("k100") ~= nil)
        ngx.say(d:safe_set("big", string.rep("x", 10000)))
        "#,
    );
    assert_eq!(out, "true nil true\nfalseno memoryfalse\n");
    // What `incr` and `get` touch is used: the entry left untouched goes first.
    let out = say(
        &vm,
        r#"
        local d = ngx.shared.small
        d:flush_all() d:flush_expired()
        d:set("old", 1) d:set("counter", 1) d:set("read", "x")
        d:incr("old", 1) d:incr("old", 1) d:get("read")
        -- Room for about 24 such entries (169 bytes accounted each): evictions come before the 30th.
        for i = 1, 30 do
            d:set("fill" .. i, string.rep("v", 100))
            d:incr("old", 0) d:get("read")
        end
        ngx.say(tostring(d:get("counter")), " ", d:get("old"), " ", d:get("read"))
        "#,
    );
    assert_eq!(out, "nil 3 x\n");
    let stats = dicts.stats();
    assert!(stats[0].evictions > 0 && stats[0].used_bytes <= 4096, "{stats:?}");
}

#[test]
fn dicts_are_scoped_to_their_namespace_and_shared_across_vms() {
    let dicts = crate::SharedDicts::new();
    dicts.configure(&[("ns".into(), "hits".into(), 1 << 20)]);
    let (a, b) = (vm_with_dicts(&dicts), vm_with_dicts(&dicts));
    say(&a, "ngx.shared.hits:incr('n', 1, 0)");
    assert_eq!(say(&b, "ngx.say((ngx.shared.hits:incr('n', 1, 0)))"), "2\n", "one store for all workers");
    let request = b.begin(RequestHead { namespace: "other".into(), ..head("/") }, headers()).expect("request");
    block_on(b.run(&request, Phase::Content, &[script("ngx.say(tostring(ngx.shared.hits))")]));
    assert_eq!(output(&request), "nil\n", "another namespace does not see the dict");
}

/// A worker keeps each dictionary's object between requests, until the declared set changes.
#[test]
fn a_worker_forgets_dicts_no_longer_declared_and_kept_ones_are_read_only() {
    let (dicts, vm) = vm_with_declared(&[("ns".into(), "hits".into(), 1 << 20)]);
    assert_eq!(
        say(&vm, "ngx.say(ngx.shared.hits:incr('n', 1, 0), ' ', ngx.shared.hits == ngx.shared.hits)"),
        "1 true\n"
    );
    dicts.configure(&[("ns".into(), "other".into(), 1 << 20)]);
    assert_eq!(say(&vm, "ngx.say(tostring(ngx.shared.hits), ' ', (ngx.shared.other:incr('n', 5, 0)))"), "nil 5\n");
    assert_eq!(
        say(&vm, "ngx.say((pcall(function() ngx.shared.other.incr = nil end)), ' ', (ngx.shared.other:incr('n', 1)))"),
        "false 6\n",
        "a request cannot change the object the next one gets"
    );
}

#[test]
fn sleeping_requests_interleave_on_one_worker() {
    let vm = Rc::new(vm());
    let started = Instant::now();
    let outputs = block_on(async {
        let mut tasks = Vec::new();
        for i in 0..100 {
            let vm = Rc::clone(&vm);
            tasks.push(tokio::task::spawn_local(async move {
                let request = vm.begin(head("/"), headers()).expect("request");
                let outcome = vm.run(&request, Phase::Access, &[script(&format!("ngx.sleep(0.1) ngx.say({i})"))]).await;
                (outcome, output(&request))
            }));
        }
        let mut outputs = Vec::new();
        for task in tasks {
            outputs.push(task.await.expect("task"));
        }
        outputs
    });
    assert!(started.elapsed() < Duration::from_millis(600), "100 sleeps of 0.1 s overlapped: {:?}", started.elapsed());
    for (i, (outcome, out)) in outputs.into_iter().enumerate() {
        assert_eq!((outcome, out), (Outcome::Continue, format!("{i}\n")));
    }
}

#[test]
fn ngx_re_follows_openresty() {
    let vm = vm();
    let out = say(
        &vm,
        r#"
        local m = ngx.re.match("hello, 1234 world", "([0-9])([0-9]+)")
        ngx.say(m[0], " ", m[1], " ", m[2])
        local m = ngx.re.match("hello", "(?<greeting>hel)(x)?", "i")
        ngx.say(m.greeting, " ", tostring(m[2]))
        ngx.say(tostring(ngx.re.match("hello", "HELLO")), " ", ngx.re.match("hello", "HELLO", "i")[0])
        local ctx = { pos = 2 }
        ngx.say(ngx.re.match("1a2b3", "[0-9]", "", ctx)[0], " ", ctx.pos)
        ngx.say(ngx.re.find("hello, 1234", "[0-9]+"))
        local parts = {}
        for m in ngx.re.gmatch("a1b22c333", "[0-9]+") do parts[#parts + 1] = m[0] end
        ngx.say(table.concat(parts, ","))
        ngx.say(ngx.re.sub("hello, world", "o", "0"))
        ngx.say(ngx.re.gsub("hello, world", "([a-z])(o)", "$2$1"))
        ngx.say(ngx.re.gsub("a1b2", "[0-9]", function(m) return "<" .. m[0] .. ">" end))
        ngx.say(ngx.re.gsub("abc", "", "-"))
        ngx.say(table.concat(ngx.re.split("a, b,c", ",\\s*"), "|"))
        -- PCRE: lookaround, backreferences, duplicate names (D), atomic groups.
        ngx.say(ngx.re.match("price: 42 EUR", "(?<=price: )\\d+(?= EUR)")[0])
        ngx.say(ngx.re.match("say hello hello there", "\\b(\\w+) \\1\\b")[1])
        local d = ngx.re.match("2024-05", "(?<n>\\d{4})-(?<n>\\d{2})", "D")
        ngx.say(type(d.n), " ", table.concat(d.n, "/"))
        ngx.say(tostring(ngx.re.match("aaab", "(?>a+)ab")))
        ngx.say(ngx.re.gsub("héllo wörld", "(?<=\\s|^)\\w", function(m) return m[0]:upper() end, "u"))
        ngx.say(ngx.re.gsub("é", "", "-", "u"))
        -- A pattern that backtracks without end stops at the match limit.
        local m, err = ngx.re.match(string.rep("a", 40) .. "!", "(a+)+$")
        ngx.say(tostring(m), " ", err)
        "#,
    );
    assert_eq!(
        out,
        "1234 1 234\nhel false\nnil hello\n2 4\n811\n1,22,333\nhell0, world1\nhelol, owrld2\na<1>b<2>2\n-a-b-c-4\na|b|c\n\
         42\nhello\ntable 2024/05\nnil\nHéllo Wörld2\n-é-2\nnil pcre2_match() failed: -47 (match limit exceeded)\n"
    );
}

#[test]
fn timers_run_after_their_request_and_are_bounded() {
    let dicts = crate::SharedDicts::new();
    dicts.configure(&[("ns".into(), "t".into(), 1 << 20)]);
    let config =
        LuaConfig { shared_dicts: std::sync::Arc::clone(&dicts), max_pending_timers: 16, ..LuaConfig::default() };
    let vm = Rc::new(Vm::new(config).expect("vm"));
    block_on(async {
        let every = script(
            "local ok, err = ngx.timer.every(0.01, function(premature) ngx.shared.t:incr('every', 1, 0) end) ngx.say(ok)",
        );
        let request = vm.begin(head("/"), headers()).expect("request");
        let at = script(
            "local ok = ngx.timer.at(0.02, function(premature, a, b) ngx.shared.t:set('at', a + b .. ' ' .. ngx.get_phase() .. ' ' .. tostring(premature)) end, 40, 2) ngx.say(ok, ' ', ngx.timer.pending_count())",
        );
        assert_eq!(vm.run(&request, Phase::Content, &[Arc::clone(&at)]).await, Outcome::Continue);
        assert_eq!(output(&request), "true 1\n", "scheduled, pending");
        let request = vm.begin(head("/"), headers()).expect("request");
        assert_eq!(vm.run(&request, Phase::Content, &[Arc::clone(&every)]).await, Outcome::Continue);
        // A timer past its CPU budget is stopped; the VM goes on.
        let request = vm.begin(head("/"), headers()).expect("request");
        vm.run(&request, Phase::Content, &[script("ngx.timer.at(0, function() while true do end end)")]).await;
        // The cap: creating more than max_pending fails with an error, not memory. (A debug
        // build needs more than the default budget for 100,000 calls.)
        let request = vm.begin(head("/"), headers()).expect("request");
        request.set_cpu_budget(Duration::from_secs(5));
        vm.run(&request, Phase::Content, &[script("local failed = 0 for i = 1, 100000 do local ok, err = ngx.timer.at(10, function() end) if not ok then failed = failed + 1 last = err end end ngx.say(failed, ' ', last)")]).await;
        let capped = output(&request);
        let failed: usize = capped.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(capped.ends_with("too many pending timers\n") && failed >= 100_000 - 16, "{capped}");

        tokio::time::sleep(Duration::from_millis(400)).await;
        let request = vm.begin(head("/"), headers()).expect("request");
        vm.run(
            &request,
            Phase::Content,
            &[script("ngx.say(ngx.shared.t:get('at'), ' ', ngx.shared.t:get('every') > 5)")],
        )
        .await;
        assert_eq!(
            output(&request),
            "42 timer false true\n",
            "the timers ran, with their arguments, in the timer phase"
        );

        // Once its script is no longer loaded, the every timer stops being scheduled.
        vm.retain_scripts(|id| id != every.id);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let request = vm.begin(head("/"), headers()).expect("request");
        vm.run(&request, Phase::Content, &[script("ngx.say(ngx.shared.t:get('every'))")]).await;
        let first = output(&request);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let request = vm.begin(head("/"), headers()).expect("request");
        vm.run(&request, Phase::Content, &[script("ngx.say(ngx.shared.t:get('every'))")]).await;
        assert_eq!(output(&request), first, "no more runs after its script went");
    });
}

#[test]
fn a_timer_runs_until_its_light_threads_end() {
    let dicts = crate::SharedDicts::new();
    dicts.configure(&[("ns".into(), "t".into(), 1 << 20)]);
    let vm = Rc::new(
        Vm::new(LuaConfig { shared_dicts: std::sync::Arc::clone(&dicts), ..LuaConfig::default() }).expect("vm"),
    );
    block_on(async {
        let request = vm.begin(head("/"), headers()).expect("request");
        let timer = script(
            "ngx.timer.at(0, function()
                ngx.thread.spawn(function() ngx.sleep(0.05) ngx.shared.t:set('thread', 'done') end)
                ngx.shared.t:set('timer', 'returned')
            end)
            ngx.timer.at(0, function()
                ngx.thread.spawn(function() ngx.sleep(0.05) ngx.exit(200) end)
                ngx.thread.spawn(function() ngx.sleep(0.2) ngx.shared.t:set('killed', 'no') end)
            end)",
        );
        assert_eq!(vm.run(&request, Phase::Content, &[timer]).await, Outcome::Continue);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let request = vm.begin(head("/"), headers()).expect("request");
        let probe = script("ngx.say(ngx.shared.t:get('timer'), ' ', ngx.timer.running_count())");
        vm.run(&request, Phase::Content, &[Arc::clone(&probe)]).await;
        assert_eq!(output(&request), "returned 2\n", "both timers still run: their threads sleep");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let request = vm.begin(head("/"), headers()).expect("request");
        let probe = script(
            "ngx.say(ngx.shared.t:get('thread'), ' ', tostring(ngx.shared.t:get('killed')), ' ', ngx.timer.running_count())",
        );
        vm.run(&request, Phase::Content, &[probe]).await;
        assert_eq!(
            output(&request),
            "done nil 0\n",
            "joined; ngx.exit in a thread ended its timer and its other thread"
        );
    });
}

#[test]
fn waiting_inside_user_coroutines_suspends_the_request_not_the_coroutine() {
    let vm = vm();
    let (out, took) = say_timed(
        &vm,
        r#"
        local co = coroutine.create(function(a)
            ngx.sleep(0.05)
            local b = coroutine.yield(a + 1)
            ngx.sleep(0.01)
            return b * 2
        end)
        local ok, v = coroutine.resume(co, 1)
        ngx.say(ok, " ", v, " ", coroutine.status(co))
        ok, v = coroutine.resume(co, 21)
        ngx.say(ok, " ", v, " ", coroutine.status(co))
        local gen = coroutine.wrap(function() for i = 1, 3 do ngx.sleep(0) coroutine.yield(i) end end)
        ngx.say(gen(), gen(), gen())
        "#,
    );
    assert_eq!(out, "true 2 suspended\ntrue 42 dead\n123\n");
    assert!(took >= Duration::from_millis(60), "the sleeps really waited: {took:?}");
}

#[test]
fn a_sleep_that_cannot_yield_fails_and_leaves_no_wait_behind() {
    let vm = vm();
    // gsub calls back from C: the callback cannot yield. Its failed sleep must not delay the
    // handler's next wait.
    let (out, took) = say_timed(
        &vm,
        r#"
        local th = ngx.thread.spawn(function() ngx.sleep(0.01) return "woke" end)
        local ok, err = pcall(string.gsub, "a", "a", function() ngx.sleep(0.5) end)
        ngx.say(ok, " ", err:find("yield") ~= nil)
        ngx.say(select(2, ngx.thread.wait(th)))
        "#,
    );
    assert_eq!(out, "false true\nwoke\n");
    assert!(took < Duration::from_millis(300), "waited {took:?}");
}

#[test]
fn light_threads_run_alongside_their_handler() {
    let vm = vm();
    assert_eq!(
        say(
            &vm,
            r#"ngx.say("before")
            local t = ngx.thread.spawn(function(a) ngx.say("in ", a) ngx.sleep(0.01) ngx.say("woke") return "r1", 2 end, "x")
            ngx.say("parent")
            local ok, a, b = ngx.thread.wait(t)
            ngx.say(ok, " ", a, " ", b, " ", type(t))"#
        ),
        "before\nin x\nparent\nwoke\ntrue r1 2 userdata\n",
        "spawn runs the thread until it first waits, then returns"
    );

    let began = Instant::now();
    assert_eq!(
        say(
            &vm,
            r#"local function slow(s, v) ngx.sleep(s) return v end
            local a = ngx.thread.spawn(slow, 0.1, "slow")
            local b = ngx.thread.spawn(slow, 0.02, "fast")
            ngx.say(select(2, ngx.thread.wait(a, b)))
            ngx.say(select(2, ngx.thread.wait(a)))"#
        ),
        "fast\nslow\n",
        "wait returns the first of its threads to end"
    );
    assert!(began.elapsed() < Duration::from_millis(180), "the threads slept at the same time: {:?}", began.elapsed());

    assert_eq!(
        say(&vm, r#"ngx.thread.spawn(function() ngx.sleep(0.01) ngx.say("late") end) ngx.say("entry done")"#),
        "entry done\nlate\n",
        "the handler is over only when its threads are"
    );
}

#[test]
fn light_thread_errors_kills_and_exits() {
    let vm = vm();
    let out = say(
        &vm,
        r#"local now = ngx.thread.spawn(function() error("boom") end)
        local later = ngx.thread.spawn(function() ngx.sleep(0) error("late boom") end)
        ngx.say(ngx.thread.wait(now))
        ngx.say(ngx.thread.wait(later))
        local t = ngx.thread.spawn(function() ngx.sleep(0.01) ngx.say("never") end)
        ngx.say(ngx.thread.kill(t))
        ngx.say(ngx.thread.kill(t))
        ngx.sleep(0.03)
        ngx.say(pcall(ngx.thread.wait, t))"#,
    );
    assert_eq!(
        out,
        "falsetest:1: boom\nfalsetest:2: late boom\n1\nnilalready waited or killed\nfalsengx.thread.wait: thread already waited or killed\n",
        "errors go to wait, killed threads never run again"
    );

    let began = Instant::now();
    let (outcome, _) = run(
        &vm,
        Phase::Access,
        r#"ngx.thread.spawn(function() ngx.sleep(0.01) ngx.exit(403) end) ngx.sleep(2) error("not reached")"#,
    );
    assert_eq!(outcome, Outcome::Exit(403), "ngx.exit in a light thread ends the request");
    assert!(began.elapsed() < Duration::from_secs(1), "the sleeping handler was not waited for");

    let (outcome, _) =
        run(&vm, Phase::Access, r#"ngx.thread.spawn(function() ngx.exit(401) end) error("not reached")"#);
    assert_eq!(outcome, Outcome::Exit(401), "also before the thread first waits");

    for source in [
        "ngx.thread.spawn(function() while true do end end) ngx.say('not reached')",
        "ngx.thread.spawn(function() ngx.sleep(0) while true do end end) ngx.sleep(5)",
    ] {
        let (outcome, _) = run(&vm, Phase::Content, source);
        assert!(
            matches!(outcome, Outcome::Failed { kind: FailureKind::Timeout, .. }),
            "a light thread spends the request's CPU budget: {source}: {outcome:?}"
        );
    }
    let (outcome, _) = run(&vm, Phase::HeaderFilter, "ngx.thread.spawn(function() end)");
    assert!(matches!(outcome, Outcome::Failed { .. }), "no light threads while the response streams");
}

/// A line server on loopback: answers each line with `echo: LINE`, `bye` closes, `silent`
/// answers nothing, `parts` sends three parts split by `--xyz`, `blob` sends 10 bytes then
/// closes.
async fn line_server() -> std::net::SocketAddr {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::task::spawn_local(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::task::spawn_local(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match line.as_str() {
                        "bye" => return,
                        "silent" => {}
                        "parts" => {
                            let _ = write.write_all(b"preamble--xyzpart one--xyzpart two--xyz").await;
                        }
                        "blob" => {
                            let _ = write.write_all(b"0123456789").await;
                            return;
                        }
                        _ => {
                            let _ = write.write_all(format!("echo: {line}\r\n").as_bytes()).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn cosockets_talk_to_a_real_server_and_reuse_connections() {
    let vm = vm();
    block_on(async {
        let addr = line_server().await;
        let port = addr.port();
        let run_content = |source: String| {
            let request = vm.begin(head("/"), headers()).expect("request");
            let vm = &vm;
            async move {
                let outcome = vm.run(&request, Phase::Content, &[script(&source)]).await;
                assert_eq!(outcome, Outcome::Continue, "{source}: {}", output(&request));
                output(&request)
            }
        };
        let out = run_content(format!(
            r#"local sock = ngx.socket.tcp()
            sock:settimeout(1000)
            ngx.say(sock:connect("127.0.0.1", {port}))
            ngx.say(sock:send({{"hello", " ", 42, "\n"}}))
            ngx.say(sock:receive())
            sock:send("abc\n")
            ngx.say(sock:receive(5), "|", sock:receive("*l"))
            sock:send("xyz\n")
            ngx.say(sock:receiveany(3), "|", sock:receiveany(100))
            ngx.say(sock:getreusedtimes(), " ", sock:setkeepalive())
            local again = ngx.socket.tcp()
            again:connect("127.0.0.1", {port})
            ngx.say("reused ", again:getreusedtimes())
            again:send("still there\n")
            ngx.say(again:receive())
            again:setkeepalive()"#
        ))
        .await;
        assert_eq!(out, "1\n9\necho: hello 42\necho:| abc\nech|o: xyz\r\n\n0 1\nreused 1\necho: still there\n");

        let out = run_content(format!(
            r#"local sock = ngx.socket.tcp()
            sock:connect("127.0.0.1", {port})
            ngx.say("next request reuses: ", sock:getreusedtimes())
            sock:settimeout(50)
            sock:send("silent\n")
            local data, err, partial = sock:receive()
            ngx.say(data, " ", err, " [", partial, "]")
            sock:send("blob\n")
            ngx.say(sock:receive(4))
            ngx.say(sock:receive(100))
            ngx.say(sock:receive())
            local all = ngx.socket.tcp()
            all:connect("127.0.0.1", {port})
            all:send("blob\n")
            ngx.say(all:receive("*a"))
            ngx.say(all:close())"#
        ))
        .await;
        assert_eq!(
            out, "next request reuses: 2\nnil timeout []\n0123\nnilclosed456789\nnilclosed\n0123456789\n1\n",
            "timeouts keep the connection, the end of the stream gives the partial data"
        );

        let closed_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let out = run_content(format!(
            r#"local sock, err = ngx.socket.connect("127.0.0.1", {closed_port})
            ngx.say(sock, " ", err)
            local s = ngx.socket.tcp()
            ngx.say(s:send("x"))
            ngx.say(pcall(s.send, s, function() end))"#
        ))
        .await;
        assert!(out.starts_with("nil connection refused\nnilclosed\nfalse"), "{out}");
        assert!(out.contains("bad argument #1 to 'send'"), "{out}");
    });
}

/// An HTTP/1.1 server on loopback that answers by path with the body framings `resty.http` must
/// read: chunked (keeps the connection), until close (HTTP/1.0), and a 100 before a 204.
async fn framing_server() -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::task::spawn_local(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::task::spawn_local(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut line = String::new();
                    while stream.read_line(&mut line).await.unwrap_or(0) > 2 {
                        line.clear();
                    }
                    let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
                    let (answer, close): (&[u8], bool) = match path.as_str() {
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Multi: a\r\nX-Multi: b\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
                            false,
                        ),
                        "/continue" => (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", false),
                        _ => (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close", true),
                    };
                    if stream.get_mut().write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn resty_http_reads_every_body_framing() {
    let vm = vm();
    block_on(async {
        let port = framing_server().await;
        let request = vm.begin(head("/"), headers()).expect("request");
        let source = format!(
            r#"local http = require "resty.http"
            local c = http.new()
            assert(c:connect("127.0.0.1", {port}))
            local res = assert(c:request({{ path = "/chunked" }}))
            ngx.say(res.status, " ", res:read_body(), " ", table.concat(res.headers["x-multi"], ","))
            local res2 = assert(c:request({{ path = "/continue" }}))
            ngx.say(res2.status, " ", tostring(res2.has_body), " ", res2:read_body() == "")
            ngx.say(c:set_keepalive())
            local d = http.new()
            local res3 = assert(d:request_uri("http://127.0.0.1:{port}/close"))
            ngx.say(res3.status, " ", res3.body, " ", res3.headers["content-type"], " reused ", d:get_reused_times())
            local e = http.new()
            assert(e:connect("127.0.0.1", {port}))
            -- The until-close connection was not pooled: this one is new.
            ngx.say("pooled ", e:get_reused_times())
            ngx.say(pcall(getmetatable, e))
            ngx.say(http.new():request_uri("ftp:/nope"))"#
        );
        let outcome = vm.run(&request, Phase::Content, &[script(&source)]).await;
        assert_eq!(outcome, Outcome::Continue, "{}", output(&request));
        assert_eq!(
            output(&request),
            "200 hello, world a,b\n204 false true\n1\n200 until close text/plain reused 1\npooled 0\ntruefalse\nnilbad uri: ftp:/nope\n"
        );
    });
}

/// An HTTPS server on loopback with a self-signed certificate for `localhost`: every request
/// gets `200 secure` and the connection stays open. Returns its port and certificate.
async fn tls_server() -> (u16, rustls_pki_types::CertificateDer<'static>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let cert = generated.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::task::spawn_local(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::task::spawn_local(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let mut tls = BufReader::new(tls);
                loop {
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if tls.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    if tls.get_mut().write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, cert)
}

#[test]
fn cosockets_speak_tls_and_verify_certificates() {
    block_on(async {
        let (port, cert) = tls_server().await;
        let untrusting = vm();
        let request = untrusting.begin(head("/"), headers()).expect("request");
        let source = format!(
            r#"local sock = ngx.socket.tcp()
            assert(sock:connect("127.0.0.1", {port}))
            local ok, err = sock:sslhandshake(nil, "localhost")
            ngx.say(ok, " ", string.sub(err, 1, 25))
            local sock2 = ngx.socket.tcp()
            assert(sock2:connect("127.0.0.1", {port}))
            ngx.say(sock2:sslhandshake(nil, "localhost", false))
            sock2:send("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            ngx.say(sock2:receive())
            local res, err2 = require("resty.http").new():request_uri("https://127.0.0.1:{port}/")
            ngx.say(res, " ", string.sub(err2, 1, 25))"#
        );
        let outcome = untrusting.run(&request, Phase::Content, &[script(&source)]).await;
        assert_eq!(outcome, Outcome::Continue, "{}", output(&request));
        assert_eq!(
            output(&request),
            "nil certificate verify failed\ntrue\nHTTP/1.1 200 OK\nnil certificate verify failed\n",
            "an unknown authority is refused unless the Lua turns verification off"
        );

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let trusting =
            Vm::new(LuaConfig { tls_roots: std::sync::Arc::new(roots), ..LuaConfig::default() }).expect("vm");
        let request = trusting.begin(head("/"), headers()).expect("request");
        let source = format!(
            r#"local http = require "resty.http"
            local c = http.new()
            local res = assert(c:request_uri("https://127.0.0.1:{port}/a", {{ ssl_server_name = "localhost" }}))
            ngx.say(res.status, " ", res.body)
            local d = http.new()
            local res2 = assert(d:request_uri("https://127.0.0.1:{port}/b", {{ ssl_server_name = "localhost" }}))
            ngx.say(res2.body, " reused ", d:get_reused_times())
            local plain = ngx.socket.tcp()
            assert(plain:connect("127.0.0.1", {port}))
            ngx.say("plain pool reused ", plain:getreusedtimes())"#
        );
        let outcome = trusting.run(&request, Phase::Content, &[script(&source)]).await;
        assert_eq!(outcome, Outcome::Continue, "{}", output(&request));
        assert_eq!(
            output(&request),
            "200 secure\nsecure reused 1\nplain pool reused 0\n",
            "a trusted authority verifies; pooled TLS connections are reused, never handed to plain connects"
        );
    });
}

#[test]
fn receiveuntil_splits_a_stream_at_a_boundary() {
    let vm = vm();
    block_on(async {
        let port = line_server().await.port();
        let request = vm.begin(head("/"), headers()).expect("request");
        let source = format!(
            r#"local sock = ngx.socket.tcp()
            sock:settimeout(100)
            assert(sock:connect("127.0.0.1", {port}))
            sock:send("parts\n")
            local reader = sock:receiveuntil("--xyz")
            ngx.say(reader())
            ngx.say(sock:receiveuntil("--xyz", {{ inclusive = true }})())
            local chunks = {{}}
            while true do
                local data, err = reader(3)
                if not data then chunks[#chunks + 1] = tostring(err) break end
                chunks[#chunks + 1] = data
            end
            ngx.say(table.concat(chunks, "|"))
            ngx.say(reader())
            ngx.say(pcall(sock.receiveuntil, sock, ""))"#
        );
        let outcome = vm.run(&request, Phase::Content, &[script(&source)]).await;
        assert_eq!(outcome, Outcome::Continue, "{}", output(&request));
        let out = output(&request);
        assert!(
            out.starts_with("preamble\npart one--xyz\npar|t t|wo|nil\nniltimeout\nfalse"),
            "plain, inclusive and sized reads, then a timeout: {out}"
        );
        assert!(out.contains("pattern is empty"), "{out}");
    });
}

#[test]
fn waiting_timers_run_premature_when_the_worker_stops() {
    let dicts = crate::SharedDicts::new();
    dicts.configure(&[("ns".into(), "t".into(), 1 << 20)]);
    let vm = Vm::new(LuaConfig { shared_dicts: std::sync::Arc::clone(&dicts), ..LuaConfig::default() }).expect("vm");
    block_on(async {
        let request = vm.begin(head("/"), headers()).expect("request");
        let schedule = script(
            "ngx.timer.at(60, function(premature, what) ngx.shared.t:set(what, tostring(premature)) end, 'at')
             ngx.timer.every(60, function(premature) ngx.shared.t:incr('every', 1, 0) ngx.shared.t:set('every_premature', tostring(premature)) end)
             ngx.say(ngx.timer.pending_count())",
        );
        assert_eq!(vm.run(&request, Phase::Content, &[schedule]).await, Outcome::Continue);
        assert_eq!(output(&request), "2\n");
        let began = Instant::now();
        vm.stop_timers();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let request = vm.begin(head("/"), headers()).expect("request");
        let check = script(
            "ngx.say(ngx.shared.t:get('at'), ' ', ngx.shared.t:get('every'), ' ', ngx.shared.t:get('every_premature'), ' ', ngx.timer.pending_count())
             ngx.say(ngx.timer.at(1, function() end))",
        );
        vm.run(&request, Phase::Content, &[check]).await;
        assert_eq!(
            output(&request),
            "true 1 true 0\nnilprocess exiting\n",
            "both ran once, premature, and nothing new is scheduled"
        );
        assert!(began.elapsed() < Duration::from_secs(1));
    });
}

#[test]
fn collect_garbage_gives_back_what_a_burst_left() {
    let vm = Rc::new(vm());
    let sleeper = script("local t = {} for i = 1, 20 do t[i] = tostring(i) end ngx.sleep(0.01)");
    let _ = run(&vm, Phase::Access, "ngx.sleep(0)");
    block_on(vm.collect_garbage());
    let baseline = vm.used_memory();
    let burst = Rc::clone(&vm);
    block_on(async move {
        let tasks: Vec<_> = (0..4000)
            .map(|_| {
                let (vm, sleeper) = (Rc::clone(&burst), Arc::clone(&sleeper));
                tokio::task::spawn_local(async move {
                    let request = vm.begin(head("/"), headers()).expect("request");
                    vm.run(&request, Phase::Access, &[sleeper]).await
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("task"), Outcome::Continue);
        }
    });
    let left = vm.used_memory();
    assert!(left > baseline + (2 << 20), "the burst left garbage: {left} bytes, {baseline} before");
    block_on(vm.collect_garbage());
    let after = vm.used_memory();
    // What stays: the pool of finished coroutines and the grown reference stack.
    assert!(
        after < baseline + (1 << 20),
        "collected down to {after} bytes ({baseline} before the burst, {left} after)"
    );
}

#[test]
fn cosockets_refuse_denied_ranges_after_resolving_names() {
    // The default refuses link-local (cloud metadata) without sending a packet.
    let vm = vm();
    let (outcome, request) = run(
        &vm,
        Phase::Content,
        r#"local sock = ngx.socket.tcp()
        sock:settimeout(5000)
        ngx.say(sock:connect("169.254.169.254", 80))
        ngx.say(sock:connect("::ffff:169.254.169.254", 80))"#,
    );
    assert_eq!(outcome, Outcome::Continue);
    assert_eq!(output(&request), "nildestination not allowed\nnildestination not allowed\n");

    // A range of the operator's: loopback, reached by address or by name.
    let deny = Arc::new(vec!["127.0.0.0/8".parse().expect("range"), "::1".parse().expect("range")]);
    let vm = Vm::new(LuaConfig { socket_deny: deny, ..LuaConfig::default() }).expect("vm");
    block_on(async {
        let port = line_server().await.port();
        let request = vm.begin(head("/"), headers()).expect("request");
        let source = format!(
            r#"ngx.say(ngx.socket.tcp():connect("127.0.0.1", {port}))
            ngx.say(ngx.socket.tcp():connect("localhost", {port}))"#
        );
        assert_eq!(vm.run(&request, Phase::Content, &[script(&source)]).await, Outcome::Continue);
        assert_eq!(output(&request), "nildestination not allowed\nnildestination not allowed\n");
    });
}

#[test]
fn cosocket_pools_are_per_namespace() {
    let vm = vm();
    block_on(async {
        let port = line_server().await.port();
        let source = format!(
            r#"local sock = ngx.socket.tcp()
            assert(sock:connect("127.0.0.1", {port}, {{ pool = "shared" }}))
            ngx.say(sock:getreusedtimes())
            assert(sock:setkeepalive())"#
        );
        let mut seen = Vec::new();
        for namespace in ["a", "b", "a"] {
            let mut h = head("/");
            h.namespace = namespace.into();
            let request = vm.begin(h, headers()).expect("request");
            assert_eq!(vm.run(&request, Phase::Content, &[script(&source)]).await, Outcome::Continue);
            seen.push(output(&request));
        }
        assert_eq!(seen, ["0\n", "0\n", "1\n"], "namespace b did not get a's pooled connection; a did");
    });
}

/// Tables every request shares hide their metatables, and what they hand out does too: a
/// request that could reach one could change the API for every later request on its worker,
/// other tenants' included.
#[test]
fn no_request_reaches_a_shared_metatable() {
    let (_, vm) = vm_with_declared(&[("ns".into(), "hits".into(), 1 << 20)]);
    let out = say(
        &vm,
        r#"
        local http = require("resty.http")
        local reachable = {}
        for name, value in pairs({
            ngx = ngx, header = ngx.header, var = ngx.var, arg = ngx.arg, shared = ngx.shared,
            dict = ngx.shared.hits, req = ngx.req,
            socket = ngx.socket.tcp(), client = http.new(), cjson = require("cjson"),
            thread = ngx.thread.spawn(function() end), string = "",
        }) do
            local meta = getmetatable(value)
            if type(meta) == "table" and pcall(function() meta.__index = nil end) then
                reachable[#reachable + 1] = name
            end
        end
        table.sort(reachable)
        ngx.say("writable: ", table.concat(reachable, " "))
        "#,
    );
    assert_eq!(out, "writable: \n");
}

/// A request's `ngx` is its namespace's own, for `ngx.shared`; everything else reads and writes
/// through to the VM's.
#[test]
fn a_namespace_ngx_reads_and_writes_through_to_the_vms() {
    let (_, vm) = vm_with_declared(&[("ns".into(), "hits".into(), 1 << 20), (String::new(), "global".into(), 1 << 20)]);
    let out = say(
        &vm,
        r#"
        ngx.status = 418
        ngx.ctx.a = 1
        ngx.custom = "c"
        local replaced = pcall(function() ngx.shared = {} end)
        local set = pcall(function() ngx.shared.hits = 1 end)
        local added = pcall(function() ngx.shared.new = 1 end)
        ngx.say(ngx.status, " ", ngx.ctx.a, " ", ngx.custom, " ", replaced, set, added)
        ngx.say(ngx.shared.global:incr("n", 1, 0), " ", tostring(ngx.shared.nope), " ", ngx.HTTP_OK)
        ngx.say(type(ngx.shared.hits.incr), " ", ngx.shared.hits == ngx.shared.hits)
        "#,
    );
    assert_eq!(out, "418 1 c falsefalsefalse\n1 nil 200\nfunction true\n");
    // The next request starts from the VM's state, not this one's.
    assert_eq!(say(&vm, "ngx.say(tostring(ngx.custom), ' ', ngx.status)"), "nil 0\n");
}

/// A handler that uses no global by name runs as one closure per namespace; one that does gets
/// its own per request. Either way each request sees its own state, the globals a request
/// writes stay in it, and `ngx.shared` is its namespace's.
#[test]
fn handlers_without_globals_of_their_own_share_a_closure_per_namespace() {
    let (dicts, vm) = vm_with_declared(&[("ns".into(), "hits".into(), 1 << 20)]);
    let in_namespace = |namespace: &str, phase: Phase, scripts: &[Arc<Script>]| {
        let mut h = head("/p");
        h.namespace = namespace.into();
        let request = vm.begin(h, headers()).expect("request");
        assert_eq!(block_on(vm.run(&request, phase, scripts)), Outcome::Continue);
        output(&request)
    };
    let counting = script(r#"ngx.say(ngx.shared.hits:incr("n", 1, 0), " ", ngx.var.request_uri)"#);
    for n in 1..=3 {
        assert_eq!(in_namespace("ns", Phase::Content, std::slice::from_ref(&counting)), format!("{n} /p\n"));
    }
    assert!(matches!(vm.shared.borrow().get(&counting.id), Some(Some(_))), "shared");

    // The same script from another namespace gets a closure in that namespace's globals.
    let has_hits = script("ngx.say(ngx.shared.hits ~= nil)");
    assert_eq!(in_namespace("ns", Phase::Content, std::slice::from_ref(&has_hits)), "true\n");
    assert_eq!(in_namespace("other", Phase::Content, std::slice::from_ref(&has_hits)), "false\n");
    assert_eq!(in_namespace("ns", Phase::Content, std::slice::from_ref(&has_hits)), "true\n");
    // And another once the dictionaries change.
    dicts.configure(&[("ns".into(), "hits".into(), 1 << 20), ("ns".into(), "more".into(), 1 << 20)]);
    let has_more = script("ngx.say(ngx.shared.more ~= nil, ngx.shared.hits ~= nil)");
    assert_eq!(in_namespace("ns", Phase::Content, std::slice::from_ref(&has_more)), "truetrue\n");

    // A global written, and one read that an earlier handler of the request wrote: their own.
    let writes = script("counter = (counter or 0) + 1\nfrom_access = counter");
    let reads = script("ngx.say(from_access)");
    for _ in 0..2 {
        assert_eq!(in_namespace("ns", Phase::Content, &[Arc::clone(&writes), Arc::clone(&reads)]), "1\n");
    }
    assert!(vm.shared.borrow().get(&writes.id).is_none(), "writes globals: never shared");
    assert!(matches!(vm.shared.borrow().get(&reads.id), Some(None)), "reads a global that is no built-in");
    assert_eq!(in_namespace("ns", Phase::Content, std::slice::from_ref(&reads)), "nil\n");

    // A shared handler's `loadstring` writes into the request's environment, made then, which
    // the request's later handlers read.
    let loads = script(r#"loadstring("from_access = 'loaded'")()"#);
    assert_eq!(in_namespace("ns", Phase::Content, &[Arc::clone(&loads), Arc::clone(&reads)]), "loaded\n");
    assert!(matches!(vm.shared.borrow().get(&loads.id), Some(Some(_))));
    // A request whose handlers are all shared never makes an environment.
    let request = vm.begin(head("/p"), headers()).expect("request");
    assert_eq!(block_on(vm.run(&request, Phase::Content, std::slice::from_ref(&counting))), Outcome::Continue);
    assert!(request.env.borrow().is_none(), "no environment made");
}

/// A long run is preempted every slice: a task of the same worker that wants a turn every
/// millisecond gets it while a handler spins, and the handler still ends at its budget.
#[test]
fn a_spinning_handler_leaves_the_worker_to_other_tasks() {
    let vm = Rc::new(vm_with(Duration::from_millis(300), 64 << 20));
    block_on(async {
        let spinner = {
            let vm = Rc::clone(&vm);
            tokio::task::spawn_local(async move {
                let request = vm.begin(head("/"), headers()).expect("request");
                let started = Instant::now();
                let outcome = vm.run(&request, Phase::Content, &[script("while true do end")]).await;
                (outcome, started.elapsed())
            })
        };
        tokio::task::yield_now().await;
        let mut longest = Duration::ZERO;
        for _ in 0..100 {
            let asked = Instant::now();
            tokio::time::sleep(Duration::from_millis(1)).await;
            longest = longest.max(asked.elapsed());
        }
        let (outcome, took) = spinner.await.expect("spinner");
        assert!(matches!(outcome, Outcome::Failed { kind: FailureKind::Timeout, .. }), "{outcome:?}");
        assert!(took >= Duration::from_millis(300), "its budget is Lua time, slices added up: {took:?}");
        // Without slices the first wait would have been the whole 300 ms budget.
        assert!(longest < Duration::from_millis(20), "another task waited {longest:?}");
        let used = vm.namespace_use();
        assert!(used.iter().any(|(ns, u)| &**ns == "ns" && u.preemptions > 100), "{used:?}");
    });
}

/// A preemption inside a coroutine the handler made is invisible to the handler: the
/// coroutine's caller sees only what the coroutine yields and returns.
#[test]
fn preemption_inside_user_coroutines_is_invisible() {
    let vm = vm_with(Duration::from_secs(10), 64 << 20);
    let out = say(
        &vm,
        r#"
        local function busy(n) local s = 0 for i = 1, n do s = s + i % 7 end return s end
        local co = coroutine.create(function(a)
            local got = coroutine.yield(busy(a))
            return busy(got) > 0 and "done"
        end)
        local ok1, first = coroutine.resume(co, 3e6)
        local ok2, second = coroutine.resume(co, 3e6)
        local gen = coroutine.wrap(function() for i = 1, 3 do busy(1e6) coroutine.yield(i) end end)
        local nested = coroutine.wrap(function()
            local inner = coroutine.wrap(function() busy(2e6) return "inner" end)
            return inner() .. " outer"
        end)
        ngx.say(ok1, " ", first, " ", ok2, " ", second, " ", coroutine.status(co), " ", gen(), gen(), gen(), " ", nested())
        "#,
    );
    assert_eq!(out, "true 8999997 true done dead 123 inner outer\n");
    let used = vm.namespace_use();
    assert!(used.iter().any(|(_, u)| u.preemptions > 0), "the busy loops were preempted: {used:?}");
}

/// An `every` timer that exhausts its budget run after run is backed off, then cancelled.
#[test]
fn a_timer_that_keeps_exhausting_its_budget_is_cancelled() {
    let dicts = crate::SharedDicts::new();
    dicts.configure(&[("ns".into(), "t".into(), 1 << 20)]);
    let config = LuaConfig {
        shared_dicts: std::sync::Arc::clone(&dicts),
        cpu_budget: Duration::from_millis(20),
        ..LuaConfig::default()
    };
    let vm = Rc::new(Vm::new(config).expect("vm"));
    block_on(async {
        let request = vm.begin(head("/"), headers()).expect("request");
        let every = script("ngx.timer.every(0.01, function() ngx.shared.t:incr('runs', 1, 0) while true do end end)");
        assert_eq!(vm.run(&request, Phase::Content, &[every]).await, Outcome::Continue);
        // Runs at 10 ms, then backed off by 0.2, 0.4, 0.8 and 1.6 s: five runs in about 3.2 s.
        let runs = || async {
            let request = vm.begin(head("/"), headers()).expect("request");
            let read = script("ngx.say(ngx.shared.t:get('runs'), ' ', ngx.timer.pending_count())");
            vm.run(&request, Phase::Content, &[read]).await;
            output(&request)
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let early = runs().await;
        // (Pending is 0 while a run is in progress.)
        assert!(
            early.starts_with("3 ") || early.starts_with("4 "),
            "backed off: {early:?} (runs, pending) after 1.5 s"
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(runs().await, "5 0\n", "cancelled after five, not waiting");
        let used = vm.namespace_use();
        assert!(used.iter().any(|(ns, u)| &**ns == "ns" && u.timers_cancelled == 1), "{used:?}");
    });
}

/// Once the VM is half full, the requests of one namespace in flight may hold at most half
/// of it: past that, the allocation fails that namespace's request only, and another namespace
/// still has room. Garbage churn far past the limit still succeeds.
#[test]
fn memory_under_pressure_is_shared_out_by_namespace() {
    let vm = Rc::new(vm_with(Duration::from_secs(10), 64 << 20));
    let in_namespace = |namespace: &str| RequestHead { namespace: namespace.into(), ..head("/") };
    // 1 MiB buffers kept alive in a table.
    let hold = |mib: u32, then: &str| {
        script(&format!("local t = {{}} for i = 1, {mib} do t[i] = buffer.create(1048576) end {then} ngx.say(#t)"))
    };
    block_on(async {
        let churn =
            script("local n = 0 for i = 1, 300 do local s = string.rep('x', 1048576) .. i n = n + #s end ngx.say(n)");
        {
            let request = vm.begin(in_namespace("a"), headers()).expect("request");
            assert_eq!(vm.run(&request, Phase::Content, &[churn]).await, Outcome::Continue, "300 MiB of garbage");
        }
        // (Garbage collected during a run is credited to that run, whoever made it.)
        vm.collect_garbage().await;

        // `a` holds 22 MiB in one request while it sleeps: a second request of `a` cannot
        // take 22 more (past 32 MiB for the namespace once the heap is past 32), one of `b` can.
        let sleeper = {
            let vm = Rc::clone(&vm);
            let request = vm.begin(in_namespace("a"), headers()).expect("request");
            tokio::task::spawn_local(
                async move { vm.run(&request, Phase::Content, &[hold(22, "ngx.sleep(0.3)")]).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // (Each request ends, as the proxy ends them, before the next starts.)
        let run = |namespace: &str, script: Arc<Script>| {
            let vm = Rc::clone(&vm);
            let request = vm.begin(in_namespace(namespace), headers()).expect("request");
            async move { vm.run(&request, Phase::Content, &[script]).await }
        };
        let outcome = run("a", hold(22, "")).await;
        assert!(matches!(outcome, Outcome::Failed { kind: FailureKind::Memory, .. }), "a over its half: {outcome:?}");
        assert_eq!(run("b", hold(22, "")).await, Outcome::Continue, "b has room");
        assert_eq!(sleeper.await.expect("sleeper"), Outcome::Continue, "the first of a goes on");
        // Once it ended, `a` has its share back.
        assert_eq!(run("a", hold(22, "")).await, Outcome::Continue);
    });
}

/// The FFI libraries of OpenResty, built in under their names: digests, hex, random bytes,
/// base64url, and LuaJIT's table extensions.
#[test]
fn resty_libraries_built_in_run_unchanged() {
    let vm = vm();
    let out = say(
        &vm,
        r#"
        local str = require "resty.string"
        local resty_sha256 = require "resty.sha256"
        local sha256 = resty_sha256:new()
        sha256:update("hello ")
        sha256:update("world")
        ngx.say(str.to_hex(sha256:final()))
        local md5 = (require "resty.md5"):new()
        md5:update("hello world")
        ngx.say(str.to_hex(md5:final()))
        local sha1 = (require "resty.sha1"):new()
        sha1:update("x") sha1:reset() sha1:update("hello world")
        ngx.say(str.to_hex(sha1:final()))
        ngx.say(#str.to_hex((require "resty.sha512"):new():final()), " ", str.atoi(" 42 "))
        local random = require "resty.random"
        local a, b = random.bytes(16, true), random.bytes(16)
        ngx.say(#a, " ", #b, " ", a ~= b)
        local b64 = require "ngx.base64"
        local e = b64.encode_base64url("\255\254?>")
        ngx.say(e, " ", b64.decode_base64url(e) == "\255\254?>", " ", select(2, b64.decode_base64url("*")))
        local new_tab, clear_tab = require "table.new", require "table.clear"
        local t = new_tab(10, 0)
        t[1], t.x = 1, 2
        ngx.say(table.nkeys(t), " ", table.isempty(t), " ", require("table.isempty")({}))
        clear_tab(t)
        ngx.say(table.nkeys(t), " ", type(require "resty.core"))
        "#,
    );
    assert_eq!(
        out,
        "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9\n\
         5eb63bbbe01eeed093cb22bb8f5acdc3\n\
         2aae6c35c94fcfb415dbe95f408b9ce91ee846ed\n\
         128 42\n\
         16 16 true\n\
         __4_Pg true invalid input\n\
         2 false true\n\
         0 table\n"
    );
}

#[test]
fn a_semaphore_hands_resources_between_a_request_and_its_timer() {
    let vm = vm();
    let (outcome, request) = run(
        &vm,
        Phase::Content,
        r#"
        local semaphore = require "ngx.semaphore"
        local sema = assert(semaphore.new(0))
        ngx.say("count ", sema:count())
        local ok, err = sema:wait(0)
        ngx.say("no wait: ", tostring(ok), " ", err)
        assert(ngx.timer.at(0.02, function() sema:post(2) end))
        local started = ngx.now()
        ngx.update_time()
        ok, err = sema:wait(1)
        ngx.say("posted: ", tostring(ok), " ", tostring(err))
        ngx.say("left ", sema:count())
        ok, err = sema:wait(0.02)
        ngx.say("again: ", tostring(ok))
        ok, err = sema:wait(0.02)
        ngx.say("timed out: ", tostring(ok), " ", err)
        ngx.say(require("ngx.process").type())
        "#,
    );
    assert_eq!(outcome, Outcome::Continue);
    assert_eq!(
        output(&request),
        "count 0\nno wait: nil timeout\nposted: true nil\nleft 1\nagain: true\ntimed out: nil timeout\nworker\n"
    );
}
