//! Tenants sharing a worker: one namespace's runaway Lua neither slows nor fails another
//! namespace's requests. One worker, so that both namespaces share it for certain.

mod support;

use std::time::{Duration, Instant};

use support::{H1, Tidegate, admin_get, get, manifest_dir, write_manifest};

/// The tests measure latency on a 2-core machine: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A LuaRoute in `namespace` answering on `host` with a content handler.
fn lua_route(namespace: &str, host: &str, source: &str) -> String {
    let mut out = format!(
        "---\napiVersion: tidegate.dev/v1alpha1\nkind: LuaRoute\nmetadata: {{name: r, namespace: {namespace}}}\nspec:\n  hosts: [{host}]\n  routes:\n  - name: all\n    match: {{path: {{type: Prefix, value: /}}}}\n    lua:\n      content: |\n"
    );
    for line in source.lines() {
        out.push_str(&format!("        {line}\n"));
    }
    out
}

async fn start(manifests: &str, extra: &[&str]) -> (Tidegate, tempfile::TempDir) {
    let dir = manifest_dir();
    write_manifest(dir.path(), "all.yaml", manifests);
    let path = dir.path().to_owned();
    let mut args = vec!["--workers", "1"];
    args.extend_from_slice(extra);
    if !extra.contains(&"--lua-cpu-budget-ms") {
        args.extend(["--lua-cpu-budget-ms", "100"]);
    }
    let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
    let tidegate = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Tidegate::start(&path, &args)
    })
    .await
    .expect("start");
    (tidegate, dir)
}

/// Latencies of `per_connection` sequential GETs on each of `connections` keep-alive
/// connections, sorted, and how many answers were not 200.
async fn load(
    tidegate: &Tidegate,
    host: &'static str,
    connections: usize,
    per_connection: usize,
) -> (Vec<Duration>, usize) {
    let addr = tidegate.http;
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = H1::connect(addr).await.expect("connect");
                let (mut took, mut failed) = (Vec::with_capacity(per_connection), 0);
                for _ in 0..per_connection {
                    let asked = Instant::now();
                    match client.get(host, "/").await {
                        Ok(answer) if answer.status == 200 => {}
                        _ => failed += 1,
                    }
                    took.push(asked.elapsed());
                }
                (took, failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::new(), 0);
    for task in tasks {
        let (took, f) = task.await.expect("client");
        all.extend(took);
        failed += f;
    }
    all.sort();
    (all, failed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn metric(tidegate: &Tidegate, name: &str, namespace: &str) -> f64 {
    let text = admin_get(tidegate.admin, "/metrics").unwrap_or_default();
    let prefix = format!("{name}{{namespace=\"{namespace}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// The case: `ngx.timer.every(0.01, function() while true do end end)`, requested
/// once. Each run is preempted every time slice, so another namespace's requests wait at most
/// a slice behind it; the timer is backed off, then cancelled, and the metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_timer_does_not_slow_another_namespace() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let manifests = [
        lua_route("calm", "calm.test", "ngx.say('ok')"),
        lua_route(
            "spin",
            "spin.test",
            "local ok, err = ngx.timer.every(0.01, function() while true do end end)\nngx.say(ok, ' ', err)",
        ),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests, &[]).await;
    load(&tidegate, "calm.test", 4, 100).await;
    let (idle, failed) = load(&tidegate, "calm.test", 4, 300).await;
    assert_eq!(failed, 0);

    let started = get(tidegate.http, "spin.test", "/").await.expect("spin");
    assert_eq!(&started.body[..], b"true nil\n");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let began = Instant::now();
    let (spinning, failed) = load(&tidegate, "calm.test", 4, 300).await;
    let window = began.elapsed();
    assert_eq!(failed, 0);
    let (idle_p99, spinning_p99) = (percentile(&idle, 0.99), percentile(&spinning, 0.99));
    eprintln!(
        "calm p50/p99 idle {:?}/{idle_p99:?}, beside the spinning timer {:?}/{spinning_p99:?} (over {window:?})",
        percentile(&idle, 0.5),
        percentile(&spinning, 0.5)
    );
    assert!(metric(&tidegate, "tidegate_lua_preemptions_total", "spin") > 0.0 || window < Duration::from_secs(1));
    assert!(spinning_p99 < idle_p99 * 2, "p99 {spinning_p99:?} beside a spinning timer, {idle_p99:?} idle");

    // Five runs that each exhaust their budget, backed off 0.2 + 0.4 + 0.8 + 1.6 s: cancelled.
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(&tidegate, "tidegate_lua_timers_cancelled_total", "spin") < 1.0 {
        assert!(Instant::now() < deadline, "the timer was not cancelled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metric(&tidegate, "tidegate_lua_long_run_seconds_total", "spin") >= 0.4, "five runs of 100 ms");
    assert_eq!(metric(&tidegate, "tidegate_lua_preemptions_total", "calm"), 0.0);
    assert!(
        tidegate
            .logs()
            .iter()
            .any(|l| l.contains("ngx.timer.every cancelled: 5 runs in a row exceeded the CPU budget")),
        "logged"
    );
}

/// While a namespace keeps allocating up to the limit and holding it, another namespace's
/// requests on the same worker all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_does_not_fail_another_namespace() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let manifests = [
        lua_route("calm", "calm.test", "local t = {}\nfor i = 1, 2000 do t[i] = {i, tostring(i)} end\nngx.say(#t)"),
        // Takes all it can (catching the memory error) and holds it for a while, so that the
        // heap stays as full as this namespace can make it while the other one runs.
        lua_route(
            "bomb",
            "bomb.test",
            "local t = {}\npcall(function() for i = 1, 1e9 do t[i] = string.rep('x', 4096) .. i end end)\nngx.sleep(0.3)\nngx.say(#t)",
        ),
    ]
    .concat();
    let (tidegate, _dir) = start(&manifests, &["--lua-memory-limit-mb", "64", "--lua-cpu-budget-ms", "3000"]).await;
    let addr = tidegate.http;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bombs: Vec<_> = (0..4)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            tokio::spawn(async move {
                let (mut answers, mut failed) = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let answer = get(addr, "bomb.test", "/").await.expect("bomb answer");
                    answers += 1;
                    failed += usize::from(answer.status != 200);
                }
                (answers, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (calm, failed) = load(&tidegate, "calm.test", 2, 400).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut bomb_answers, mut bomb_failed) = (0, 0);
    for bomb in bombs {
        let (answers, failed) = bomb.await.expect("bomb");
        bomb_answers += answers;
        bomb_failed += failed;
    }
    eprintln!(
        "calm: {} requests, {failed} failed, p99 {:?}; bomb: {bomb_answers} requests, {bomb_failed} not 200",
        calm.len(),
        percentile(&calm, 0.99)
    );
    assert!(bomb_answers > 0, "the bombs ran");
    assert_eq!(failed, 0, "every request of the other namespace succeeded");
}
