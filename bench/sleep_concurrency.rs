//! Load client for `bench/sleep_concurrency.sh`: opens N connections to the proxy, then sends
//! one request on each at once to a route whose access handler sleeps, and reports how long
//! until every response is in, how many were 200, the proxy's memory at the peak (the most
//! its RSS and its Lua heap reached while the requests were in flight, sampled every 2 and 20
//! ms), and the CPU time the proxy spent from the first request to the last answer (user and
//! kernel, in clock ticks: accepting the connections is not counted).
//!
//! Usage: sleep_concurrency ADDR HOST N PROXY_PID ADMIN_ADDR   (loopback only)

use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The process's user and kernel CPU time so far, all threads, in clock ticks.
fn cpu_ticks(pid: &str) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0);
    (field(11), field(12))
}

fn lua_memory(admin: &str) -> u64 {
    let Ok(mut s) = std::net::TcpStream::connect(admin) else { return 0 };
    let _ = std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with("tidegate_lua_memory_bytes{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn exchange(mut stream: TcpStream, request: &'static [u8]) -> Option<u16> {
    stream.write_all(request).await.ok()?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        // The Lua answer is chunked: it ends with the last-chunk marker.
        if buf.ends_with(b"0\r\n\r\n")
            || buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(8).any(|w| w.eq_ignore_ascii_case(b"chunked\r"))
        {
            break;
        }
    }
    let line = std::str::from_utf8(&buf[..buf.iter().position(|b| *b == b'\r')?]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, host, n, pid, admin] = args.as_slice() else {
        eprintln!("usage: sleep_concurrency ADDR HOST N PROXY_PID ADMIN_ADDR");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("address");
    let n: usize = n.parse().expect("count");
    let request: &'static [u8] =
        Box::leak(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes().into_boxed_slice());

    // Connections first, in batches the listen backlog can take.
    let mut streams = Vec::with_capacity(n);
    while streams.len() < n {
        let batch = (n - streams.len()).min(1000);
        let connects: Vec<_> = (0..batch).map(|_| tokio::spawn(TcpStream::connect(addr))).collect();
        for c in connects {
            streams.push(c.await.expect("task").expect("connect"));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (rss_idle, lua_idle) = (rss_kib(pid), lua_memory(admin));

    // The peaks are sampled from another thread for as long as requests are in flight: when
    // every request is in at once depends on how fast the proxy takes them.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (done, pid, admin) = (std::sync::Arc::clone(&done), pid.clone(), admin.clone());
        std::thread::spawn(move || {
            let (mut rss, mut lua) = (0, 0);
            let mut round = 0u32;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                rss = rss.max(rss_kib(&pid));
                // The Lua heap is read over the admin port, less often.
                if round.is_multiple_of(10) {
                    lua = lua.max(lua_memory(&admin));
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (rss, lua)
        })
    };
    let cpu_before = cpu_ticks(pid);
    let started = Instant::now();
    let tasks: Vec<_> = streams.into_iter().map(|s| tokio::spawn(exchange(s, request))).collect();
    let mut ok = 0;
    for t in tasks {
        if t.await.ok().flatten() == Some(200) {
            ok += 1;
        }
    }
    let wall = started.elapsed();
    let cpu_after = cpu_ticks(pid);
    done.store(true, std::sync::atomic::Ordering::Release);
    let (rss_peak, lua_peak) = sampler.join().unwrap_or_default();
    println!(
        "{{\"requests\":{n},\"ok\":{ok},\"wall_ms\":{:.1},\"rss_idle_kib\":{rss_idle},\"rss_peak_kib\":{rss_peak},\"lua_idle_bytes\":{lua_idle},\"lua_peak_bytes\":{lua_peak},\"user_ticks\":{},\"kernel_ticks\":{}}}",
        wall.as_secs_f64() * 1000.0,
        cpu_after.0 - cpu_before.0,
        cpu_after.1 - cpu_before.1,
    );
}
