//! The README's local demo command (`scripts/demo`) works on this machine: a broker, hookline on the
//! embedded store, the verifying demo receiver and the sample producer start; verified deliveries are
//! printed; Ctrl-C (SIGINT to the process group, as a terminal sends it) stops everything it started.
//! The demo uses the binaries this test run built instead of building its own.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn port_open(p: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], p).into(), Duration::from_millis(200))
        .is_ok()
}

fn port_after(line: &str, key: &str) -> u16 {
    let rest = line.split(key).nth(1).unwrap();
    rest.chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

#[test]
fn demo_prints_verified_deliveries_and_ctrl_c_stops_everything() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let hookline = std::path::PathBuf::from(env!("CARGO_BIN_EXE_hookline"));
    let producer = hookline.parent().unwrap().join("examples/demo_producer");
    assert!(
        producer.is_file(),
        "{} missing (cargo test builds examples)",
        producer.display()
    );
    let mut child = Command::new(root.join("scripts/demo"))
        .env("HOOKLINE_BIN", &hookline)
        .env("DEMO_PRODUCER_BIN", &producer)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut lines = Vec::new();
    let (mut verified, mut rejected) = (0, 0);
    while verified < 6 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                verified += usize::from(l.starts_with("verified delivery"));
                rejected += usize::from(l.starts_with("REJECTED"));
                lines.push(l);
            }
            Err(_) => {
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                panic!(
                    "only {verified} verified deliveries; demo printed:\n{}",
                    lines.join("\n")
                );
            }
        }
    }
    assert_eq!(rejected, 0, "{}", lines.join("\n"));
    let banner = lines
        .iter()
        .find(|l| l.starts_with("demo: broker"))
        .expect("banner");
    let ports = [
        port_after(banner, "broker 127.0.0.1:"),
        port_after(banner, "http://127.0.0.1:"),
        port_after(banner, "receiver 127.0.0.1:"),
    ];
    assert!(ports.iter().all(|p| port_open(*p)), "{banner}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("/hooks/orders") && l.contains("order.created"))
    );
    assert!(
        lines.iter().any(|l| l.contains("Authorization: Bearer")),
        "API hint missing"
    );

    // Ctrl-C: SIGINT to the whole process group.
    let t = Instant::now();
    unsafe { libc::kill(-pgid, libc::SIGINT) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "demo did not stop within 30 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Nothing it started is left: no process in its group, no port open.
    let t2 = Instant::now();
    while unsafe { libc::kill(-pgid, 0) } == 0 {
        assert!(
            t2.elapsed() < Duration::from_secs(10),
            "processes of the demo survived Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in ports {
        assert!(!port_open(p), "port {p} still open after Ctrl-C");
    }
    println!(
        "demo: {verified} verified deliveries, stopped {:?} after Ctrl-C ({status})",
        t.elapsed()
    );
}
