//! How client addresses are counted by per-client limits (connections per address, failed AUTH
//! attempts): an IPv4 address on its own, an IPv6 client by its /64, since one host commonly
//! holds a whole /64 and could otherwise walk around any per-address limit.

use std::net::{IpAddr, Ipv6Addr};

/// The address a per-client limit counts: the IPv4 address (IPv4-mapped IPv6 included), or the
/// IPv6 /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_keys() {
        let cases = [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2:ffff::1", "2001:db8:1:2::"),
            ("2001:db8:1:3::1", "2001:db8:1:3::"),
        ];
        for (ip, want) in cases {
            assert_eq!(client_key(ip.parse().unwrap()), want.parse::<IpAddr>().unwrap(), "{ip}");
        }
    }
}
