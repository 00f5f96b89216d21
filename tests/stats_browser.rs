//! The stats page in a real browser: headless Debian `chromium` loads it
//! from `demo --serve` while traffic flows, and the rendered DOM (after
//! the scripts ran) shows the services, their endpoints, the dead one
//! ejected, and a rate that changes between two reads.
//!
//! Without chromium: fails when `CI` is set (CI must run it), skips with a
//! printed reason otherwise.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::procs::{free_port, BIN};
use kube_userspace_proxy::demo::{DEAD_BACKEND, LIVE_BACKENDS, NODE_PORT};

/// The browser's path, or `None` (after printing why) when the test may
/// skip; panics in CI.
fn chromium(test: &str) -> Option<String> {
    for name in ["chromium", "chromium-browser"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()
            .filter(|o| o.status.success());
        if let Some(o) = found {
            return Some(String::from_utf8_lossy(&o.stdout).trim().to_string());
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: `chromium` is missing (apt-get install chromium) and CI must run it");
    }
    eprintln!("SKIPPED {test}: needs `chromium` (apt-get install chromium)");
    None
}

/// `demo --serve`, killed on drop.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `demo --serve` with its metrics on `metrics`; returns it and the
/// stats page URL it printed.
fn start_demo(metrics: SocketAddr) -> (Demo, String) {
    let mut child = Command::new(BIN)
        .args(["demo", "--serve", "--metrics-bind-address"])
        .arg(metrics.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let demo = Demo(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = String::new();
    let url = loop {
        let Some(Ok(line)) = lines.next() else {
            panic!("demo ended before printing the stats URL:\n{seen}");
        };
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line.strip_prefix("stats:") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining so the demo never blocks on a full pipe.
    thread::spawn(move || for _ in lines {});
    (demo, url)
}

/// Requests through the demo's nodePort on two threads, as fast as they
/// answer, until dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Traffic {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..2)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = get(SocketAddr::from(([127, 0, 0, 1], NODE_PORT)));
                        thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The DOM after the page's scripts ran for `budget_ms` of virtual time
/// (timers fast-forwarded; fetches are real).
fn dump_dom(chromium: &str, url: &str, budget_ms: u64) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1200,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium --dump-dom {url} took over 90 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// The opening tag that carries `needle` (e.g. `data-addr="1.2.3.4:80"`).
fn tag_with<'a>(html: &'a str, needle: &str) -> &'a str {
    let at = html
        .find(needle)
        .unwrap_or_else(|| panic!("no {needle} in the page:\n{html}"));
    let start = html[..at].rfind('<').unwrap();
    let end = at + html[at..].find('>').unwrap();
    &html[start..=end]
}

/// The value of attribute `name` in `tag`.
fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let key = format!(" {name}=\"");
    let at = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {tag}"))
        + key.len();
    &tag[at..at + tag[at..].find('"').unwrap()]
}

/// The HTML of the service card `key` (up to the next card).
fn card<'a>(html: &'a str, key: &str) -> &'a str {
    let needle = format!("data-key=\"{key}\"");
    let at = html
        .find(&needle)
        .unwrap_or_else(|| panic!("no service {key} on the page:\n{html}"));
    let end = html[at..].find("<section").map_or(html.len(), |e| at + e);
    &html[at..end]
}

/// A rate cell of the card's "all endpoints" row as (value, peak, total).
fn total_rate(card: &str, rate: &str) -> (f64, f64, u64) {
    let row = &card[card.find("data-row=\"total\"").unwrap()..];
    let tag = tag_with(row, &format!("data-rate=\"{rate}\""));
    let num = |n: &str| attr(tag, n).parse::<f64>().unwrap_or(0.0);
    (
        num("data-value"),
        num("data-peak"),
        attr(tag, "data-total").parse().unwrap(),
    )
}

fn samples(html: &str) -> u64 {
    attr(tag_with(html, "id=\"live\""), "data-samples")
        .parse()
        .unwrap()
}

const HELLO: &str = "demo/hello:http/TCP";

#[test]
fn browser_shows_services_endpoints_the_ejected_pod_and_live_rates() {
    let test = "browser_shows_services_endpoints_the_ejected_pod_and_live_rates";
    let Some(chromium) = chromium(test) else {
        return;
    };
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (_demo, url) = start_demo(metrics);
    assert_eq!(url, format!("http://{metrics}/"));

    // First read, under traffic. The dead pod's back-off doubles (1, 2,
    // 4 s, ...) and every expiry meets a connection that is refused at
    // once: under steady traffic it is ejected all but an instant.
    // (Between an expiry and that refusal it shows "ready" for a few ms:
    // should the last sample fall there, one more read.)
    let traffic = Traffic::start();
    thread::sleep(Duration::from_secs(4));
    let dead_row = format!("data-addr=\"127.0.0.1:{DEAD_BACKEND}\"");
    let mut busy = dump_dom(&chromium, &url, 5000);
    if attr(tag_with(&busy, &dead_row), "data-state") != "ejected" {
        busy = dump_dom(&chromium, &url, 5000);
    }
    drop(traffic);
    assert!(samples(&busy) >= 2, "too few samples:\n{busy}");
    assert!(busy.contains("data-key=\"demo/dns:dns/UDP\""), "{busy}");
    let hello = card(&busy, HELLO);
    for (port, _) in LIVE_BACKENDS {
        let row = tag_with(hello, &format!("data-addr=\"127.0.0.1:{port}\""));
        assert_eq!(attr(row, "data-state"), "ready", "{row}");
    }
    let dead = tag_with(hello, &dead_row);
    assert_eq!(attr(dead, "data-state"), "ejected", "{dead}");
    let left: u64 = attr(dead, "data-left-ms").parse().unwrap();
    assert!(left > 0, "{dead}");
    assert!(
        hello.contains(">ejected "),
        "no 'ejected N s' badge:\n{hello}"
    );
    let (_, peak, accepted_busy) = total_rate(hello, "conns");
    assert!(peak > 0.0, "connection rate 0 under traffic:\n{hello}");
    let (_, bytes_peak, _) = total_rate(hello, "out");
    assert!(bytes_peak > 0.0, "{hello}");
    let (_, _, retries) = total_rate(hello, "retries");
    assert!(retries >= 2, "retries: {retries}");
    eprintln!(
        "busy read: {} samples, dead endpoint ejected for {left} ms more, {retries} retries, \
         {accepted_busy} connections, peak {peak:.0}/s",
        samples(&busy)
    );

    // Second read, once traffic stopped: the same rate is down to zero.
    thread::sleep(Duration::from_millis(1500));
    let quiet = dump_dom(&chromium, &url, 3000);
    assert!(samples(&quiet) >= 2, "too few samples:\n{quiet}");
    let hello = card(&quiet, HELLO);
    let (conns, _, accepted_quiet) = total_rate(hello, "conns");
    assert!(accepted_quiet >= accepted_busy);
    assert_eq!(conns, 0.0, "no traffic, yet a connection rate:\n{hello}");
    eprintln!(
        "quiet read: {} samples, {accepted_quiet} connections, {conns}/s",
        samples(&quiet)
    );
}
