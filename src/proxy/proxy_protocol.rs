//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, v1 text and
//! v2 binary, TCP over IPv4/IPv6) that tells a backend who the client is
//! and which address it dialled, sent before any byte of the client's.
//!
//! The destination is the address the client dialled: for traffic that
//! iptables REDIRECTed (ClusterIP, externalIP, LB IP) `SO_ORIGINAL_DST` /
//! `IP6T_SO_ORIGINAL_DST` gives the service address; otherwise (NodePort,
//! the listener dialled directly, no conntrack) the accepted socket's local
//! address is the destination.
//!
//! The header goes out in the same segment as the client's first bytes: it
//! is written with one `write` together with whatever the client has sent
//! (usually the request is already there once the backend dial completes).
//! A client that stays silent for [`FIRST_BYTES_WAIT`] (a server-speaks-first
//! protocol) gets the header sent alone, so the backend can greet it.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use super::conn::{Connection, Dir};
use crate::model::ProxyProtocol;

/// v2 signature: the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest header this module writes (v1 TCP6 with the longest
/// addresses is 104 bytes; v2 TCP6 is 52).
pub const HEADER_MAX: usize = 107;

/// How long the client's first bytes are awaited so the header can share
/// their segment; after it the header goes alone (server-first protocols
/// such as SMTP or MySQL pay this once per connection).
pub const FIRST_BYTES_WAIT: Duration = Duration::from_millis(20);

/// The most client bytes sent together with the header.
pub const FIRST_READ: usize = 16 * 1024;

/// The pair in the family the header uses: both IPv4 (IPv4-mapped IPv6
/// counts as IPv4), else both IPv6 (an IPv4 one mapped).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (s, d) = (canon(src), canon(dst));
    if s.is_ipv4() == d.is_ipv4() {
        return (s, d);
    }
    let v6 = |a: SocketAddr| -> SocketAddr {
        let ip: Ipv6Addr = match a.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        SocketAddr::new(IpAddr::V6(ip), a.port())
    };
    (v6(s), v6(d))
}

/// Appends the header for a TCP connection from `src` to `dst`.
pub fn encode(version: ProxyProtocol, src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    let (src, dst) = same_family(src, dst);
    match version {
        ProxyProtocol::V1 => {
            let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            out.extend_from_slice(
                format!(
                    "PROXY {proto} {} {} {} {}\r\n",
                    src.ip(),
                    dst.ip(),
                    src.port(),
                    dst.port()
                )
                .as_bytes(),
            );
        }
        ProxyProtocol::V2 => {
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x21); // version 2, command PROXY
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11); // AF_INET, STREAM
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let v6 = |ip: IpAddr| match ip {
                        IpAddr::V6(v6) => v6.octets(),
                        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    };
                    out.push(0x21); // AF_INET6, STREAM
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6(s));
                    out.extend_from_slice(&v6(d));
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
}

/// The address the client dialled: the pre-REDIRECT destination when
/// iptables redirected the connection, else the socket's local address.
pub fn original_dst(client: &TcpStream) -> io::Result<SocketAddr> {
    let local = client.local_addr()?;
    let sock = socket2::SockRef::from(client);
    let orig = if local.ip().to_canonical().is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    // ENOENT (no conntrack entry), ENOPROTOOPT (no nf_conntrack): not
    // redirected, the local address is what the client dialled.
    Ok(orig.ok().and_then(|a| a.as_socket()).unwrap_or(local))
}

/// When `version` is set: sends the header for `conn`'s client to its
/// backend, in one write with the client's first bytes when they come
/// within [`FIRST_BYTES_WAIT`] (counted as moved client → backend).
/// Nothing is done when `version` is `None`. On error both sockets are set
/// to reset on close.
pub async fn send(version: Option<ProxyProtocol>, conn: &Connection) -> io::Result<()> {
    let Some(version) = version else {
        return Ok(());
    };
    let r = send_header(version, conn).await;
    if r.is_err() {
        conn.reset_on_close();
    }
    r
}

async fn send_header(version: ProxyProtocol, conn: &Connection) -> io::Result<()> {
    let (client, backend) = (&conn.client, &conn.backend);
    let dst = original_dst(client)?;
    let mut buf = Vec::with_capacity(HEADER_MAX + FIRST_READ);
    encode(version, conn.peer, dst, &mut buf);
    let header_len = buf.len();
    buf.resize(header_len + FIRST_READ, 0);
    let deadline = tokio::time::Instant::now() + FIRST_BYTES_WAIT;
    let mut got = 0;
    // Readiness may be stale (a fresh registration reports ready): retry
    // until bytes, EOF, an error, or the deadline.
    while let Ok(ready) = tokio::time::timeout_at(deadline, client.readable()).await {
        ready?;
        match client.try_read(&mut buf[header_len..]) {
            Ok(n) => {
                got = n;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(header_len + got);
    let mut off = 0;
    while off < buf.len() {
        backend.writable().await?;
        match backend.try_write(&buf[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    conn.count(Dir::Up, buf.len() - header_len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: ProxyProtocol, src: &str, dst: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode(v, src.parse().unwrap(), dst.parse().unwrap(), &mut out);
        out
    }

    #[test]
    fn v1_matches_the_spec_examples() {
        assert_eq!(
            enc(ProxyProtocol::V1, "192.168.0.1:56324", "192.168.0.11:443"),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        assert_eq!(
            enc(ProxyProtocol::V1, "[2001:db8::1]:1000", "[2001:db8::2]:80"),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1000 80\r\n"
        );
        // A dual-stack listener sees IPv4 clients as mapped addresses.
        assert_eq!(
            enc(
                ProxyProtocol::V1,
                "[::ffff:10.0.0.1]:5",
                "[::ffff:10.0.0.2]:6"
            ),
            b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n"
        );
        // Mixed families: both as IPv6.
        assert_eq!(
            enc(ProxyProtocol::V1, "10.0.0.1:5", "[2001:db8::2]:6"),
            b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::2 5 6\r\n"
        );
    }

    #[test]
    fn v1_longest_fits_header_max() {
        let a = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535";
        let out = enc(ProxyProtocol::V1, a, a);
        assert!(out.len() <= HEADER_MAX, "{}", out.len());
    }

    #[test]
    fn v2_tcp4_and_tcp6_layout() {
        let out = enc(ProxyProtocol::V2, "10.0.0.1:1234", "10.96.0.10:80");
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 0, 0, 1, 10, 96, 0, 10]);
        want.extend_from_slice(&[0x04, 0xd2, 0, 80]);
        assert_eq!(out, want);

        let out = enc(ProxyProtocol::V2, "[2001:db8::1]:1", "[2001:db8::2]:2");
        assert_eq!(out.len(), 16 + 36);
        assert_eq!(&out[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            out[16..32],
            "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&out[48..], &[0, 1, 0, 2]);
    }
}
