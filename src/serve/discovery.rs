//! Announcing the HTTP endpoint over mDNS as `_loip-chat._tcp`, so that
//! clients on the LAN find the chat without knowing the address.
//!
//! This is the clients' service, apart from the cluster's own discovery
//! (`_loip._udp`, DESIGN.md §1): a node announces it whatever its role, and
//! a follower will forward what it receives to the leader. mDNS is
//! unauthenticated: the announcement is a hint, and the API key (when set)
//! is what guards the API. A failure to announce is logged, never fatal.

use std::net::SocketAddr;

use mdns_sd::{ServiceDaemon, ServiceInfo};

/// The service type announced.
pub const CHAT_SERVICE: &str = "_loip-chat._tcp.local.";

/// Announces while it lives; withdraws the announcement when dropped.
pub struct Announcer {
    daemon: ServiceDaemon,
    fullname: String,
}

/// Announces `addr` (all of this host's addresses when it is unspecified)
/// under the instance name `node`, with TXT records `path`, `api`,
/// `model`, `version` and `auth` (`key` or `none`).
pub fn announce(
    node: &str,
    addr: SocketAddr,
    model: &str,
    needs_key: bool,
) -> Result<Announcer, mdns_sd::Error> {
    let daemon = ServiceDaemon::new()?;
    // A TXT string holds at most 255 bytes.
    let model: String = model.chars().take(200).collect();
    let properties = [
        ("path", "/"),
        ("api", "/v1"),
        ("model", model.as_str()),
        ("version", env!("CARGO_PKG_VERSION")),
        ("auth", if needs_key { "key" } else { "none" }),
    ];
    let host = format!("{node}.local.");
    let info = if addr.ip().is_unspecified() {
        ServiceInfo::new(CHAT_SERVICE, node, &host, "", addr.port(), &properties[..])?
            .enable_addr_auto()
    } else {
        ServiceInfo::new(
            CHAT_SERVICE,
            node,
            &host,
            addr.ip(),
            addr.port(),
            &properties[..],
        )?
    };
    let fullname = info.get_fullname().to_string();
    daemon.register(info)?;
    Ok(Announcer { daemon, fullname })
}

impl Drop for Announcer {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}
