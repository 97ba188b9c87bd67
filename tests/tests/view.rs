//! The live view at `/` of `netd daemon --http`, in a real headless Chromium driven
//! through chromedriver (Debian's chromium and chromium-driver), in a namespace of the
//! test's: it shows the nodes as columns with their tasks, follows an attach and a
//! detach without a reload, and shows the connections per backend rising.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_lab::{load, Lab};
use serde_json::{json, Value};

const HTTP_PORT: u16 = 9440;
const BROWSER_HOST: u8 = 102;
const DRIVER: &str = "http://127.0.0.1:9515";

/// A WebDriver session of chromedriver running in `netns` (the lab's teardown ends
/// both, with everything else in its namespaces).
struct Browser {
    netns: String,
    session: String,
}

impl Browser {
    /// A WebDriver call: `method` on the session's `path` with `body`; its `value`.
    fn call(&self, lab: &Lab, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let url = format!("{DRIVER}/session/{}{path}", self.session);
        call(lab, &self.netns, method, &url, body)
    }

    /// Runs `script` in the page; what it returns.
    fn eval(&self, lab: &Lab, script: &str) -> Result<Value> {
        self.call(
            lab,
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": []})),
        )
    }

    /// Waits (at most 10 s) until `script` returns true.
    fn until(&self, lab: &Lab, what: &str, script: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.eval(lab, script)? != Value::Bool(true) {
            if Instant::now() > deadline {
                let page = self.eval(lab, "return document.body.innerText")?;
                bail!("not within 10 s: {what}; the page says:\n{page}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Each task card shown, as `task@node`.
    fn cards(&self, lab: &Lab) -> Result<Vec<String>> {
        let v = self.eval(
            lab,
            "return [...document.querySelectorAll('.task')]\
             .map(e => e.dataset.task + '@' + e.closest('.node').dataset.node).sort()",
        )?;
        Ok(serde_json::from_value(v)?)
    }
}

/// One WebDriver request with curl from `netns`; the answer's `value`.
fn call(lab: &Lab, netns: &str, method: &str, url: &str, body: Option<&Value>) -> Result<Value> {
    let data = body.map(Value::to_string).unwrap_or_else(|| "{}".into());
    let mut args = vec!["curl", "-s", "-m", "60", "-X", method, url];
    if method != "GET" && method != "DELETE" {
        args.extend_from_slice(&["-H", "Content-Type: application/json", "-d", &data]);
    }
    let out = lab.exec_in(netns, &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("WebDriver {method} {url}: {text:?} {out:?}"))?;
    if let Some(e) = v["value"].get("error") {
        bail!("WebDriver {method} {url}: {e}: {}", v["value"]["message"]);
    }
    Ok(v["value"].clone())
}

/// chromedriver in `netns` and a headless Chromium session of it; its files under the
/// lab's directory.
fn open_browser(lab: &mut Lab, netns: &str) -> Result<Browser> {
    netd_lab::debian_tool("/usr/bin/chromium", "chromium")?;
    let driver = netd_lab::debian_tool("/usr/bin/chromedriver", "chromium-driver")?;
    let home = lab.dir.join("browser");
    std::fs::create_dir_all(&home)?;
    let home_env = format!("HOME={}", home.display());
    lab.spawn_in(
        netns,
        Path::new("/usr/bin/env"),
        &[&home_env, &driver.display().to_string(), "--port=9515"],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !call(lab, netns, "GET", &format!("{DRIVER}/status"), None)
        .map(|v| v["ready"] == true)
        .unwrap_or(false)
    {
        if Instant::now() > deadline {
            bail!("chromedriver did not become ready in 20 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let profile = format!("--user-data-dir={}", home.join("profile").display());
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,900", profile],
        },
    }}});
    let v = call(
        lab,
        netns,
        "POST",
        &format!("{DRIVER}/session"),
        Some(&caps),
    )?;
    let session = v["sessionId"]
        .as_str()
        .context("no session id")?
        .to_string();
    Ok(Browser {
        netns: netns.to_string(),
        session,
    })
}

#[test]
fn the_live_view_shows_the_cluster_and_follows_it_without_a_reload() -> Result<()> {
    let http = format!("0.0.0.0:{HTTP_PORT}");
    let mut lab = Lab::cluster_with("obv", 2, &["--http", &http])?;
    lab.cli(
        0,
        &["network", "create", "front", "--subnet", "198.19.62.0/24"],
    )?;
    lab.cli(
        0,
        &[
            "service",
            "create",
            "web",
            "--network",
            "front",
            "--publish",
            "4567:80",
        ],
    )?;
    let (n1, n2) = (lab.nodes[0].name.clone(), lab.nodes[1].name.clone());
    lab.attach_whoami(0, "web", "a", Some(&n1))?;
    lab.attach_whoami(0, "web", "b", Some(&n2))?;
    let client = lab.add_client("client", "front", 0)?;
    let vip = lab.vip(0, "web", "front")?;
    let view = format!("http://{}:{HTTP_PORT}/", lab.nodes[0].ip);
    let netns = lab.add_host("browser", BROWSER_HOST)?;
    let b = open_browser(&mut lab, &netns)?;
    b.call(&lab, "POST", "/url", Some(&json!({"url": view})))?;
    b.until(
        &lab,
        "the page drew its nodes",
        "return document.querySelectorAll('.node').length === 2",
    )?;
    let want = |names: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(
        b.cards(&lab)?,
        want(&[
            &format!("a@{n1}"),
            &format!("b@{n2}"),
            &format!("client@{n1}")
        ])
    );
    // The page follows by itself: a marker set now survives (no reload).
    b.eval(&lab, "window.netdMarker = 42; return true")?;
    b.until(
        &lab,
        "the event stream is open",
        "return document.getElementById('live').classList.contains('on')",
    )?;

    lab.attach_whoami(0, "web", "c", Some(&n2))?;
    let c_on_n2 = format!(
        "return !!document.querySelector('.node[data-node=\"{n2}\"] .task[data-task=\"c\"]')"
    );
    b.until(&lab, "c appears on n2 without a reload", &c_on_n2)?;
    lab.cli(0, &["task", "detach", "a"])?;
    b.until(
        &lab,
        "a disappears",
        "return !document.querySelector('.task[data-task=\"a\"]')",
    )?;
    let marker = b.eval(&lab, "return window.netdMarker")?;
    assert_eq!(marker, json!(42), "the page reloaded");
    assert_eq!(
        b.cards(&lab)?,
        want(&[
            &format!("b@{n2}"),
            &format!("c@{n2}"),
            &format!("client@{n1}")
        ])
    );

    // Connections through the VIP from the client (on n1, which serves the view) show
    // per backend, rising without a reload.
    let report = load::run(
        &load::Spec {
            connections: 2,
            duration: Duration::from_secs(30),
            new_connections: true,
            netns: Some(client.clone()),
            max_requests: Some(200),
            ..load::Spec::new(load::Target::Http(SocketAddr::from((vip, 80)), "/".into()))
        },
        |_| {},
    )?;
    assert_eq!((report.requests, report.failed()), (200, 0), "{report:?}");
    b.until(
        &lab,
        "each backend's connections rose",
        "const n = t => Number(document.querySelector(\
           `tr[data-service=\"web\"] .backend[data-backend=\"${t}\"] .n`)?.textContent || 0);\
         return n('b') + n('c') >= 200 && n('b') > 0 && n('c') > 0",
    )?;
    let marker = b.eval(&lab, "return window.netdMarker")?;
    assert_eq!(marker, json!(42), "the page reloaded");

    // What it looks like: kept where NETD_VIEW_SCREENSHOT says (the README's picture).
    if let Ok(path) = std::env::var("NETD_VIEW_SCREENSHOT") {
        let png = b.call(&lab, "GET", "/screenshot", None)?;
        let png = png.as_str().context("no screenshot")?;
        std::fs::write(&path, base64_decode(png)?).with_context(|| format!("write {path}"))?;
    }
    b.call(&lab, "DELETE", "", None)?;
    Ok(())
}

/// Standard base64 (what WebDriver's screenshot is).
fn base64_decode(s: &str) -> Result<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= value(*c).context("not base64")? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}

/// A stand-in for a netd's `--http` serving the view's own page, script and style with
/// a cluster of `nodes` nodes and `tasks` tasks (a fixture: the page's scale, not the
/// daemon's, is what this measures), and an event every second.
fn serve_fixture(netns: &str, nodes: usize, tasks: usize) -> Result<SocketAddr> {
    let state = json!({
        "node": "n0",
        "revision": 1,
        "nodes": (0..nodes).map(|i| json!({"name": format!("n{i}"), "address": format!("198.18.1.{i}"), "ready": i % 17 != 5})).collect::<Vec<_>>(),
        "services": (0..20).map(|s| json!({
            "name": format!("svc{s}"),
            "vips": [{"network": "front", "vip": format!("198.19.0.{s}")}],
            "publish": [],
            "tasks": (0..tasks / 20).map(|t| format!("svc{s}.{t}")).collect::<Vec<_>>(),
            "backends": (0..tasks / 20).map(|t| json!({"task": format!("svc{s}.{t}"), "address": format!("198.19.{}.{}", 1 + s, t)})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "tasks": (0..tasks).map(|i| json!({
            "id": format!("id{i}"),
            "name": format!("svc{}.{}", i % 20, i / 20),
            "service": format!("svc{}", i % 20),
            "node": format!("n{}", i % nodes),
            "state": if i % 97 == 0 { "draining" } else { "running" },
            "health": null,
            "addresses": [format!("198.19.{}.{}", 1 + i % 20, i / 20)],
        })).collect::<Vec<_>>(),
    })
    .to_string();
    let listener = in_netns_bind(netns)?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let state = state.clone();
            std::thread::spawn(move || {
                let _ = answer(conn, &state);
            });
        }
    });
    Ok(addr)
}

/// A listener on a free port of namespace `netns`'s loopback.
fn in_netns_bind(netns: &str) -> Result<std::net::TcpListener> {
    netd_lab::in_netns(netns, || Ok(std::net::TcpListener::bind("127.0.0.1:0")?))
}

/// One request of the fixture server.
fn answer(mut conn: std::net::TcpStream, state: &str) -> Result<()> {
    use std::io::{BufRead, Write};
    let mut line = String::new();
    std::io::BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (kind, body): (&str, String) = match path.as_str() {
        "/" => (
            "text/html",
            include_str!("../../netd/src/view_assets/index.html").into(),
        ),
        "/view.js" => (
            "text/javascript",
            include_str!("../../netd/src/view_assets/view.js").into(),
        ),
        "/view.css" => (
            "text/css",
            include_str!("../../netd/src/view_assets/view.css").into(),
        ),
        "/view/state" => ("application/json", state.to_string()),
        "/view/counters" => ("application/json", "{}".into()),
        "/view/events" => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n: hi\n\n"
            )?;
            // An event every second (bounded): whenever the test looks, one follows.
            for _ in 0..60 {
                std::thread::sleep(Duration::from_secs(1));
                write!(conn, "data: {{}}\n\n")?;
            }
            return Ok(());
        }
        _ => ("text/plain", String::new()),
    };
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// The page at the scale the issue names, 50 nodes and 1,000 tasks: every column and
/// card is drawn, the columns scroll sideways instead of squeezing, each column scrolls
/// on its own, and an event redraws it all. How long the draws took is printed (a
/// figure, not a pass mark).
#[test]
fn the_live_view_draws_50_nodes_and_1000_tasks() -> Result<()> {
    let mut lab = Lab::start("obs", 1)?;
    let netns = lab.add_host("browser", BROWSER_HOST)?;
    let site = serve_fixture(&netns, 50, 1000)?;
    let b = open_browser(&mut lab, &netns)?;
    b.call(
        &lab,
        "POST",
        "/url",
        Some(&json!({"url": format!("http://{site}/")})),
    )?;
    b.until(
        &lab,
        "50 columns and 1,000 cards",
        "return document.querySelectorAll('.node').length === 50 \
         && document.querySelectorAll('.task').length === 1000",
    )?;
    let laid = b.eval(
        &lab,
        "const n = document.getElementById('nodes'); \
         const col = [...document.querySelectorAll('.cards')].map(c => c.scrollHeight > c.clientHeight); \
         return {wide: n.scrollWidth > n.clientWidth, tall: col.some(x => x), \
                 down: document.querySelectorAll('.node.down').length, \
                 drawn_ms: performance.getEntriesByType('navigation')[0].duration}",
    )?;
    assert_eq!(
        laid["wide"], true,
        "50 columns should scroll sideways: {laid}"
    );
    assert_eq!(laid["tall"], true, "a long column should scroll: {laid}");
    assert_eq!(laid["down"], 3, "{laid}");
    // The event a second in redraws everything: the revision attribute is set again.
    b.eval(&lab, "document.body.dataset.revision = 'x'; return true")?;
    b.until(
        &lab,
        "an event redraws the page",
        "return document.body.dataset.revision === '1'",
    )?;
    eprintln!("the page at 50 nodes and 1,000 tasks: {laid}");
    b.call(&lab, "DELETE", "", None)?;
    Ok(())
}
