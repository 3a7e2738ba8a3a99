//! A DNS server for tests (UDP on 127.0.0.1, built on hickory-proto's message codec): names answer with
//! A records and a TTL, or after a delay, or never (black-holed); it logs every query it receives, so
//! tests see caching and coalescing from the server's side.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, SOA};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hookline::deliver::resolve::Resolver;

/// How the server treats a name.
#[derive(Clone, Debug)]
pub enum Answer {
    /// A records with this TTL (seconds); AAAA queries get an empty answer.
    A(Vec<Ipv4Addr>, u32),
    /// The same, after a delay.
    Delayed(Vec<Ipv4Addr>, u32, Duration),
    /// Never answered.
    BlackHole,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<HashMap<String, Answer>>>,
    queries: Arc<Mutex<Vec<(String, RecordType)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = sock.local_addr().unwrap();
        let zone: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let queries: Arc<Mutex<Vec<(String, RecordType)>>> = Arc::default();
        let (z, q) = (zone.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(msg) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(query) = msg.queries.first().cloned() else {
                    continue;
                };
                let name = query.name().to_lowercase().to_ascii();
                let name = name.trim_end_matches('.').to_string();
                q.lock().unwrap().push((name.clone(), query.query_type()));
                let answer = z.lock().unwrap().get(&name).cloned();
                let mut resp =
                    Message::new(msg.metadata.id, MessageType::Response, msg.metadata.op_code);
                resp.metadata.recursion_desired = msg.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                resp.add_query(query.clone());
                let (ips, ttl, delay) = match answer {
                    None => {
                        resp.metadata.response_code = ResponseCode::NXDomain;
                        (Vec::new(), 5, Duration::ZERO)
                    }
                    Some(Answer::BlackHole) => continue,
                    Some(Answer::A(ips, ttl)) => (ips, ttl, Duration::ZERO),
                    Some(Answer::Delayed(ips, ttl, d)) => (ips, ttl, d),
                };
                if query.query_type() == RecordType::A && !ips.is_empty() {
                    for ip in ips {
                        resp.add_answer(Record::from_rdata(
                            query.name().clone(),
                            ttl,
                            RData::A(A(ip)),
                        ));
                    }
                } else {
                    // No such name, or no record of this type: an SOA in the authority section
                    // gives the negative answer its TTL (RFC 2308), as real servers do.
                    let zone = Name::from_ascii("test.").unwrap();
                    resp.add_authority(Record::from_rdata(
                        zone.clone(),
                        ttl,
                        RData::SOA(SOA::new(zone.clone(), zone, 1, 60, 60, 60, ttl)),
                    ));
                }
                let Ok(bytes) = resp.to_vec() else {
                    continue;
                };
                let sock = sock.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = sock.send_to(&bytes, from).await;
                });
            }
        });
        DnsServer {
            addr,
            zone,
            queries,
            task,
        }
    }

    pub fn set(&self, name: &str, answer: Answer) {
        self.zone.lock().unwrap().insert(name.to_string(), answer);
    }

    /// Queries received for `name` (A and AAAA counted separately).
    pub fn queries_for(&self, name: &str) -> usize {
        self.queries
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .count()
    }

    /// A hookline resolver asking only this server.
    pub fn resolver(&self, timeout: Duration) -> Resolver {
        Resolver::new(&[self.addr], timeout).unwrap()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
