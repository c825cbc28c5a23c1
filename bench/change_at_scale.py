"""Applying a change at scale: tidegate vs nginx (run through bench/change_at_scale.sh).

For each count N: N Ingresses, each its own host with two paths, all to one upstream.
- tidegate (standalone, 2 workers): time from writing a manifest with a new Ingress to its host
  answering 200, and the proxy's RSS.
- nginx (2 workers): the equivalent N server blocks; time from writing the new server block,
  through `nginx -t` and `nginx -s reload`, to the host answering 200, and RSS (master and
  workers).
Rounds alternate tidegate and nginx; medians are reported. Loopback only; every wait is bounded.

With SCENARIO=annotations, tidegate runs twice instead, side by side: with plain Ingresses, and
with Ingresses that carry the annotations migrants typically set (a regex path with
rewrite-target, Basic auth from a Secret, an allowlist, a body limit, a rate limit, timeouts);
the table gives each one's change time and RSS, and the annotated ones over the plain ones.
"""

import datetime
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BIN, UPSTREAM = sys.argv[1], sys.argv[2]
COUNTS = [int(n) for n in sys.argv[3:]] or [100, 1000, 10000]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
TIDEGATE, TIDEGATE_ADMIN, NGINX = ("127.0.0.1", 18280), ("127.0.0.1", 19920), ("127.0.0.1", 18281)
# The annotated tidegate of SCENARIO=annotations.
ANNOTATED, ANNOTATED_ADMIN = ("127.0.0.1", 18282), ("127.0.0.1", 19921)
SCENARIO = os.environ.get("SCENARIO", "nginx")


def status(addr, host, path="/a", timeout=1.0, authorization=None):
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            extra = f"Authorization: {authorization}\r\n" if authorization else ""
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
            head = s.recv(64).decode(errors="replace")
            return int(head.split(" ")[1]) if head.startswith("HTTP/") else 0
    except (OSError, ValueError, IndexError):
        return 0


def until_200(addr, host, limit, authorization=None):
    """Milliseconds until `host` answers 200, polling every millisecond; fails after `limit` s."""
    started = time.monotonic()
    while status(addr, host, authorization=authorization) != 200:
        if time.monotonic() - started > limit:
            raise SystemExit(f"{host} did not answer 200 on {addr} within {limit} s")
        time.sleep(0.001)
    return (time.monotonic() - started) * 1000


def rss_mib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += sum(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return total / 1024


ANNOTATIONS = ("{nginx.ingress.kubernetes.io/use-regex: \"true\", nginx.ingress.kubernetes.io/rewrite-target: /$2, "
               "nginx.ingress.kubernetes.io/auth-type: basic, nginx.ingress.kubernetes.io/auth-secret: users, "
               "nginx.ingress.kubernetes.io/auth-realm: bench, nginx.ingress.kubernetes.io/whitelist-source-range: \"127.0.0.0/8, 10.0.0.0/8\", "
               "nginx.ingress.kubernetes.io/proxy-body-size: 8m, nginx.ingress.kubernetes.io/limit-rps: \"100000\", "
               "nginx.ingress.kubernetes.io/proxy-read-timeout: \"120\"}")
# An apr1 line, as migrants' htpasswd Secrets hold them (user bench, password bench).
AUTHORIZATION = "Basic YmVuY2g6YmVuY2g="


def users():
    hashed = subprocess.run(["openssl", "passwd", "-apr1", "bench"], capture_output=True, text=True, check=True)
    return "bench:" + hashed.stdout.strip()


def ingress(name, host, annotated=False):
    if annotated:
        paths = "".join(
            f"      - {{path: \"/{p}(/|$)(.*)\", pathType: ImplementationSpecific, backend: {{service: {{name: upstream, port: {{number: 80}}}}}}}}\n"
            for p in ("a", "b")
        )
        meta = f"{{name: {name}, namespace: bench, annotations: {ANNOTATIONS}}}"
    else:
        paths = "".join(
            f"      - {{path: /{p}, pathType: Prefix, backend: {{service: {{name: upstream, port: {{number: 80}}}}}}}}\n"
            for p in ("a", "b")
        )
        meta = f"{{name: {name}, namespace: bench}}"
    return (f"---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {meta}\n"
            f"spec:\n  ingressClassName: tidegate\n  rules:\n  - host: {host}\n    http:\n      paths:\n{paths}")


def server(host):
    return (f"server {{ listen {NGINX[0]}:{NGINX[1]}; server_name {host};\n"
            f"  location /a {{ proxy_pass http://up; }} location /b {{ proxy_pass http://up; }} }}\n")


def tidegate_run(work, n, annotated=False, addr=TIDEGATE, admin=TIDEGATE_ADMIN, https=18643):
    manifests = os.path.join(work, f"tidegate-{n}{'-annotated' if annotated else ''}")
    os.makedirs(manifests)
    host, port = UPSTREAM.split(":")
    with open(os.path.join(manifests, "upstream.yaml"), "w") as f:
        f.write(f"apiVersion: v1\nkind: Service\nmetadata: {{name: upstream, namespace: bench}}\n"
                f"spec: {{ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n---\n"
                f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: upstream-1\n  namespace: bench\n"
                f"  labels: {{kubernetes.io/service-name: upstream}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\n"
                f"endpoints: [{{addresses: [\"{host}\"], conditions: {{ready: true}}}}]\n")
        if annotated:
            f.write(f"---\napiVersion: v1\nkind: Secret\nmetadata: {{name: users, namespace: bench}}\n"
                    f"stringData: {{auth: '{users()}'}}\n")
    # Files of 500 Ingresses, as a generated folder might hold them.
    for start in range(0, n, 500):
        with open(os.path.join(manifests, f"ingresses-{start // 500:03}.yaml"), "w") as f:
            f.write("".join(ingress(f"h{i}", f"h{i}.bench", annotated) for i in range(start, min(n, start + 500))))
    log = open(manifests + ".log", "w")
    proc = subprocess.Popen([BIN, "standalone", "--manifests", manifests, "--workers", "2", "--no-access-log",
                             "--http-addr", "%s:%d" % addr, "--https-addr", f"127.0.0.1:{https}",
                             "--admin-addr", "%s:%d" % admin], stdout=subprocess.DEVNULL, stderr=log,
                            # A session of its own, as nginx daemonized has (see bench/lib.sh).
                            start_new_session=True)
    return proc, manifests


def nginx_run(work, n):
    prefix = os.path.join(work, f"nginx-{n}")
    os.makedirs(prefix)
    with open(os.path.join(prefix, "servers.conf"), "w") as f:
        f.write("".join(server(f"h{i}.bench") for i in range(n)))
    open(os.path.join(prefix, "new.conf"), "w").close()
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"worker_processes 2;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
                f"events {{ worker_connections 4096; }}\n"
                f"http {{\n  access_log off;\n  server_names_hash_max_size 65536;\n  server_names_hash_bucket_size 128;\n"
                f"  upstream up {{ server {UPSTREAM}; keepalive 32; }}\n"
                f"  proxy_http_version 1.1; proxy_set_header Connection \"\";\n"
                f"  include {prefix}/servers.conf;\n  include {prefix}/new.conf;\n}}\n")
    subprocess.run(["nginx", "-p", prefix, "-c", conf, "-e", f"{prefix}/error.log"], check=True)
    return prefix, conf


def nginx_pids(prefix):
    master = int(open(os.path.join(prefix, "nginx.pid")).read())
    children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [master] + [int(c) for c in children]


def annotations_main():
    """Plain and annotated Ingresses, two tidegates side by side, rounds alternating."""
    rows = []
    work = tempfile.mkdtemp(prefix="tidegate-scale-")
    for n in COUNTS:
        limit = 60 + n / 50
        plain, plain_dir = tidegate_run(work, n)
        annotated, annotated_dir = tidegate_run(work, n, True, ANNOTATED, ANNOTATED_ADMIN, 18644)
        try:
            until_200(TIDEGATE, f"h{n - 1}.bench", limit)
            until_200(ANNOTATED, f"h{n - 1}.bench", limit, AUTHORIZATION)
            time.sleep(1)
            rss = (rss_mib([plain.pid]), rss_mib([annotated.pid]))
            times = ([], [])
            for r in range(ROUNDS):
                order = [0, 1] if r % 2 == 0 else [1, 0]
                for which in order:
                    host = f"new-{which}-{r}.bench"
                    folder = (plain_dir, annotated_dir)[which]
                    path = os.path.join(folder, f"new-{r}.yaml")
                    with open(path + ".tmp", "w") as f:
                        f.write(ingress(f"new{r}", host, which == 1))
                    started = time.monotonic()
                    os.rename(path + ".tmp", path)
                    until_200((TIDEGATE, ANNOTATED)[which], host, limit, (None, AUTHORIZATION)[which])
                    times[which].append((time.monotonic() - started) * 1000)
                    time.sleep(1)
            rows.append((n, statistics.median(times[0]), statistics.median(times[1]), rss[0], rss[1]))
            print(f"{n} Ingresses: plain {times[0]} ms, {rss[0]:.0f} MiB; annotated {times[1]} ms, {rss[1]:.0f} MiB", file=sys.stderr)
        finally:
            for proc in (plain, annotated):
                proc.terminate()
                proc.wait(timeout=60)
    print(f"Applying a change at scale with annotations, {datetime.date.today()} (`SCENARIO=annotations ROUNDS={ROUNDS} "
          f"bench/change_at_scale.sh {' '.join(map(str, COUNTS))}`): two tidegates side by side on {os.cpu_count()} cores, "
          f"{ROUNDS} changes each, alternating, medians. Annotated: every Ingress has a regex path with rewrite-target, "
          "Basic auth from a Secret, an allowlist, a body limit, a rate limit and a read timeout (its new host answers 200 "
          "with the password).\n")
    print("| Ingresses | plain change | annotated change | annotated / plain | plain RSS | annotated RSS | annotated / plain |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, t, a, tr, ar in rows:
        print(f"| {n:,} | {t:.0f} ms | {a:.0f} ms | {a / t:.2f}× | {tr:.0f} MiB | {ar:.0f} MiB | {ar / tr:.2f}× |")


def main():
    if SCENARIO == "annotations":
        return annotations_main()
    rows = []
    work = tempfile.mkdtemp(prefix="tidegate-scale-")
    for n in COUNTS:
        limit = 60 + n / 50
        proc, manifests = tidegate_run(work, n)
        try:
            until_200(TIDEGATE, f"h{n - 1}.bench", limit)
            time.sleep(1)
            t_rss = rss_mib([proc.pid])
            prefix, conf = nginx_run(work, n)
            until_200(NGINX, f"h{n - 1}.bench", limit)
            time.sleep(1)
            n_rss = rss_mib(nginx_pids(prefix))
            t_ms, n_ms = [], []
            for r in range(ROUNDS):
                order = ["tidegate", "nginx"] if r % 2 == 0 else ["nginx", "tidegate"]
                for target in order:
                    host = f"new-{target}-{r}.bench"
                    if target == "tidegate":
                        path = os.path.join(manifests, f"new-{r}.yaml")
                        with open(path + ".tmp", "w") as f:
                            f.write(ingress(f"new{r}", host))
                        started = time.monotonic()
                        os.rename(path + ".tmp", path)
                        until_200(TIDEGATE, host, limit)
                        t_ms.append((time.monotonic() - started) * 1000)
                    else:
                        with open(os.path.join(prefix, "new.conf"), "a") as f:
                            f.write(server(host))
                        started = time.monotonic()
                        subprocess.run(["nginx", "-t", "-q", "-p", prefix, "-c", conf], check=True)
                        subprocess.run(["nginx", "-s", "reload", "-p", prefix, "-c", conf], check=True)
                        until_200(NGINX, host, limit)
                        n_ms.append((time.monotonic() - started) * 1000)
                        # The old workers finish and exit before the next measurement, so they
                        # do not take CPU from it.
                        settle = time.monotonic()
                        while len(nginx_pids(prefix)) > 3 and time.monotonic() - settle < 30:
                            time.sleep(0.05)
                    time.sleep(1)
            rows.append((n, statistics.median(t_ms), statistics.median(n_ms), t_rss, n_rss))
            print(f"{n} Ingresses: tidegate {t_ms} ms, {t_rss:.0f} MiB; nginx {n_ms} ms, {n_rss:.0f} MiB", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            pid = os.path.join(work, f"nginx-{n}", "nginx.pid")
            if os.path.exists(pid):
                subprocess.run(["nginx", "-s", "stop", "-p", os.path.dirname(pid), "-c", os.path.join(os.path.dirname(pid), "nginx.conf")])
    print(f"Applying a change at scale, {datetime.date.today()} (`ROUNDS={ROUNDS} bench/change_at_scale.sh {' '.join(map(str, COUNTS))}`): "
          f"{os.cpu_count()} cores shared by the proxies, the upstream and the poller; {ROUNDS} changes each, alternating, medians.")
    print("tidegate: a new manifest file with one Ingress until its host answers 200. nginx: the new `server` block, "
          "`nginx -t`, `nginx -s reload`, until its host answers 200. RSS with N Ingresses loaded (nginx: master and workers).\n")
    print("| Ingresses | tidegate change | nginx change | tidegate / nginx | tidegate RSS | nginx RSS |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, t, g, tr, gr in rows:
        print(f"| {n:,} | {t:.0f} ms | {g:.0f} ms | {t / g:.2f}× | {tr:.0f} MiB | {gr:.0f} MiB |")


main()
