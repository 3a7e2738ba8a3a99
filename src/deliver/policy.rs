//! Outbound address policy (SSRF protection). Destinations in loopback, private, shared (CGNAT),
//! link-local, site-local, unspecified, multicast, broadcast, benchmarking, documentation and IETF
//! protocol ranges are refused after DNS resolution unless an allow-listed network contains them. IPv6
//! addresses that carry an IPv4 address a gateway will reach (IPv4-mapped, IPv4-compatible, the NAT64
//! well-known prefix 64:ff9b::/96) are judged as that IPv4 address; transition prefixes whose gateway
//! or embedding cannot be judged here (6to4 2002::/16, Teredo 2001::/32, local-use NAT64
//! 64:ff9b:1::/48) are refused. IP-literal URLs are checked before the request is made; names
//! are checked by the delivery client ([`super::http`]), which filters what DNS returned, so a name
//! pointing at 127.0.0.1 is refused just like the literal.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Arc<[IpNet]>,
}

/// A destination refused by the policy.
#[derive(Debug, thiserror::Error)]
#[error("address policy refused {addr} ({class}); add it to delivery.allow_networks to permit it")]
pub struct AddressRefused {
    pub addr: IpAddr,
    pub class: &'static str,
}

impl AddressPolicy {
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self {
            allow: allow.into(),
        }
    }

    /// `Err` when the address may not be contacted.
    pub fn check(&self, ip: IpAddr) -> Result<(), AddressRefused> {
        let ip = canonical(ip);
        let Some(class) = restricted_class(ip) else {
            return Ok(());
        };
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        Err(AddressRefused { addr: ip, class })
    }
}

/// IPv4-mapped and NAT64 (64:ff9b::/96) IPv6 addresses are judged as the IPv4 address they carry:
/// a NAT64 gateway turns `[64:ff9b::a00:5]` into 10.0.0.5.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                IpAddr::V4(v4)
            } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                IpAddr::V4(low_v4(s))
            } else {
                IpAddr::V6(v6)
            }
        }
        v4 => v4,
    }
}

/// The IPv4 address in the last 32 bits.
fn low_v4(s: [u16; 8]) -> Ipv4Addr {
    Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8)
}

fn restricted_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared address space")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if o[..3] == [192, 0, 0] {
        Some("IETF protocol assignments")
    } else if o[..3] == [192, 0, 2] || o[..3] == [198, 51, 100] || o[..3] == [203, 0, 113] {
        Some("documentation")
    } else if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        Some("multicast/reserved")
    } else {
        None
    }
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("private")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("site-local")
    } else if s[0] == 0x2002 {
        Some("6to4")
    } else if s[0] == 0x2001 && s[1] == 0 {
        Some("teredo")
    } else if s[..3] == [0x64, 0xff9b, 1] {
        Some("local-use NAT64")
    } else if s[0] == 0x2001 && s[1] == 0xdb8 {
        Some("documentation")
    } else if ip.is_multicast() {
        Some("multicast/reserved")
    } else if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
        // IPv4-compatible (deprecated) ::a.b.c.d
        v4_class(low_v4(s)).or(Some("ipv4-compatible"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(p: &AddressPolicy, s: &str) -> bool {
        p.check(s.parse().unwrap()).is_err()
    }

    #[test]
    fn refuses_internal_ranges_by_default() {
        let p = AddressPolicy::default();
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "ff02::1",
            "::127.0.0.1",
            // NAT64 well-known prefix: judged by the IPv4 address inside.
            "64:ff9b::a00:5",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            // Transition prefixes whose far end cannot be judged here.
            "64:ff9b:1::a00:5",
            "64:ff9b:1:ab::808:808",
            "2002:a00:5::1",
            "2002:808:808::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            // Site-local, documentation, benchmarking, IETF protocol assignments.
            "fec0::1",
            "feff::1",
            "2001:db8::1",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
        ] {
            assert!(refused(&p, a), "{a} should be refused");
        }
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "198.17.255.255",
            "198.20.0.1",
            "192.0.1.1",
            "2001:1::1",
            "2001:4860:4860::8888",
        ] {
            assert!(!refused(&p, a), "{a} should be allowed");
        }
    }

    #[test]
    fn allow_list_reopens_ranges() {
        let p = AddressPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        assert!(!refused(&p, "127.0.0.1"));
        assert!(!refused(&p, "::ffff:127.0.0.1"));
        assert!(!refused(&p, "::1"));
        assert!(refused(&p, "10.0.0.1"));
        let e = p.check("10.0.0.1".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("10.0.0.1") && e.to_string().contains("private"));
        // A NAT64 address is judged, and reopened, as the IPv4 address it reaches.
        let e = p.check("64:ff9b::a00:5".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("10.0.0.5"), "{e}");
        assert!(!refused(&p, "64:ff9b::7f00:1"));
        let p = AddressPolicy::new(vec!["2002::/16".parse().unwrap()]);
        assert!(
            !refused(&p, "2002:808:808::1"),
            "an allow-list reopens 6to4"
        );
    }
}
