//! Where a client comes from, for `externalTrafficPolicy: Local`: this
//! node's pods (the `--detect-local-mode` detector) or the host itself
//! (a source that is one of the node's addresses, iptables'
//! `--src-type LOCAL`) are local, and upstream sends their external
//! traffic to the cluster set ("short-circuit").
//!
//! The node's addresses are read with `getifaddrs` at every sync and every
//! few seconds ([`Origin::refresh_host`]), never per connection.

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use arc_swap::ArcSwap;

use crate::detect_local::Detector;

/// What tells local clients from others; shared by every listener.
#[derive(Debug, Default)]
pub struct Origin {
    detector: ArcSwap<Detector>,
    host: ArcSwap<HashSet<IpAddr>>,
}

impl Origin {
    /// Puts `detector` in force (changes with the Node's pod CIDRs); true
    /// when it changed.
    pub fn set_detector(&self, detector: Detector) -> bool {
        let changed = **self.detector.load() != detector;
        if changed {
            self.detector.store(detector.into());
        }
        changed
    }

    /// The detector in force.
    pub fn detector(&self) -> arc_swap::Guard<std::sync::Arc<Detector>> {
        self.detector.load()
    }

    /// Re-reads the node's addresses; keeps the last ones on error.
    pub fn refresh_host(&self) {
        match nix::ifaddrs::getifaddrs() {
            Ok(addrs) => {
                let set: HashSet<IpAddr> = addrs
                    .filter_map(|a| a.address)
                    .filter_map(|a| {
                        a.as_sockaddr_in()
                            .map(|s| IpAddr::from(s.ip()))
                            .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::from(s.ip())))
                    })
                    .collect();
                if **self.host.load() != set {
                    self.host.store(set.into());
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot list the node's addresses"),
        }
    }

    /// The node's addresses as last read (loopback included), sorted: for
    /// the rules' `allowFromNode` (`iptables::portals`).
    pub fn host_addresses(&self) -> Vec<IpAddr> {
        let mut all: Vec<IpAddr> = self.host.load().iter().copied().collect();
        all.sort();
        all
    }

    /// Whether a client at `peer` is this host or one of its pods; `iface`
    /// names the interface it came in on, asked only by the interface modes.
    pub fn is_local(&self, peer: IpAddr, iface: impl FnOnce() -> Option<String>) -> bool {
        let ip = peer.to_canonical();
        if ip.is_loopback() || self.host.load().contains(&ip) {
            return true;
        }
        let d = self.detector.load();
        if d.needs_interface() {
            d.is_local(ip, iface().as_deref())
        } else {
            d.is_local(ip, None)
        }
    }
}

/// Asks a listening socket to remember the interface of each connection's
/// SYN (`IP_PKTINFO` / `IPV6_RECVPKTINFO`, inherited by accepted sockets),
/// for [`incoming_interface`].
pub fn record_interface(socket: &impl AsRawFd, v6: bool) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    let (level, opt) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    // SAFETY: a plain setsockopt with a c_int the call only reads.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The name of the interface an accepted TCP connection came in on, from
/// the SYN's packet info (`IP_PKTOPTIONS` / `IPV6_2292PKTOPTIONS`; Linux
/// keeps the SYN's `iif` in the child socket), when its listener had
/// [`record_interface`].
pub fn incoming_interface(socket: &impl AsRawFd) -> Option<String> {
    const IPV6_2292PKTOPTIONS: libc::c_int = 6;
    // Aligned for `cmsghdr`, room for one packet info message.
    let mut buf = [0u64; 16];
    for (level, opt) in [
        (libc::IPPROTO_IP, libc::IP_PKTOPTIONS),
        (libc::IPPROTO_IPV6, IPV6_2292PKTOPTIONS),
    ] {
        let mut len = std::mem::size_of_val(&buf) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `buf`.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                opt,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r != 0 || len == 0 {
            continue;
        }
        if let Some(index) = ifindex_in_cmsgs(&mut buf, len) {
            return interface_name(index);
        }
    }
    None
}

/// The interface index of the first `IP_PKTINFO` / `IPV6_PKTINFO` control
/// message among the first `len` bytes of `buf`, walked with libc's
/// `CMSG_*` as `recvmsg`'s control data.
fn ifindex_in_cmsgs(buf: &mut [u64; 16], len: libc::socklen_t) -> Option<u32> {
    // SAFETY: a zeroed msghdr is valid; only its control fields are set,
    // to `buf` and the `len` bytes the kernel wrote there, and the CMSG_*
    // walk stays within them. Payloads are read unaligned.
    #[allow(unsafe_code)]
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_control = buf.as_mut_ptr().cast();
        msg.msg_controllen = (len as usize).min(std::mem::size_of_val(buf)) as _;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    return u32::try_from(info.ipi_ifindex).ok();
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    return Some(info.ipi6_ifindex);
                }
                _ => c = libc::CMSG_NXTHDR(&msg, c),
            }
        }
    }
    None
}

/// The name of interface `index` (`if_indextoname`).
fn interface_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes the call may write.
    #[allow(unsafe_code)]
    let p = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the kernel wrote a NUL-terminated name into `name`.
    #[allow(unsafe_code)]
    let s = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_node_addresses_are_local() {
        let o = Origin::default();
        o.refresh_host();
        assert!(o.is_local("127.0.0.9".parse().unwrap(), || None));
        assert!(o.is_local("::ffff:127.0.0.1".parse().unwrap(), || None));
        assert!(!o.is_local("192.0.2.1".parse().unwrap(), || None));
        o.set_detector(Detector::Cidrs(vec!["192.0.2.0/24".parse().unwrap()]));
        assert!(o.is_local("192.0.2.1".parse().unwrap(), || None));
    }

    #[test]
    fn the_interface_of_an_accepted_connection_is_read() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        record_interface(&l, false).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(incoming_interface(&s).as_deref(), Some("lo"));
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = std::net::TcpStream::connect(plain.local_addr().unwrap()).unwrap();
        let (s, _) = plain.accept().unwrap();
        assert_eq!(incoming_interface(&s), None);
    }
}
