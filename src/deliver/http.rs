//! A lean HTTP/1.1 client for deliveries: one POST per attempt over a pooled keep-alive connection.
//!
//! Why not hyper's client (through reqwest)? Measured with 10 000 deliveries in flight (one connection each,
//! as HTTP/1 needs): hyper costs ~24 KiB per connection before any request — an 8 KiB block for the
//! channel between the request and the connection task, an 8 KiB header write buffer and an 8 KiB read
//! buffer, none of them sizable — plus a second task and a cross-task hand-off per request. Here the
//! delivery task does its own I/O: the head is written into a reused per-connection buffer, the body is
//! the shared event bytes (`writev`, never copied), and the response head is parsed by `httparse` from a
//! buffer that starts at 1 KiB. A connection costs ~2–3 KiB of heap.
//!
//! What it does: DNS through the [`AddressPolicy`] (every address checked, literal IPs too), TCP with
//! `TCP_NODELAY` and a connect timeout, TLS through rustls with the platform's roots, keep-alive reuse
//! (LIFO per host, idle timeout, idle cap, liveness check before reuse, one retry on a fresh connection when
//! a reused one turns out to be closed before any response byte), and response framing (Content-Length,
//! chunked, until-close, 1xx skipped). Response bodies are read up to a bound and dropped; a larger body
//! closes the connection instead. The caller bounds the whole exchange with its timeout.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use url::Url;

use super::identity::ClientIdentity;
use super::policy::AddressPolicy;
use super::resolve::Resolver;
use super::wire::{Chunked, Framing, Head, HeadScanner};
use crate::proxy::Proxy;

/// Happy Eyeballs' connection attempt delay (RFC 8305 §5 recommends 250 ms).
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// How long a response is awaited after the request could not be written whole (see
/// [`Client::request`]).
const EARLY_RESPONSE_BOUND: Duration = Duration::from_millis(500);

/// Read buffer growth step; a buffer grown past 8 steps is dropped when its connection goes idle.
const READ_CHUNK: usize = 1024;

/// Where a subscription's requests go, parsed once when the subscription is prepared.
#[derive(Debug, Clone)]
pub struct Target {
    tls: bool,
    /// Host for DNS and TLS server name (no brackets).
    host: Box<str>,
    port: u16,
    /// The host when it is an IP literal.
    ip: Option<IpAddr>,
    /// `Host` header value (with the port when it is not the scheme's default).
    host_header: Box<str>,
    /// Request target: path and query.
    path: Box<str>,
    /// Pool key: scheme, host and port (and the client certificate's fingerprint).
    key: Box<str>,
    /// The client certificate presented when the server asks (mutual TLS).
    identity: Option<Arc<ClientIdentity>>,
}

impl Target {
    /// From an `http`/`https` URL with a host (validated by the caller).
    pub fn from_url(url: &Url) -> Result<Target, String> {
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            s => return Err(format!("scheme {s:?} is not http or https")),
        };
        let (host, ip) = match url.host() {
            Some(url::Host::Domain(d)) => (d.to_string(), None),
            Some(url::Host::Ipv4(a)) => (a.to_string(), Some(IpAddr::V4(a))),
            Some(url::Host::Ipv6(a)) => (a.to_string(), Some(IpAddr::V6(a))),
            None => return Err("no host".into()),
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| "no port".to_string())?;
        let bracketed = match ip {
            Some(IpAddr::V6(_)) => format!("[{host}]"),
            _ => host.clone(),
        };
        let host_header = match url.port() {
            Some(p) => format!("{bracketed}:{p}"),
            None => bracketed,
        };
        let mut path = url.path().to_string();
        if path.is_empty() {
            path.push('/');
        }
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Target {
            tls,
            key: format!("{}://{host_header}:{port}", url.scheme()).into(),
            host: host.into(),
            port,
            ip,
            host_header: host_header.into(),
            path: path.into(),
            identity: None,
        })
    }

    /// The same target, presenting `identity` to the server. Its connections are pooled apart from
    /// those of other identities (and of none) to the same host.
    pub fn with_identity(mut self, identity: Arc<ClientIdentity>) -> Target {
        self.key = format!("{}#{}", self.key, identity.fingerprint).into();
        self.identity = Some(identity);
        self
    }

    /// The client certificate's identity, if any.
    pub fn identity(&self) -> Option<&ClientIdentity> {
        self.identity.as_deref()
    }
}

/// Why an exchange failed before a response status was read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address policy refused every address of the destination; nothing was sent.
    #[error("{0}")]
    Refused(String),
    /// DNS, connect, TLS, I/O or protocol failure.
    #[error("{0}")]
    Failed(String),
    /// No response head before the deadline.
    #[error("no response within the timeout")]
    TimedOut,
}

/// Once the status line and headers are in, the status decides the attempt; the body is read (and
/// dropped) within this bound only to keep the connection reusable. A body that stalls or never ends
/// costs the connection, never a redelivery.
pub const BODY_READ_BOUND: Duration = Duration::from_secs(1);

/// What the endpoint answered.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The raw `Retry-After` value, when present.
    pub retry_after: Option<String>,
    /// The first `capture` bytes of the body.
    pub excerpt: Vec<u8>,
    /// The body broke off (connection error, malformed framing, or not done within
    /// [`BODY_READ_BOUND`]) after the status was read; the connection is then not reused.
    pub body_error: Option<String>,
}

pub struct ClientConfig {
    pub policy: AddressPolicy,
    pub connect_timeout: Duration,
    pub max_idle_per_host: usize,
    pub idle_timeout: Duration,
    /// A connection older than this is not reused, so a changed DNS answer or a server that was
    /// moved behind a balancer is seen within this time.
    pub max_lifetime: Duration,
    /// TCP keepalive probes start after a connection has been silent this long (`None`: off).
    pub tcp_keepalive: Option<Duration>,
    /// Response bodies are read up to this many bytes; a longer body closes the connection.
    pub max_response_bytes: usize,
    /// Roots trusted beside the platform's (`[delivery.tls] extra_ca_file`).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Name servers (`delivery.dns_servers`); empty: the system's.
    pub dns_servers: Vec<SocketAddr>,
    /// Bound of one DNS query (`delivery.dns_timeout`).
    pub dns_timeout: Duration,
    /// Egress proxy (`delivery.proxy`, `no_proxy`).
    pub proxy: Option<Proxy>,
}

impl ClientConfig {
    /// Defaults for everything but the policy (tests and tools).
    pub fn new(policy: AddressPolicy) -> ClientConfig {
        ClientConfig {
            policy,
            connect_timeout: Duration::from_secs(5),
            max_idle_per_host: 64,
            idle_timeout: Duration::from_secs(90),
            max_lifetime: Duration::from_secs(300),
            tcp_keepalive: Some(Duration::from_secs(30)),
            max_response_bytes: 64 * 1024,
            extra_roots: Vec::new(),
            dns_servers: Vec::new(),
            dns_timeout: Duration::from_secs(2),
            proxy: None,
        }
    }
}

pub struct Client {
    cfg: ClientConfig,
    tls: OnceLock<Result<TlsSetup, String>>,
    resolver: OnceLock<Result<Resolver, String>>,
    pool: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    idle: HashMap<Box<str>, Vec<Conn>>,
    last_sweep: Option<Instant>,
}

struct Conn {
    io: Stream,
    /// Response bytes read but not consumed; empty between requests.
    buf: Vec<u8>,
    /// The request head being written (kept to reuse its allocation).
    head: Vec<u8>,
    idle_since: Instant,
    born: Instant,
    /// Through the proxy, plain HTTP: the request target is absolute (`http://ip:port` + path).
    via_proxy: Option<Box<str>>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Client {
    pub fn new(cfg: ClientConfig) -> Client {
        Client {
            cfg,
            tls: OnceLock::new(),
            resolver: OnceLock::new(),
            pool: Mutex::new(Pool::default()),
        }
    }

    /// POSTs `body` to `target`. `headers` writes the caller's header lines (`name: value\r\n`) after
    /// `host` and `content-length`. Returns the status once the head is read and the body read or dropped.
    /// `deadline` bounds everything up to the response head; the body then gets [`BODY_READ_BOUND`].
    pub async fn post(
        &self,
        target: &Target,
        headers: impl Fn(&mut Vec<u8>),
        body: &Bytes,
        capture: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Response, HttpError> {
        if let Some(ip) = target.ip {
            self.cfg
                .policy
                .check(ip)
                .map_err(|e| HttpError::Refused(e.to_string()))?;
        }
        let (mut conn, reused) = match self.checkout(target) {
            Some(c) => (c, true),
            None => (self.connect_by(target, deadline).await?, false),
        };
        let mut first = self
            .exchange(&mut conn, target, &headers, body, capture, deadline)
            .await;
        if reused && matches!(first, Err(Exchange::Stale(_))) {
            // The server closed the idle connection as we reused it: nothing was answered, so send once
            // more on a fresh connection.
            conn = self.connect_by(target, deadline).await?;
            first = self
                .exchange(&mut conn, target, &headers, body, capture, deadline)
                .await;
        }
        match first {
            Ok((resp, reusable)) => {
                if reusable {
                    self.checkin(target, conn);
                }
                Ok(resp)
            }
            Err(Exchange::Stale(e) | Exchange::Failed(e)) => Err(HttpError::Failed(e)),
            Err(Exchange::TimedOut) => Err(HttpError::TimedOut),
        }
    }

    /// The resolver, set up at its first use (or by [`Client::resolver`] at start, to report a bad
    /// configuration early).
    pub fn resolver(&self) -> Result<&Resolver, String> {
        self.resolver
            .get_or_init(|| Resolver::new(&self.cfg.dns_servers, self.cfg.dns_timeout))
            .as_ref()
            .map_err(|e| format!("dns error: {e}"))
    }

    /// [`Client::connect`] before `deadline`. Boxed: connecting is rare next to reuse, and its state
    /// would otherwise make every in-flight delivery's future ~1.3 KiB larger.
    async fn connect_by(
        &self,
        target: &Target,
        deadline: tokio::time::Instant,
    ) -> Result<Conn, HttpError> {
        tokio::time::timeout_at(deadline, Box::pin(self.connect(target)))
            .await
            .map_err(|_| HttpError::TimedOut)?
    }

    /// The most recently used idle connection to `target` that is still fresh and open. The lock is
    /// held only to pop; the liveness probe (a read attempt through TLS, if any) and closing a dead
    /// connection happen outside it.
    fn checkout(&self, target: &Target) -> Option<Conn> {
        loop {
            let mut c = {
                let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                pool.idle.get_mut(&target.key)?.pop()?
            };
            if self.fresh(&c, Instant::now()) && c.io.idle_and_open() {
                return Some(c);
            }
        }
    }

    /// Within the idle timeout and the maximum lifetime.
    fn fresh(&self, c: &Conn, now: Instant) -> bool {
        now.duration_since(c.idle_since) < self.cfg.idle_timeout
            && now.duration_since(c.born) < self.cfg.max_lifetime
    }

    /// Closes idle connections past the idle timeout or the maximum lifetime, on every host. Called
    /// now and then from check-ins and periodically by the pipeline ([`Client::sweep_interval`]), so
    /// a host no longer delivered to does not keep sockets open.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.last_sweep = Some(now);
            pool.idle.retain(|_, list| {
                let mut i = 0;
                while i < list.len() {
                    if self.fresh(&list[i], now) {
                        i += 1;
                    } else {
                        expired.push(list.remove(i));
                    }
                }
                !list.is_empty()
            });
        }
        drop(expired); // closed outside the lock
    }

    /// How often [`Client::sweep`] should run.
    pub fn sweep_interval(&self) -> Duration {
        (self.cfg.idle_timeout.min(self.cfg.max_lifetime) / 2).max(Duration::from_millis(100))
    }

    /// Idle connections in the pool (all hosts).
    pub fn idle_connections(&self) -> usize {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.idle.values().map(Vec::len).sum()
    }

    fn checkin(&self, target: &Target, mut conn: Conn) {
        let now = Instant::now();
        if self.cfg.max_idle_per_host == 0 || now.duration_since(conn.born) >= self.cfg.max_lifetime
        {
            return;
        }
        conn.idle_since = now;
        if conn.buf.capacity() > 8 * READ_CHUNK {
            conn.buf = Vec::new();
        }
        let (extra, sweep) = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            let list = pool.idle.entry(target.key.clone()).or_default();
            let extra = if list.len() < self.cfg.max_idle_per_host {
                list.push(conn);
                None
            } else {
                Some(conn)
            };
            let sweep = pool
                .last_sweep
                .is_none_or(|t| now.duration_since(t) >= self.sweep_interval());
            (extra, sweep)
        };
        drop(extra); // closed outside the lock
        if sweep {
            self.sweep();
        }
    }

    async fn connect(&self, target: &Target) -> Result<Conn, HttpError> {
        let addrs: Vec<SocketAddr> = match target.ip {
            Some(ip) => vec![SocketAddr::new(ip, target.port)],
            None => {
                let all = self
                    .resolver()
                    .map_err(HttpError::Failed)?
                    .lookup(&target.host)
                    .await
                    .map_err(|e| HttpError::Failed(format!("dns error: {}: {e}", target.host)))?;
                let mut refused = None;
                let allowed: Vec<SocketAddr> = all
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, target.port))
                    .filter(|a| match self.cfg.policy.check(a.ip()) {
                        Ok(()) => true,
                        Err(e) => {
                            refused.get_or_insert(e);
                            false
                        }
                    })
                    .collect();
                if allowed.is_empty() {
                    return Err(match refused {
                        Some(e) => HttpError::Refused(e.to_string()),
                        None => {
                            HttpError::Failed(format!("dns error: {}: no addresses", target.host))
                        }
                    });
                }
                allowed
            }
        };
        let proxy = self
            .cfg
            .proxy
            .as_ref()
            .filter(|p| !p.bypass(&target.host, target.ip));
        let tcp = match proxy {
            None => self
                .connect_tcp(addrs.clone())
                .await
                .map_err(HttpError::Failed)?,
            Some(p) => self.connect_proxy(p, target, addrs[0]).await?,
        };
        let via_proxy = match proxy {
            Some(_) if !target.tls => {
                Some(format!("http://{}", crate::proxy::authority(addrs[0])).into())
            }
            _ => None,
        };
        let _ = tcp.set_nodelay(true);
        if let Some(idle) = self.cfg.tcp_keepalive {
            // A peer that vanished (host gone, NAT entry dropped) is noticed on an idle connection
            // instead of at the next delivery's timeout.
            let ka = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval((idle / 3).max(Duration::from_secs(1)));
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&ka);
        }
        let io = if target.tls {
            let connector = self
                .tls
                .get_or_init(|| TlsSetup::new(&self.cfg.extra_roots))
                .as_ref()
                .map_err(|e| HttpError::Failed(e.clone()))?
                .connector(target.identity())
                .map_err(HttpError::Failed)?;
            let name = rustls::pki_types::ServerName::try_from(target.host.to_string())
                .map_err(|e| HttpError::Failed(format!("tls error: server name: {e}")))?;
            let tls = tokio::time::timeout(self.cfg.connect_timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| HttpError::Failed("tls error: handshake timed out".into()))?
                .map_err(|e| HttpError::Failed(format!("tls error: {e}")))?;
            Stream::Tls(Box::new(tls))
        } else {
            Stream::Plain(tcp)
        };
        Ok(Conn {
            io,
            buf: Vec::new(),
            head: Vec::new(),
            idle_since: Instant::now(),
            born: Instant::now(),
            via_proxy,
        })
    }

    /// A connection to the proxy, for `to` (an address the policy allowed): for HTTPS a CONNECT
    /// tunnel to it, for HTTP the proxy connection itself (requests then name `to` in absolute form).
    /// The proxy's own address is the operator's choice and is not judged by the policy.
    async fn connect_proxy(
        &self,
        p: &Proxy,
        target: &Target,
        to: SocketAddr,
    ) -> Result<TcpStream, HttpError> {
        let addrs: Vec<SocketAddr> = match p.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, p.port)],
            Err(_) => self
                .resolver()
                .map_err(HttpError::Failed)?
                .lookup(&p.host)
                .await
                .map_err(|e| HttpError::Failed(format!("proxy error: dns: {}: {e}", p.host)))?
                .iter()
                .map(|ip| SocketAddr::new(*ip, p.port))
                .collect(),
        };
        let tcp = self
            .connect_tcp(addrs)
            .await
            .map_err(|e| HttpError::Failed(format!("proxy error: {e}")))?;
        if !target.tls {
            return Ok(tcp);
        }
        tokio::time::timeout(self.cfg.connect_timeout, p.tunnel(tcp, to))
            .await
            .map_err(|_| HttpError::Failed("proxy error: CONNECT timed out".into()))?
            .map_err(HttpError::Failed)
    }

    /// Connects to the first of `addrs` that answers, Happy Eyeballs style (RFC 8305): address
    /// families interleaved in the resolver's order of preference, a new attempt started every
    /// [`ATTEMPT_DELAY`] while earlier ones are still pending (and at once when one fails), the first
    /// established connection wins and the others are dropped. Each attempt has the connect timeout.
    async fn connect_tcp(&self, addrs: Vec<SocketAddr>) -> Result<TcpStream, String> {
        use futures_util::StreamExt;
        use futures_util::stream::FuturesUnordered;
        let timeout = self.cfg.connect_timeout;
        let attempt = |addr: SocketAddr| async move {
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(format!("connect error: {addr}: {e}")),
                Err(_) => Err(format!(
                    "connect error: {addr}: timed out after {} ms",
                    timeout.as_millis()
                )),
            }
        };
        let mut next = interleave_families(addrs).into_iter().peekable();
        let mut pending = FuturesUnordered::new();
        let mut last = String::from("connect error: no address");
        loop {
            if pending.is_empty() {
                match next.next() {
                    Some(a) => pending.push(attempt(a)),
                    None => return Err(last),
                }
            }
            let more = next.peek().is_some();
            tokio::select! {
                Some(r) = pending.next() => match r {
                    Ok(s) => return Ok(s),
                    Err(e) => {
                        last = e;
                        if let Some(a) = next.next() {
                            pending.push(attempt(a));
                        }
                    }
                },
                _ = tokio::time::sleep(ATTEMPT_DELAY), if more => {
                    if let Some(a) = next.next() {
                        pending.push(attempt(a));
                    }
                }
            }
        }
    }

    /// One request and its response on `conn`. Returns whether the connection may be reused.
    async fn exchange(
        &self,
        conn: &mut Conn,
        target: &Target,
        headers: &impl Fn(&mut Vec<u8>),
        body: &Bytes,
        capture: usize,
        deadline: tokio::time::Instant,
    ) -> Result<(Response, bool), Exchange> {
        let headed =
            tokio::time::timeout_at(deadline, self.request(conn, target, headers, body)).await;
        let (status, (retry_after, framing, keep_alive), head_len) =
            headed.map_err(|_| Exchange::TimedOut)??;
        conn.buf.drain(..head_len);
        let mut excerpt = Vec::new();
        let read = tokio::time::timeout(
            BODY_READ_BOUND,
            read_body(
                &mut conn.io,
                &mut conn.buf,
                framing,
                self.cfg.max_response_bytes,
                capture,
                &mut excerpt,
            ),
        )
        .await;
        let (complete, body_error) = read.unwrap_or_else(|_| {
            (
                false,
                Some(format!(
                    "response body not finished within {BODY_READ_BOUND:?}"
                )),
            )
        });
        let keep_alive = keep_alive && complete && conn.buf.is_empty();
        Ok((
            Response {
                status,
                retry_after,
                excerpt,
                body_error,
            },
            keep_alive,
        ))
    }

    /// Writes the request and reads the final response head: (status, what it says, its length in
    /// `conn.buf`).
    async fn request(
        &self,
        conn: &mut Conn,
        target: &Target,
        headers: &impl Fn(&mut Vec<u8>),
        body: &Bytes,
    ) -> Result<(u16, Head, usize), Exchange> {
        let head = &mut conn.head;
        head.clear();
        head.extend_from_slice(b"POST ");
        if let Some(origin) = &conn.via_proxy {
            head.extend_from_slice(origin.as_bytes());
        }
        head.extend_from_slice(target.path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(target.host_header.as_bytes());
        if conn.via_proxy.is_some()
            && let Some(auth) = self.cfg.proxy.as_ref().and_then(Proxy::authorization)
        {
            head.extend_from_slice(b"\r\nproxy-authorization: ");
            head.extend_from_slice(auth.as_bytes());
        }
        head.extend_from_slice(b"\r\ncontent-length: ");
        head.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        head.extend_from_slice(b"\r\n");
        headers(head);
        head.extend_from_slice(b"\r\n");
        // A server may answer before it has read the whole request (a 413 or 401 after the head) and
        // close, so the write fails; the answer is then already in our receive buffer and decides the
        // attempt. Only when nothing can be read is the write error the outcome.
        conn.buf.clear();
        if let Err(e) = write_all2(&mut conn.io, &conn.head, body).await {
            let write_error = format!("connection error: sending the request: {e}");
            return match tokio::time::timeout(EARLY_RESPONSE_BOUND, self.read_head(conn)).await {
                Ok(Ok(found)) => Ok(found),
                Ok(Err(Exchange::Stale(_))) | Err(_) => Err(Exchange::Stale(write_error)),
                Ok(Err(other)) => Err(other),
            };
        }
        self.read_head(conn).await
    }

    /// Reads the final response head into `conn.buf`, skipping 1xx heads: (status, what it says, its
    /// length in `conn.buf`).
    async fn read_head(&self, conn: &mut Conn) -> Result<(u16, Head, usize), Exchange> {
        let mut scanner = HeadScanner::default();
        // Any response byte (a 1xx head included) means the server took the request: a close after it
        // is a failed attempt, never a reason to send the POST again.
        let mut answered = false;
        loop {
            let read = read_more(&mut conn.io, &mut conn.buf).await;
            let got = matches!(read, Ok(n) if n > 0);
            answered |= got;
            if !got {
                // Nothing received at all means the connection was already closed (stale).
                let stale = !answered;
                let what = match read {
                    Err(e) => format!("connection error: reading the response: {e}"),
                    Ok(_) if stale => "connection closed before a response".into(),
                    Ok(_) => "connection closed in the middle of the response head".into(),
                };
                return Err(if stale {
                    Exchange::Stale(what)
                } else {
                    Exchange::Failed(what)
                });
            }
            if let Some(found) = scanner.scan(&mut conn.buf).map_err(Exchange::Failed)? {
                return Ok(found);
            }
        }
    }
}

enum Exchange {
    /// Failed before any response byte arrived (on a reused connection: it was closed under us).
    Stale(String),
    Failed(String),
    /// No response head before the deadline.
    TimedOut,
}

/// Reads and drops the body (keeping the first `capture` bytes). Returns whether it was read to its end
/// (so the connection is reusable) and a body error, if any. Bodies longer than `max` are not read to
/// the end.
async fn read_body(
    io: &mut Stream,
    buf: &mut Vec<u8>,
    framing: Framing,
    max: usize,
    capture: usize,
    excerpt: &mut Vec<u8>,
) -> (bool, Option<String>) {
    let keep = |data: &[u8], excerpt: &mut Vec<u8>| {
        if excerpt.len() < capture {
            let n = (capture - excerpt.len()).min(data.len());
            excerpt.extend_from_slice(&data[..n]);
        }
    };
    // Body bytes worth reading, and the budget of raw bytes read for them (framing included).
    let limit = max.max(capture);
    let budget = limit + 1024;
    match framing {
        Framing::Length(len) => {
            if len > limit as u64 {
                // Not worth reading: close the connection instead (but keep what is already here).
                let n = buf.len().min(len as usize);
                keep(&buf[..n], excerpt);
                buf.clear();
                return (false, None);
            }
            let len = len as usize;
            while buf.len() < len {
                if let Err(e) = read_body_more(io, buf).await {
                    return (false, Some(e));
                }
            }
            keep(&buf[..len], excerpt);
            buf.drain(..len);
            (true, None)
        }
        Framing::UntilClose => {
            let mut seen = 0usize;
            loop {
                keep(buf, excerpt);
                seen += buf.len();
                buf.clear();
                if seen > budget {
                    return (false, None);
                }
                match read_more(io, buf).await {
                    Ok(0) => return (false, None),
                    Ok(_) => {}
                    // Over TLS, a close without close_notify: for a body that ends at the close this
                    // is its end (a truncation could only shorten a body that is dropped anyway, and
                    // the connection is not reused either way).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return (false, None),
                    Err(e) => {
                        return (
                            false,
                            Some(format!("connection error: reading the body: {e}")),
                        );
                    }
                }
            }
        }
        Framing::Chunked => {
            let mut dec = Chunked::default();
            loop {
                match dec.feed(buf, &mut |d| keep(d, excerpt)) {
                    Ok(true) => return (true, None),
                    Ok(false) => {}
                    Err(e) => return (false, Some(format!("invalid chunked body: {e}"))),
                }
                if dec.consumed > budget {
                    return (false, None);
                }
                if let Err(e) = read_body_more(io, buf).await {
                    return (false, Some(e));
                }
            }
        }
    }
}

/// [`read_more`] for a body that is not complete yet: the end of the stream is an error too.
async fn read_body_more(io: &mut Stream, buf: &mut Vec<u8>) -> Result<(), String> {
    match read_more(io, buf).await {
        Ok(0) => Err("connection closed in the middle of the body".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("connection error: reading the body: {e}")),
    }
}

/// Reads once into the spare capacity of `buf` (growing it by [`READ_CHUNK`] when it is full).
async fn read_more(io: &mut Stream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    io.read_buf(buf).await
}

/// Writes `a` then `b` with vectored writes.
async fn write_all2(io: &mut Stream, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    io.flush().await
}

/// Addresses reordered so that families alternate, starting with the family of the first (RFC 8305
/// §4): `[v6a, v6b, v4a]` → `[v6a, v4a, v6b]`.
fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first().map(SocketAddr::is_ipv6) else {
        return addrs;
    };
    let (mut preferred, mut other): (Vec<_>, Vec<_>) =
        addrs.into_iter().partition(|a| a.is_ipv6() == first);
    let mut out = Vec::with_capacity(preferred.len() + other.len());
    preferred.reverse();
    other.reverse();
    loop {
        match (preferred.pop(), other.pop()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// TLS client configurations: one verifier (the platform's roots plus `extra_roots`, loaded once),
/// the connector without a client certificate, and one connector per client identity (made at its
/// first connection; a fingerprint names it, so key material is not duplicated per connection).
struct TlsSetup {
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<rustls_platform_verifier::Verifier>,
    anonymous: tokio_rustls::TlsConnector,
    with_identity: Mutex<HashMap<Box<str>, tokio_rustls::TlsConnector>>,
}

/// Connectors kept for client identities; beyond this (certificates rotated many times over), the
/// cache starts again.
const MAX_IDENTITY_CONNECTORS: usize = 4096;

impl TlsSetup {
    fn new(extra_roots: &[rustls::pki_types::CertificateDer<'static>]) -> Result<TlsSetup, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(
            rustls_platform_verifier::Verifier::new_with_extra_roots(
                extra_roots.to_vec(),
                provider.clone(),
            )
            .map_err(|e| format!("tls error: setting up the verifier: {e}"))?,
        );
        Ok(TlsSetup {
            anonymous: Self::build(&provider, &verifier, None)?,
            provider,
            verifier,
            with_identity: Mutex::new(HashMap::new()),
        })
    }

    fn build(
        provider: &Arc<rustls::crypto::CryptoProvider>,
        verifier: &Arc<rustls_platform_verifier::Verifier>,
        identity: Option<&ClientIdentity>,
    ) -> Result<tokio_rustls::TlsConnector, String> {
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls error: setting up the verifier: {e}"))?
            // "dangerous" only in rustls' naming: the verifier is the platform's, with the extra roots.
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone());
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key())
                .map_err(|e| format!("tls error: client certificate: {e}"))?,
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    fn connector(
        &self,
        identity: Option<&ClientIdentity>,
    ) -> Result<tokio_rustls::TlsConnector, String> {
        let Some(id) = identity else {
            return Ok(self.anonymous.clone());
        };
        let mut map = self.with_identity.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&id.fingerprint) {
            return Ok(c.clone());
        }
        if map.len() >= MAX_IDENTITY_CONNECTORS {
            map.clear();
        }
        let c = Self::build(&self.provider, &self.verifier, Some(id))?;
        map.insert(id.fingerprint.clone(), c.clone());
        Ok(c)
    }
}

impl Stream {
    /// An idle connection must have nothing to read. The probe is one read attempt through the whole
    /// stack, TLS included, that must not complete: plaintext the server sent unasked (which would
    /// otherwise be taken for the next request's response), a close (EOF or close_notify) or an error
    /// all mean the connection is not reused. TLS records that carry no data, such as a TLS 1.3
    /// NewSessionTicket, are consumed by rustls and leave the connection healthy.
    fn idle_and_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(self).poll_read(&mut cx, &mut buf).is_pending()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Every in-flight delivery holds a connection (HTTP/1), so the default soft limit of 1 024 descriptors
/// would cap deliveries long before memory does: raise the soft limit to the hard one, as Go and nginx
/// deployments do.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let soft = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::debug!(from = soft, to = lim.rlim_max, "raised the open-file limit");
        } else {
            tracing::warn!(
                soft,
                "could not raise the open-file limit; it caps concurrent deliveries"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A raw HTTP server on loopback: `script(connection_no, stream)` plays one connection.
    async fn raw_server<F, Fut>(script: F) -> (Target, Arc<AtomicUsize>)
    where
        F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/p?q=1", l.local_addr().unwrap());
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let n = c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(script(n, s));
            }
        });
        (Target::from_url(&Url::parse(&url).unwrap()).unwrap(), conns)
    }

    /// Reads one request (head and content-length body) and returns it.
    async fn read_request(s: &mut (impl AsyncRead + Unpin)) -> Option<(String, Vec<u8>)> {
        let mut buf = Vec::new();
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(buf[..end].to_vec()).unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                let mut body = buf[end + 4..].to_vec();
                while body.len() < len {
                    let mut b = [0u8; 1024];
                    let n = s.read(&mut b).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    body.extend_from_slice(&b[..n]);
                }
                return Some((head, body));
            }
            let mut b = [0u8; 1024];
            let n = s.read(&mut b).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&b[..n]);
        }
    }

    fn client(max_response_bytes: usize) -> Client {
        Client::new(ClientConfig {
            connect_timeout: Duration::from_secs(2),
            max_idle_per_host: 4,
            idle_timeout: Duration::from_secs(30),
            max_response_bytes,
            ..ClientConfig::new(AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]))
        })
    }

    async fn post(c: &Client, t: &Target, capture: usize) -> Result<Response, HttpError> {
        let body = Bytes::from_static(b"{\"id\":1}");
        c.post(
            t,
            |h| h.extend_from_slice(b"x-extra: 1\r\n"),
            &body,
            capture,
            tokio::time::Instant::now() + Duration::from_secs(10),
        )
        .await
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    #[tokio::test]
    async fn requests_are_well_formed_and_connections_reused() {
        let (t, conns) = raw_server(|_, mut s| async move {
            while let Some((head, body)) = read_request(&mut s).await {
                let lines: Vec<&str> = head.split("\r\n").collect();
                assert_eq!(lines[0], "POST /p?q=1 HTTP/1.1");
                assert!(lines[1].starts_with("host: 127.0.0.1:"), "{head}");
                assert_eq!(lines[2], "content-length: 8");
                assert_eq!(lines[3], "x-extra: 1");
                assert_eq!(body, b"{\"id\":1}");
                s.write_all(OK).await.unwrap();
            }
        })
        .await;
        let c = client(4096);
        for _ in 0..3 {
            let r = post(&c, &t, 10).await.unwrap();
            assert_eq!((r.status, r.excerpt.as_slice()), (200, &b"ok"[..]));
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "one keep-alive connection");
    }

    #[tokio::test]
    async fn chunked_split_and_informational_responses() {
        let (t, conns) = raw_server(|_, mut s| async move {
            while read_request(&mut s).await.is_some() {
                // A 100 Continue, then the real head one byte at a time, then a chunked body.
                let resp: &[u8] =
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nRetry-After: 7\r\n\
                    transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
                for b in resp {
                    s.write_all(&[*b]).await.unwrap();
                }
            }
        })
        .await;
        let c = client(4096);
        for _ in 0..2 {
            let r = post(&c, &t, 4).await.unwrap();
            assert_eq!(r.status, 503);
            assert_eq!(r.retry_after.as_deref(), Some("7"));
            assert_eq!(r.excerpt, b"abcd");
            assert!(r.body_error.is_none());
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "reused after a chunked body"
        );
    }

    /// Issue 18, defect 9: a 2xx with more than 64 headers, trickling in, is a 2xx (it was "invalid" and
    /// retried), and the connection is reused.
    #[tokio::test]
    async fn a_success_with_many_headers_is_a_success() {
        let (t, conns) = raw_server(|_, mut s| async move {
            while read_request(&mut s).await.is_some() {
                let mut resp = String::from("HTTP/1.1 201 Created\r\n");
                for i in 0..100 {
                    resp.push_str(&format!("x-header-{i}: value\r\n"));
                }
                resp.push_str("content-length: 2\r\n\r\nok");
                for chunk in resp.as_bytes().chunks(7) {
                    s.write_all(chunk).await.unwrap();
                }
            }
        })
        .await;
        let c = client(4096);
        for _ in 0..2 {
            let r = post(&c, &t, 4).await.unwrap();
            assert_eq!(r.status, 201);
            assert_eq!(r.excerpt, b"ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_are_reused_after_bodiless_responses() {
        // What servers such as hyper send: a 204 and a 304 without any length header, an empty 200 with
        // `content-length: 0`, and a 204 after a 100 Continue. Each leaves the connection reusable.
        const ANSWERS: [&[u8]; 4] = [
            b"HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        ];
        let (t, conns) = raw_server(|_, mut s| async move {
            let mut i = 0;
            while read_request(&mut s).await.is_some() {
                s.write_all(ANSWERS[i % ANSWERS.len()]).await.unwrap();
                i += 1;
            }
        })
        .await;
        let c = client(4096);
        for round in 0..2 {
            for want in [204, 304, 200, 204] {
                let r = post(&c, &t, 16).await.unwrap();
                assert_eq!(r.status, want, "round {round}");
                assert!(r.excerpt.is_empty() && r.body_error.is_none());
            }
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "one connection for 8 bodiless responses"
        );
    }

    #[tokio::test]
    async fn closed_idle_connections_are_not_reused_and_a_close_race_is_retried_once() {
        // Connection 0 answers once, then reads the next request and closes without answering (the
        // server timed the connection out just as it was reused). Connection 1 answers everything.
        let (t, conns) = raw_server(|n, mut s| async move {
            if n == 0 {
                read_request(&mut s).await.unwrap();
                s.write_all(OK).await.unwrap();
                read_request(&mut s).await;
                return;
            }
            while read_request(&mut s).await.is_some() {
                s.write_all(OK).await.unwrap();
            }
        })
        .await;
        let c = client(4096);
        assert_eq!(post(&c, &t, 0).await.unwrap().status, 200);
        assert_eq!(
            post(&c, &t, 0).await.unwrap().status,
            200,
            "retried on a fresh connection"
        );
        assert_eq!(conns.load(Ordering::SeqCst), 2);

        // A server that closes after each answer: the pooled connection is seen closed before reuse.
        let (t, conns) = raw_server(|_, mut s| async move {
            read_request(&mut s).await.unwrap();
            s.write_all(OK).await.unwrap();
        })
        .await;
        for _ in 0..3 {
            assert_eq!(post(&c, &t, 0).await.unwrap().status, 200);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    /// A server that writes `response` to the first request of each connection, then keeps the
    /// connection open without sending anything more.
    async fn answer_once_and_hold(response: &'static [u8]) -> (Target, Arc<AtomicUsize>) {
        raw_server(move |_, mut s| async move {
            if read_request(&mut s).await.is_some() {
                s.write_all(response).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await
    }

    /// Issue 18, defect 5: once the head is in, the status decides. A 2xx whose body stalls, and a
    /// close-delimited 2xx on a connection the server keeps open, are successes after the body bound
    /// (they timed out and were delivered again); the connection is not reused. A head that never comes
    /// is a timeout at the deadline.
    #[tokio::test]
    async fn the_status_decides_once_the_head_is_in() {
        let (t, conns) =
            answer_once_and_hold(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nok").await;
        let c = client(4096);
        let started = std::time::Instant::now();
        let r = post(&c, &t, 16).await.unwrap();
        let took = started.elapsed();
        assert_eq!(r.status, 200);
        assert!(r.body_error.is_some(), "the stalled body is reported");
        assert!(
            took >= BODY_READ_BOUND && took < BODY_READ_BOUND + Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(post(&c, &t, 0).await.unwrap().status, 200);
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "a stalled connection is not reused"
        );

        let (t, _) =
            answer_once_and_hold(b"HTTP/1.1 202 Accepted\r\n\r\nuntil close, which never comes")
                .await;
        assert_eq!(post(&c, &t, 0).await.unwrap().status, 202);

        let (t, _) = raw_server(|_, mut s| async move {
            read_request(&mut s).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let body = Bytes::from_static(b"{}");
        let started = std::time::Instant::now();
        let r = c
            .post(
                &t,
                |_| {},
                &body,
                0,
                tokio::time::Instant::now() + Duration::from_millis(300),
            )
            .await;
        assert!(matches!(r, Err(HttpError::TimedOut)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// Issue 18, defect 7: a close after a 1xx (or any response byte) is a failed attempt; the POST is
    /// not sent again on a fresh connection.
    #[tokio::test]
    async fn a_close_after_an_informational_response_is_not_resent() {
        for partial in [&b"HTTP/1.1 100 Continue\r\n\r\n"[..], b"HTTP/1.1 2"] {
            let (t, conns) = raw_server(move |n, mut s| async move {
                if n == 0 {
                    read_request(&mut s).await.unwrap();
                    s.write_all(OK).await.unwrap();
                    read_request(&mut s).await.unwrap();
                    s.write_all(partial).await.unwrap();
                    return;
                }
                while read_request(&mut s).await.is_some() {
                    s.write_all(OK).await.unwrap();
                }
            })
            .await;
            let c = client(4096);
            assert_eq!(post(&c, &t, 0).await.unwrap().status, 200);
            let second = post(&c, &t, 0).await;
            assert!(
                second.is_err(),
                "{partial:?}: {:?}",
                second.map(|r| r.status)
            );
            assert_eq!(conns.load(Ordering::SeqCst), 1, "{partial:?}: sent again");
        }
    }

    #[tokio::test]
    async fn large_bodies_close_and_broken_responses_fail() {
        let (t, conns) = raw_server(|n, mut s| async move {
            while read_request(&mut s).await.is_some() {
                let r: &[u8] = match n {
                    0 | 1 => b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nxxxx",
                    _ => b"HTTP/1.1 2x0 what\r\n\r\n",
                };
                if s.write_all(r).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let c = client(1000);
        let r = post(&c, &t, 3).await.unwrap();
        assert_eq!((r.status, r.excerpt.as_slice()), (200, &b"xxx"[..]));
        let r = post(&c, &t, 0).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "a body over the bound is not read to reuse"
        );
        match post(&c, &t, 0).await {
            Err(HttpError::Failed(m)) => assert!(m.starts_with("invalid response"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn refused_destinations_are_not_connected() {
        let (t, conns) = raw_server(|_, _| async {}).await;
        let strict = Client::new(ClientConfig::new(AddressPolicy::new(vec![])));
        assert!(matches!(
            post(&strict, &t, 0).await,
            Err(HttpError::Refused(_))
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(conns.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn targets_from_urls() {
        let t = Target::from_url(&Url::parse("http://example.com/hook?a=1").unwrap()).unwrap();
        assert_eq!(
            (&*t.host, t.port, &*t.host_header, &*t.path, t.tls),
            ("example.com", 80, "example.com", "/hook?a=1", false)
        );
        let t = Target::from_url(&Url::parse("https://[::1]:8443").unwrap()).unwrap();
        assert_eq!(
            (&*t.host, t.port, &*t.host_header, &*t.path, t.tls),
            ("::1", 8443, "[::1]:8443", "/", true)
        );
        assert_eq!(t.ip, Some("::1".parse().unwrap()));
        let a = Target::from_url(&Url::parse("http://h:80/x").unwrap()).unwrap();
        let b = Target::from_url(&Url::parse("http://h/y").unwrap()).unwrap();
        assert_eq!(a.key, b.key, "same origin, same pool");
        let c = Target::from_url(&Url::parse("https://h/y").unwrap()).unwrap();
        assert_ne!(b.key, c.key);
    }

    // ---- pool lifetime, sweeping, keepalive, Happy Eyeballs (defect 10) ----

    /// A server that answers every request with 204 on every connection.
    async fn server_204() -> (Target, Arc<AtomicUsize>) {
        raw_server(|_, mut s| async move {
            while read_request(&mut s).await.is_some() {
                if s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
        .await
    }

    #[tokio::test]
    async fn connections_past_their_lifetime_are_not_reused_and_sweeps_close_idle_ones() {
        let (t, conns) = server_204().await;
        let c = Client::new(ClientConfig {
            max_lifetime: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(250),
            ..ClientConfig::new(AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]))
        });
        // Reused while young and recently used.
        for _ in 0..3 {
            assert_eq!(post(&c, &t, 0).await.unwrap().status, 204);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        // Used again 150 ms after its last use (within the idle timeout) but 350 ms after it was
        // opened (past its lifetime): a new connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(post(&c, &t, 0).await.unwrap().status, 204);
        assert_eq!(conns.load(Ordering::SeqCst), 2, "lifetime ended reuse");
        assert_eq!(c.idle_connections(), 1);
        // Nothing delivered any more: a sweep (no check-in needed) closes it once idle too long.
        c.sweep();
        assert_eq!(c.idle_connections(), 1, "still fresh");
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.sweep();
        assert_eq!(c.idle_connections(), 0, "swept");
    }

    #[tokio::test]
    async fn tcp_keepalive_is_set_on_new_connections() {
        let (t, _) = server_204().await;
        let c = client(0);
        assert_eq!(post(&c, &t, 0).await.unwrap().status, 204);
        let conn = c.checkout(&t).unwrap();
        let Stream::Plain(tcp) = &conn.io else {
            panic!("plain")
        };
        let sock = socket2::SockRef::from(tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
    }

    #[test]
    fn address_families_alternate() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            interleave_families(vec![
                a("[::1]:1"),
                a("[::2]:1"),
                a("[::3]:1"),
                a("1.0.0.1:1")
            ]),
            vec![a("[::1]:1"), a("1.0.0.1:1"), a("[::2]:1"), a("[::3]:1")]
        );
        assert_eq!(
            interleave_families(vec![
                a("1.0.0.1:1"),
                a("1.0.0.2:1"),
                a("[::1]:1"),
                a("[::2]:1")
            ]),
            vec![a("1.0.0.1:1"), a("[::1]:1"), a("1.0.0.2:1"), a("[::2]:1")]
        );
        assert!(interleave_families(vec![]).is_empty());
    }

    #[tokio::test]
    async fn a_hanging_address_does_not_wait_for_its_connect_timeout() {
        // A listener whose accept queue is full: Linux drops further SYNs, so a connect to it hangs.
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        sock.listen(0).unwrap();
        let hanging = sock.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(hanging)).await
            {
                fillers.push(s);
            }
        }
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let c = Client::new(ClientConfig {
            connect_timeout: Duration::from_secs(5),
            ..ClientConfig::new(AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]))
        });
        let started = Instant::now();
        let s = c.connect_tcp(vec![hanging, good_addr]).await.unwrap();
        let took = started.elapsed();
        assert_eq!(s.peer_addr().unwrap(), good_addr);
        assert!(
            took >= ATTEMPT_DELAY - Duration::from_millis(20) && took < Duration::from_secs(2),
            "second address tried after the attempt delay, not the 5 s timeout: {took:?}"
        );
        // A refused address fails at once and the next is tried immediately.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = closed.local_addr().unwrap();
        drop(closed);
        let started = Instant::now();
        c.connect_tcp(vec![refused, good_addr]).await.unwrap();
        assert!(started.elapsed() < ATTEMPT_DELAY, "{:?}", started.elapsed());
        let e = c.connect_tcp(vec![refused]).await.unwrap_err();
        assert!(e.starts_with("connect error: 127.0.0.1:"), "{e}");
    }

    // ---- an early answer while the request is still being written (defect 4) ----

    #[tokio::test]
    async fn an_answer_before_the_request_is_read_decides_the_attempt() {
        // The server reads only the head, answers 413 and closes with the body unread (so the kernel
        // resets the connection): writing the 8 MiB body fails, and the 413 must still be the outcome.
        let (t, _) = raw_server(|_, mut s| async move {
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(
                b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            drop(s);
        })
        .await;
        let c = client(4096);
        let body = Bytes::from(vec![b'x'; 8 << 20]);
        let r = c
            .post(
                &t,
                |_| {},
                &body,
                0,
                tokio::time::Instant::now() + Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 413);
        assert_eq!(c.idle_connections(), 0);
    }

    // ---- TLS (defects 2 and 6, reuse over TLS) ----

    struct TestCa {
        issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl TestCa {
        fn new() -> TestCa {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "hookline test CA");
            let key = rcgen::KeyPair::generate().unwrap();
            TestCa {
                issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
            }
        }

        fn root(&self) -> rustls::pki_types::CertificateDer<'static> {
            self.issuer.der().clone()
        }

        fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
            let params = rcgen::CertificateParams::new(
                names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
            let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der)
            .unwrap();
            Arc::new(cfg)
        }
    }

    type TlsServerStream = tokio_rustls::server::TlsStream<TcpStream>;

    /// An HTTPS server on loopback with a certificate for `localhost`, playing `script` per connection.
    async fn tls_server<F, Fut>(ca: &TestCa, script: F) -> (Target, Arc<AtomicUsize>)
    where
        F: Fn(usize, TlsServerStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(&["localhost"]));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://localhost:{}/p", l.local_addr().unwrap().port());
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (acceptor, c, script) = (acceptor.clone(), c.clone(), script.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(s).await {
                        let n = c.fetch_add(1, Ordering::SeqCst);
                        script(n, tls).await;
                    }
                });
            }
        });
        (Target::from_url(&Url::parse(&url).unwrap()).unwrap(), conns)
    }

    /// A client trusting `ca`; `localhost` resolves to 127.0.0.1, which the policy allows.
    fn tls_client(ca: &TestCa) -> Client {
        Client::new(ClientConfig {
            extra_roots: vec![ca.root()],
            ..ClientConfig::new(AddressPolicy::new(vec![
                "127.0.0.0/8".parse().unwrap(),
                "::1/128".parse().unwrap(),
            ]))
        })
    }

    #[tokio::test]
    async fn tls_connections_are_reused_across_key_updates() {
        // After each response the server also sends a TLS record that carries no data (a KeyUpdate,
        // like a NewSessionTicket): the raw socket is readable, but the connection is healthy. The
        // probe goes through rustls, which consumes the record, so the connection is reused.
        let ca = TestCa::new();
        let (t, conns) = tls_server(&ca, |_, mut s| async move {
            while read_request(&mut s).await.is_some() {
                s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .unwrap();
                s.flush().await.unwrap();
                // Separately, once the client has read the response.
                tokio::time::sleep(Duration::from_millis(10)).await;
                s.get_mut().1.refresh_traffic_keys().unwrap();
                s.flush().await.unwrap();
            }
        })
        .await;
        let c = tls_client(&ca);
        for _ in 0..5 {
            assert_eq!(post(&c, &t, 0).await.unwrap().status, 204);
            // Let the KeyUpdate arrive before the next checkout.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "one TLS connection");
    }

    #[tokio::test]
    async fn plaintext_left_inside_tls_is_never_read_as_the_next_response() {
        // The server's response is exactly READ_CHUNK bytes (what the client's first read takes), and
        // the same TLS record carries a second, unasked response. After the first read, those bytes
        // sit decrypted inside rustls — not in the client's buffer, not on the socket.
        let ca = TestCa::new();
        let (t, conns) = tls_server(&ca, |_, mut s| async move {
            let prefix = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-pad: ";
            let pad = READ_CHUNK - prefix.len() - "\r\n\r\nok".len();
            let mut first = format!("{prefix}{}\r\n\r\nok", "p".repeat(pad)).into_bytes();
            assert_eq!(first.len(), READ_CHUNK);
            first.extend_from_slice(
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n",
            );
            while read_request(&mut s).await.is_some() {
                s.write_all(&first).await.unwrap();
                s.flush().await.unwrap();
            }
        })
        .await;
        let c = tls_client(&ca);
        for _ in 0..3 {
            let r = post(&c, &t, 0).await.unwrap();
            assert_eq!(r.status, 200, "the stray 500 was read as a response");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3, "each connection dropped");
    }

    #[tokio::test]
    async fn a_close_delimited_answer_keeps_its_status_with_or_without_close_notify() {
        let ca = TestCa::new();
        let (t, _) = tls_server(&ca, |n, mut s| async move {
            read_request(&mut s).await.unwrap();
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\n\r\nbusy")
                .await
                .unwrap();
            s.flush().await.unwrap();
            if n == 0 {
                // A clean close: close_notify, then FIN.
                s.shutdown().await.unwrap();
            } else {
                // A raw close: FIN without close_notify.
                let (tcp, _) = s.into_inner();
                let mut tcp = tcp;
                tcp.shutdown().await.unwrap();
            }
        })
        .await;
        let c = tls_client(&ca);
        for what in ["close_notify", "raw EOF"] {
            let r = post(&c, &t, 16).await.unwrap();
            assert_eq!(r.status, 503, "{what}");
            assert_eq!(r.retry_after.as_deref(), Some("7"), "{what}");
            assert_eq!(r.excerpt, b"busy", "{what}");
            assert!(r.body_error.is_none(), "{what}: {:?}", r.body_error);
        }
    }

    #[tokio::test]
    async fn a_raw_close_inside_a_length_framed_tls_body_is_a_body_error() {
        let ca = TestCa::new();
        let (t, _) = tls_server(&ca, |_, mut s| async move {
            read_request(&mut s).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
                .await
                .unwrap();
            s.flush().await.unwrap();
            let (mut tcp, _) = s.into_inner();
            tcp.shutdown().await.unwrap();
        })
        .await;
        let r = post(&tls_client(&ca), &t, 0).await.unwrap();
        assert_eq!(r.status, 200, "the status decides");
        assert!(r.body_error.is_some(), "truncated body noticed");
    }

    #[tokio::test]
    async fn server_certificates_are_verified() {
        let ca = TestCa::new();
        let (t, _) = tls_server(&ca, |_, mut s| async move {
            while read_request(&mut s).await.is_some() {
                s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .unwrap();
            }
        })
        .await;
        // Trusted CA, right name.
        assert_eq!(post(&tls_client(&ca), &t, 0).await.unwrap().status, 204);
        // Unknown CA (only the platform roots).
        let c = Client::new(ClientConfig::new(AddressPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ])));
        let e = post(&c, &t, 0).await.unwrap_err().to_string();
        assert!(
            e.starts_with("tls error:") && e.contains("UnknownIssuer"),
            "{e}"
        );
        // Right CA, wrong name: the certificate is for localhost, the URL says 127.0.0.1.
        let by_ip =
            Target::from_url(&Url::parse(&format!("https://127.0.0.1:{}/p", t.port)).unwrap())
                .unwrap();
        let e = post(&tls_client(&ca), &by_ip, 0)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("tls error:") && e.contains("not valid for name"),
            "{e}"
        );
    }
}
