//! `loip run` settings: a TOML file, overridden by flags of the same names.
//!
//! ```toml
//! data_dir = "/var/lib/loip"        # required
//! identity = "/etc/loip/node"      # node.crt, node.key, ca.crt; required
//! model = "/var/lib/loip/model.gguf"
//! mem_budget = "6GiB"
//! listen = "0.0.0.0:7470"           # QUIC (UDP)
//! peers = ["10.0.0.2:7470"]         # static peers, for networks without multicast
//! interfaces = ["eth0"]             # for mDNS discovery (default: all)
//! mdns = true                       # false: static peers only
//! expect = 3                        # nodes to wait for before the first plan
//! device = "/etc/loip/device.toml"  # device profile (spec or profiled form)
//! objective = "latency"             # what the plan minimizes: latency or throughput
//! http = "0.0.0.0:8080"             # the OpenAI-compatible API and chat page (default: none)
//! api_key = "..."                   # required by the API when set
//! stall_s = 30                      # an input waiting longer at this node's ring: stalled
//! adapt = true                      # as leader, re-plan when measured links change
//! ```
//!
//! Without `device`, a node uses its stored profile (`loip profile`), or
//! nominal figures when it has none (see `cluster::dist`).
//!
//! Unknown keys and bad values are errors that name the key.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// The default QUIC port.
pub const DEFAULT_PORT: u16 = 7470;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    #[error("{}: line {line}: {key}{message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        /// "key `name`: " when the key is known.
        key: String,
        message: String,
    },
    #[error("{key}: {message}")]
    Value { key: String, message: String },
    #[error("{key} is required (in the config file or as --{flag})")]
    Missing {
        key: &'static str,
        flag: &'static str,
    },
}

/// The file's keys, all optional; flags fill or override them.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub identity: Option<PathBuf>,
    pub model: Option<PathBuf>,
    pub mem_budget: Option<String>,
    pub listen: Option<String>,
    pub peers: Option<Vec<String>>,
    pub interfaces: Option<Vec<String>>,
    pub mdns: Option<bool>,
    pub expect: Option<usize>,
    pub device: Option<PathBuf>,
    pub objective: Option<String>,
    pub http: Option<String>,
    pub api_key: Option<String>,
    pub stall_s: Option<u64>,
    pub adapt: Option<bool>,
}

/// Validated settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunConfig {
    pub data_dir: PathBuf,
    pub identity: PathBuf,
    pub model: Option<PathBuf>,
    pub mem_budget: Option<String>,
    pub listen: SocketAddr,
    /// Static peers as given (`host:port`), resolved when dialled.
    pub peers: Vec<String>,
    pub interfaces: Vec<String>,
    /// Announce and browse over mDNS (`--no-mdns` turns it off).
    pub mdns: bool,
    pub expect: usize,
    /// A device TOML file describing this node.
    pub device: Option<PathBuf>,
    /// What the leader's scheduler minimizes.
    pub objective: crate::plan::Objective,
    /// Where the HTTP API listens, when it is served.
    pub http: Option<SocketAddr>,
    /// The API key the HTTP API requires, when set.
    pub api_key: Option<String>,
    /// How long an input may wait at this node's ring before the node is
    /// stalled and asks to be planned out (`cluster::fitness`).
    pub stall: std::time::Duration,
    /// As leader, re-plan when the measured links make another plan
    /// clearly better (`cluster::linkwatch`).
    pub adapt: bool,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        FileConfig::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start).min(text.len());
            let line = text[..at].matches('\n').count() + 1;
            let key = key_at(text, at).map_or(String::new(), |k| format!("key `{k}`: "));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                key,
                message: e.message().replace('\n', " "),
            }
        })
    }

    /// Flags (`self`) over the file (`base`).
    pub fn over(self, base: FileConfig) -> FileConfig {
        FileConfig {
            data_dir: self.data_dir.or(base.data_dir),
            identity: self.identity.or(base.identity),
            model: self.model.or(base.model),
            mem_budget: self.mem_budget.or(base.mem_budget),
            listen: self.listen.or(base.listen),
            peers: self.peers.or(base.peers),
            interfaces: self.interfaces.or(base.interfaces),
            mdns: self.mdns.or(base.mdns),
            expect: self.expect.or(base.expect),
            device: self.device.or(base.device),
            objective: self.objective.or(base.objective),
            http: self.http.or(base.http),
            api_key: self.api_key.or(base.api_key),
            stall_s: self.stall_s.or(base.stall_s),
            adapt: self.adapt.or(base.adapt),
        }
    }

    /// Checks every value; errors name the key.
    pub fn validate(self) -> Result<RunConfig, ConfigError> {
        let value = |key: &str, message: String| ConfigError::Value {
            key: key.to_string(),
            message,
        };
        let data_dir = self.data_dir.ok_or(ConfigError::Missing {
            key: "data_dir",
            flag: "data-dir",
        })?;
        let identity = self.identity.ok_or(ConfigError::Missing {
            key: "identity",
            flag: "identity",
        })?;
        let listen = match self.listen {
            None => SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            Some(s) => s
                .parse()
                .map_err(|_| value("listen", format!("{s:?} is not an address:port")))?,
        };
        let peers = self.peers.unwrap_or_default();
        for (i, p) in peers.iter().enumerate() {
            let ok = p.rsplit_once(':').is_some_and(|(h, port)| {
                !h.is_empty() && port.parse::<u16>().is_ok_and(|x| x != 0)
            });
            if !ok {
                return Err(value(
                    &format!("peers[{i}]"),
                    format!("{p:?} is not host:port"),
                ));
            }
        }
        let interfaces = self.interfaces.unwrap_or_default();
        for (i, name) in interfaces.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() < 16
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
            if !ok {
                return Err(value(
                    &format!("interfaces[{i}]"),
                    format!("{name:?} is not an interface name"),
                ));
            }
        }
        let expect = self.expect.unwrap_or(1);
        if !(1..=64).contains(&expect) {
            return Err(value("expect", format!("{expect} is not between 1 and 64")));
        }
        if let Some(b) = &self.mem_budget {
            crate::engine::offload::Budget::parse(b)
                .map_err(|e| value("mem_budget", e.to_string()))?;
        }
        let objective = match self.objective.as_deref() {
            None | Some("latency") => crate::plan::Objective::Latency,
            Some("throughput") => crate::plan::Objective::Throughput,
            Some(o) => {
                return Err(value(
                    "objective",
                    format!("{o:?} is not latency or throughput"),
                ))
            }
        };
        let http = match self.http {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| value("http", format!("{s:?} is not an address:port")))?,
            ),
        };
        let api_key = self.api_key.filter(|k| !k.is_empty());
        let stall_s = self.stall_s.unwrap_or(30);
        if !(1..=3600).contains(&stall_s) {
            return Err(value(
                "stall_s",
                format!("{stall_s} is not between 1 and 3600 seconds"),
            ));
        }
        Ok(RunConfig {
            data_dir,
            identity,
            model: self.model,
            mem_budget: self.mem_budget,
            listen,
            peers,
            interfaces,
            mdns: self.mdns.unwrap_or(true),
            expect,
            device: self.device,
            objective,
            http,
            api_key,
            stall: std::time::Duration::from_secs(stall_s),
            adapt: self.adapt.unwrap_or(true),
        })
    }
}

/// The key on the line of byte `at`, if that line is `key = ...`.
fn key_at(text: &str, at: usize) -> Option<String> {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_string())
}

/// Resolves a static peer's `host:port`.
pub fn resolve_peer(peer: &str) -> Option<SocketAddr> {
    peer.to_socket_addrs().ok()?.next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("c.toml"), text)
    }

    #[test]
    fn a_full_file_parses_and_flags_override_it() {
        let f = parse(
            "data_dir = \"/d\"\nidentity = \"/i\"\nlisten = \"127.0.0.1:9\"\npeers = [\"a:1\", \"10.0.0.2:7470\"]\ninterfaces = [\"eth0\"]\nexpect = 3\nmem_budget = \"1GiB\"\n",
        )
        .unwrap();
        let flags = FileConfig {
            expect: Some(2),
            ..Default::default()
        };
        let c = flags.over(f).validate().unwrap();
        assert_eq!(c.expect, 2);
        assert_eq!(c.listen, "127.0.0.1:9".parse().unwrap());
        assert_eq!(c.peers, vec!["a:1", "10.0.0.2:7470"]);
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert!(c.mdns, "mDNS is on unless turned off");
        let off = FileConfig {
            mdns: Some(false),
            ..Default::default()
        };
        let f = parse("data_dir = \"/d\"\nidentity = \"/i\"\nmdns = true\n").unwrap();
        assert!(!off.over(f).validate().unwrap().mdns);
        let e = parse("mdns = \"no\"\n").unwrap_err().to_string();
        assert!(e.contains("key `mdns`"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("data_dir = \"/d\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("unknown field `bogus`"),
            "{e}"
        );
        let e = parse("expect = \"three\"\n").unwrap_err().to_string();
        assert!(e.contains("key `expect`"), "{e}");
        let e = parse("peers = [1]\n").unwrap_err().to_string();
        assert!(e.contains("key `peers`"), "{e}");
        let base = |s: &str| {
            parse(&format!("data_dir = \"/d\"\nidentity = \"/i\"\n{s}\n"))
                .unwrap()
                .validate()
        };
        let e = base("listen = \"nowhere\"").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Value { key, .. } if key == "listen"),
            "{e}"
        );
        let e = base("peers = [\"a:1\", \"b\"]").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Value { key, .. } if key == "peers[1]"),
            "{e}"
        );
        let e = base("interfaces = [\"eth0; rm\"]").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Value { key, .. } if key == "interfaces[0]"),
            "{e}"
        );
        let e = base("expect = 0").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Value { key, .. } if key == "expect"),
            "{e}"
        );
        let e = base("objective = \"speed\"").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Value { key, .. } if key == "objective"),
            "{e}"
        );
        for bad in ["stall_s = 0", "stall_s = 9999"] {
            let e = base(bad).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Value { key, .. } if key == "stall_s"),
                "{e}"
            );
        }
        assert_eq!(
            base("stall_s = 5").unwrap().stall,
            std::time::Duration::from_secs(5)
        );
        let e = base("mem_budget = \"lots\"").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Value { key, .. } if key == "mem_budget"),
            "{e}"
        );
        let e = parse("identity = \"/i\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("data_dir is required"), "{e}");
    }
}
