//! A forwarding proxy for tests: CONNECT tunnels and absolute-form HTTP/1.1 requests, with optional
//! Basic authentication. Its upstream connections leave from 127.0.0.2, so receivers see the proxy's
//! address, not hookline's; it logs what it was asked for.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The address upstream connections are made from.
pub const PROXY_EGRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);

pub struct TestProxy {
    pub addr: SocketAddr,
    /// Request lines seen (`CONNECT 127.0.0.1:443 HTTP/1.1`, `POST http://… HTTP/1.1`).
    log: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    /// A proxy that demands `Proxy-Authorization: <auth>` when `auth` is given (407 otherwise).
    pub async fn start(auth: Option<&str>) -> TestProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (lg, auth) = (log.clone(), auth.map(String::from));
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve(s, lg.clone(), auth.clone()));
            }
        });
        TestProxy { addr, log, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream(to: &str) -> std::io::Result<TcpStream> {
    let to: SocketAddr = to
        .parse()
        .map_err(|_| std::io::Error::other(format!("not an address: {to}")))?;
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(PROXY_EGRESS.into(), 0))?;
    s.connect(to).await
}

/// Reads one head (through the empty line) and a content-length body; None at EOF.
async fn read_message(
    s: &mut (impl AsyncRead + Unpin),
    body_allowed: bool,
) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.ok()? == 0 {
            return None;
        }
        buf.push(b[0]);
    }
    let head = String::from_utf8(buf).ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; if body_allowed { len } else { 0 }];
    s.read_exact(&mut body).await.ok()?;
    Some((head, body))
}

async fn serve(mut c: TcpStream, log: Arc<Mutex<Vec<String>>>, auth: Option<String>) {
    let mut up: Option<TcpStream> = None;
    loop {
        let Some((head, body)) = read_message(&mut c, true).await else {
            return;
        };
        let line = head.lines().next().unwrap_or_default().to_string();
        log.lock().unwrap().push(line.clone());
        if let Some(want) = &auth {
            let ok = head.lines().any(|l| {
                l.split_once(':').is_some_and(|(k, v)| {
                    k.eq_ignore_ascii_case("proxy-authorization") && v.trim() == want
                })
            });
            if !ok {
                let _ = c
                    .write_all(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n",
                    )
                    .await;
                continue;
            }
        }
        let mut parts = line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if method == "CONNECT" {
            let Ok(mut u) = upstream(target).await else {
                let _ = c
                    .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                    .await;
                return;
            };
            if c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            return;
        }
        // Absolute form: http://authority/path → origin form to the authority.
        let Some(rest) = target.strip_prefix("http://") else {
            let _ = c
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if up.is_none() {
            match upstream(authority).await {
                Ok(u) => up = Some(u),
                Err(_) => {
                    let _ = c
                        .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
            }
        }
        let Some(u) = up.as_mut() else { return };
        let mut fwd = format!(
            "{method} {} HTTP/1.1\r\n",
            if path.is_empty() { "/" } else { path }
        );
        for l in head.lines().skip(1).filter(|l| !l.is_empty()) {
            let name = l.split(':').next().unwrap_or("").to_ascii_lowercase();
            if name == "proxy-authorization" || name == "host" {
                continue;
            }
            fwd.push_str(l);
            fwd.push_str("\r\n");
        }
        // RFC 9112 §3.2.2: the Host of an absolute-form request is its authority.
        fwd.push_str(&format!("host: {authority}\r\n\r\n"));
        if u.write_all(fwd.as_bytes()).await.is_err() || u.write_all(&body).await.is_err() {
            return;
        }
        // Test receivers answer with content-length or with no body (204).
        let Some((rhead, rbody)) = read_message(u, true).await else {
            return;
        };
        if c.write_all(rhead.as_bytes()).await.is_err() || c.write_all(&rbody).await.is_err() {
            return;
        }
    }
}
