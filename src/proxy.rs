//! The egress proxy for deliveries (`[delivery] proxy`, `no_proxy`), for deployments whose endpoints
//! must see requests come from fixed addresses: its settings (parsed and checked with the config, so
//! this module sits below both `config` and `deliver`) and the CONNECT tunnel (used by
//! `deliver::http`).
//!
//! HTTPS goes through a `CONNECT` tunnel, plain HTTP as absolute-form requests. Either way the proxy
//! is told an address, never a name: hookline resolves the destination itself and the address policy
//! judges every address first (`http::Client::connect`), so a name cannot be re-resolved by the
//! proxy to somewhere the policy refuses. TLS still verifies the certificate against the URL's host
//! name, and the `Host` header still names it (a proxy forwarding an absolute-form request rewrites
//! `Host` to the address, RFC 9112 §3.2.2).

use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest CONNECT response head accepted.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

#[derive(Clone)]
pub struct Proxy {
    /// Host (name or IP literal, no brackets) and port of the proxy.
    pub host: Box<str>,
    pub port: u16,
    /// `Basic …` for `Proxy-Authorization`, from the URL's user and password.
    auth: Option<Box<str>>,
    no_proxy: Vec<Bypass>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Bypass {
    /// `*`: no destination uses the proxy.
    All,
    /// A host name and its subdomains (`example.com` and `.example.com` both match
    /// `api.example.com`).
    Domain(Box<str>),
    /// An address or network of IP-literal destinations.
    Net(IpNet),
}

impl Proxy {
    /// From `http://[user:password@]host:port` and the `no_proxy` entries (host names, `.suffix`
    /// names, IPs, CIDRs, or `*`). Errors say what is wrong; the caller names the setting.
    pub fn parse(url: &str, no_proxy: &[String]) -> Result<Proxy, (Option<usize>, String)> {
        let u = url::Url::parse(url).map_err(|e| (None, format!("{url:?} is not a URL ({e})")))?;
        if u.scheme() != "http" {
            return Err((
                None,
                "must be an http:// proxy URL (TLS to the proxy is not supported)".into(),
            ));
        }
        let host = match u.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err((None, "must have a host".into())),
        };
        if u.path() != "/" && !u.path().is_empty() || u.query().is_some() {
            return Err((None, "must be only scheme, host and port".into()));
        }
        let port = u.port_or_known_default().unwrap_or(80);
        let auth = if u.username().is_empty() {
            None
        } else {
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| (None, "user or password is not valid UTF-8".to_string()))
            };
            let user = dec(u.username())?;
            let pass = dec(u.password().unwrap_or(""))?;
            let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            Some(format!("Basic {b64}").into())
        };
        let no_proxy = no_proxy
            .iter()
            .enumerate()
            .map(|(i, e)| parse_bypass(e).map_err(|m| (Some(i), m)))
            .collect::<Result<_, _>>()?;
        Ok(Proxy {
            host: host.into(),
            port,
            auth,
            no_proxy,
        })
    }

    /// True when `host` (a name, or the text of `ip` for an IP-literal URL) goes direct.
    pub fn bypass(&self, host: &str, ip: Option<IpAddr>) -> bool {
        let host = host.trim_end_matches('.');
        self.no_proxy.iter().any(|b| match b {
            Bypass::All => true,
            Bypass::Net(n) => ip.is_some_and(|ip| n.contains(&ip)),
            Bypass::Domain(d) => {
                ip.is_none()
                    && (host.eq_ignore_ascii_case(d)
                        || host.len() > d.len()
                            && host.as_bytes()[host.len() - d.len() - 1] == b'.'
                            && host[host.len() - d.len()..].eq_ignore_ascii_case(d))
            }
        })
    }

    /// The `Proxy-Authorization` value, if the proxy URL had credentials.
    pub fn authorization(&self) -> Option<&str> {
        self.auth.as_deref()
    }

    /// Asks the proxy, over `tcp`, for a tunnel to `to`; returns the stream once it answered 2xx.
    pub async fn tunnel(&self, mut tcp: TcpStream, to: SocketAddr) -> Result<TcpStream, String> {
        let authority = authority(to);
        let mut req = format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n");
        if let Some(a) = &self.auth {
            req.push_str("proxy-authorization: ");
            req.push_str(a);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("proxy error: sending CONNECT: {e}"))?;
        // Read exactly the response head: bytes after it belong to the tunnel (none are expected
        // before the client speaks, but reading one byte at a time past the head would be wrong).
        let mut head = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= MAX_CONNECT_HEAD {
                return Err("proxy error: CONNECT response head too large".into());
            }
            match tcp.read(&mut byte).await {
                Ok(0) => return Err("proxy error: closed during CONNECT".into()),
                Ok(_) => head.push(byte[0]),
                Err(e) => return Err(format!("proxy error: reading the CONNECT response: {e}")),
            }
        }
        let mut hdrs = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut hdrs);
        match resp.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err("proxy error: invalid CONNECT response".into()),
        }
        match resp.code {
            Some(c) if (200..300).contains(&c) => Ok(tcp),
            Some(c) => Err(format!(
                "proxy error: CONNECT {authority} answered {c} {}",
                resp.reason.unwrap_or("")
            )),
            None => Err("proxy error: invalid CONNECT response".into()),
        }
    }
}

/// `ip:port`, bracketed for IPv6.
pub fn authority(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v) => v.to_string(),
        SocketAddr::V6(v) => format!("[{}]:{}", v.ip(), v.port()),
    }
}

fn parse_bypass(e: &str) -> Result<Bypass, String> {
    let e = e.trim();
    if e == "*" {
        return Ok(Bypass::All);
    }
    if let Ok(n) = e.parse::<IpNet>() {
        return Ok(Bypass::Net(n));
    }
    if let Ok(ip) = e.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        return Ok(Bypass::Net(IpNet::from(ip)));
    }
    let d = e.trim_start_matches('.').trim_end_matches('.');
    let ok = !d.is_empty()
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(format!(
            "{e:?} is not a host name, .domain suffix, IP, CIDR or \"*\""
        ));
    }
    Ok(Bypass::Domain(d.to_ascii_lowercase().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_credentials() {
        let p = Proxy::parse("http://egress.internal:3128", &[]).unwrap();
        assert_eq!((&*p.host, p.port), ("egress.internal", 3128));
        assert!(p.authorization().is_none());
        let p = Proxy::parse("http://us%40r:p%3Ass@10.0.0.1:8080/", &[]).unwrap();
        // base64("us@r:p:ss")
        assert_eq!(p.authorization(), Some("Basic dXNAcjpwOnNz"));
        assert!(!format!("{p:?}").contains("dXNA"), "credentials redacted");
        assert_eq!(
            Proxy::parse("http://[::1]:3128", &[])
                .unwrap()
                .host
                .as_ref(),
            "::1"
        );
        for bad in [
            "https://p:3128",
            "socks5://p:1080",
            "not a url",
            "http://p:3128/path",
        ] {
            assert!(Proxy::parse(bad, &[]).is_err(), "{bad}");
        }
        let e = Proxy::parse("http://p:1", &["ok.example".into(), "bad name!".into()]).unwrap_err();
        assert_eq!(e.0, Some(1));
    }

    #[test]
    fn no_proxy_matches_names_suffixes_and_networks() {
        let p = Proxy::parse(
            "http://p:1",
            &[
                "example.com".into(),
                ".corp.test".into(),
                "10.0.0.0/8".into(),
                "::1".into(),
            ],
        )
        .unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(p.bypass("example.com", None));
        assert!(p.bypass("API.Example.com.", None));
        assert!(!p.bypass("badexample.com", None));
        assert!(p.bypass("a.corp.test", None));
        assert!(p.bypass("corp.test", None));
        assert!(p.bypass("10.1.2.3", ip("10.1.2.3")));
        assert!(!p.bypass("11.1.2.3", ip("11.1.2.3")));
        assert!(p.bypass("::1", ip("::1")));
        assert!(!p.bypass("hooks.partner.io", None));
        let all = Proxy::parse("http://p:1", &["*".into()]).unwrap();
        assert!(all.bypass("anything", None));
    }

    #[test]
    fn authorities_bracket_ipv6() {
        assert_eq!(authority("1.2.3.4:443".parse().unwrap()), "1.2.3.4:443");
        assert_eq!(authority("[::1]:8443".parse().unwrap()), "[::1]:8443");
    }
}
