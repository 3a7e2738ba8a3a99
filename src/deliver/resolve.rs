//! DNS for deliveries: asynchronous (hickory), bounded in time, cached, and coalesced.
//!
//! `getaddrinfo` on tokio's blocking pool, which this replaces, could not be cancelled: a name whose
//! DNS server never answers kept a blocking thread per lookup, so a burst of deliveries to one such
//! endpoint could occupy every blocking thread and delay everything else that uses them (SQLite
//! writes, Kafka admin calls, file reads). Here a lookup is a future like any other I/O:
//! - each query has `delivery.dns_timeout` (one attempt per server), and dropping the caller (its
//!   delivery deadline) ends its wait;
//! - answers are cached by hickory's LRU cache, bounded to [`CACHE_ENTRIES`] names, each entry for its
//!   record TTL (at most [`MAX_TTL`]; a name that does not exist, at most [`MAX_NEGATIVE_TTL`]);
//! - concurrent lookups of one name share a single query, so a thousand deliveries to a black-holed
//!   name cost one outstanding query, not a thousand.
//!
//! The resolver only finds addresses; every one of them is still judged by the address policy before a
//! connection is made (`http::Client::connect`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

/// Names kept in the cache.
pub const CACHE_ENTRIES: u64 = 4096;
/// Longest an answer is cached, whatever its TTL says.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Longest a "no such name" answer is cached.
pub const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(30);

type Lookup = Shared<BoxFuture<'static, Result<Arc<[IpAddr]>, String>>>;

pub struct Resolver {
    inner: TokioResolver,
    /// Lookups in progress, by name: later callers wait on the same query.
    inflight: Arc<Mutex<HashMap<Box<str>, Lookup>>>,
}

impl Resolver {
    /// Queries `servers` (`ip:port`), or the system's name servers (`/etc/resolv.conf`) when empty;
    /// `/etc/hosts` is consulted first either way.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Resolver, String> {
        let mut builder = if servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| {
                format!("cannot read the system's DNS configuration (/etc/resolv.conf): {e}")
            })?
        } else {
            let servers = servers
                .iter()
                .map(|a| {
                    let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                    for c in &mut ns.connections {
                        c.port = a.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.cache_size = CACHE_ENTRIES;
        opts.positive_max_ttl = Some(MAX_TTL);
        opts.negative_max_ttl = Some(MAX_NEGATIVE_TTL);
        // Both families, for Happy Eyeballs (http::Client::connect_tcp interleaves them).
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.use_hosts_file = ResolveHosts::Always;
        let inner = builder
            .build()
            .map_err(|e| format!("cannot set up the DNS resolver: {e}"))?;
        Ok(Resolver {
            inner,
            inflight: Arc::default(),
        })
    }

    /// The addresses of `host` (a name, not an IP literal).
    pub async fn lookup(&self, host: &str) -> Result<Arc<[IpAddr]>, String> {
        let shared = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = inflight.get(host) {
                l.clone()
            } else {
                let (resolver, map, name) = (
                    self.inner.clone(),
                    self.inflight.clone(),
                    Box::<str>::from(host),
                );
                // A fully qualified name: endpoint URLs name hosts, not search-list suffixes.
                let fqdn = if host.ends_with('.') {
                    host.to_string()
                } else {
                    format!("{host}.")
                };
                let key = name.clone();
                let query = async move {
                    let r = resolver.lookup_ip(fqdn.as_str()).await;
                    // Done: the next caller starts a new query (answered from the cache if fresh).
                    map.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                    match r {
                        Ok(ips) => {
                            let v: Vec<IpAddr> = ips.iter().collect();
                            if v.is_empty() {
                                Err("no addresses".to_string())
                            } else {
                                Ok(Arc::from(v))
                            }
                        }
                        Err(e) => Err(e.to_string()),
                    }
                };
                // Its own task: the query runs to its timeout and leaves the map even if every
                // caller gave up waiting first.
                let task = tokio::spawn(query);
                let shared = async move {
                    task.await
                        .unwrap_or_else(|e| Err(format!("dns lookup task failed: {e}")))
                }
                .boxed()
                .shared();
                inflight.insert(name, shared.clone());
                shared
            }
        };
        shared.await
    }

    /// Lookups in progress (tests).
    pub fn inflight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}
