//! `mosaicd`'s configuration file (TOML), beside its flags: a flag given wins over the file.
//!
//! ```toml
//! # /etc/mosaic/mosaicd.toml
//! listen = "tcp://10.0.0.1:7070"      # where other agents reach this one
//! memory = "16G"                       # RAM donated to network RAM (0: none)
//! memory_listen = "tcp://10.0.0.1:0"   # where the memory server listens (optional)
//! join = ["tcp://10.0.0.2:7070"]       # any member will do; none: this node starts a cluster
//! slots = 16                           # processes this node takes (default: its CPUs)
//! speed = 1000                         # its speed per CPU (1,000: a reference core)
//! gossip = true                        # take part in the information layer
//! balance = false                      # move processes to lighter nodes (needs gossip)
//! tune = "/etc/mosaic/tune.toml"       # what `mosctl tune --out` measured (balancing's costs)
//! usher = true                         # move network-RAM pages away when short of memory
//! metrics = "10.0.0.1:9464"            # Prometheus endpoint (GET /metrics), optional
//!
//! [nodes]                              # optional node map (the seed's /etc/mosix.map): names for
//! a = "tcp://10.0.0.1:7070"            # mosctl, and whom to join when `join` is empty
//! b = "tcp://10.0.0.2:7070"
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// What the file may say (every key optional).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where the agent listens.
    pub listen: Option<String>,
    /// RAM donated to network RAM, as a size (`16G`).
    pub memory: Option<String>,
    /// Where the memory server listens.
    pub memory_listen: Option<String>,
    /// Agents to join through.
    #[serde(default)]
    pub join: Vec<String>,
    /// Processes this node takes.
    pub slots: Option<u16>,
    /// Speed per CPU.
    pub speed: Option<u32>,
    /// Whether to gossip (default true).
    pub gossip: Option<bool>,
    /// Whether to balance the load by moving processes (default false).
    pub balance: Option<bool>,
    /// Whether to usher memory away when short of it (default true).
    pub usher: Option<bool>,
    /// The file `mosctl tune --out` wrote.
    pub tune: Option<std::path::PathBuf>,
    /// Where to serve Prometheus metrics (`HOST:PORT`).
    pub metrics: Option<String>,
    /// Node names and their agents' addresses.
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
}

impl FileConfig {
    /// Reads and parses `path`; the error names the file and what is wrong.
    pub fn read(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        FileConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the text of a file.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        let c: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        for (name, uri) in &c.nodes {
            if !uri.contains("://") {
                return Err(format!("node {name}: {uri:?} is not an address (tcp://HOST:PORT)"));
            }
        }
        Ok(c)
    }

    /// Whom to join: `join`, or else the node map's addresses.
    pub fn join_list(&self) -> Vec<String> {
        if self.join.is_empty() {
            self.nodes.values().cloned().collect()
        } else {
            self.join.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_parses_unknown_keys_are_refused_and_the_map_gives_the_join_list() {
        let c = FileConfig::parse(
            "listen = \"tcp://10.0.0.1:7070\"\nmemory = \"16G\"\nslots = 4\n[nodes]\na = \"tcp://10.0.0.1:7070\"\nb = \"tcp://10.0.0.2:7070\"\n",
        )
        .unwrap();
        assert_eq!(c.listen.as_deref(), Some("tcp://10.0.0.1:7070"));
        assert_eq!((c.memory.as_deref(), c.slots, c.gossip), (Some("16G"), Some(4), None));
        assert_eq!(c.join_list(), ["tcp://10.0.0.1:7070", "tcp://10.0.0.2:7070"]);
        assert_eq!(FileConfig::parse("join = [\"tcp://x:1\"]").unwrap().join_list(), ["tcp://x:1"]);
        assert!(FileConfig::parse("lisen = \"x\"").unwrap_err().contains("lisen"));
        assert!(FileConfig::parse("slots = \"many\"").is_err());
        assert!(FileConfig::parse("[nodes]\na = \"10.0.0.1\"").unwrap_err().contains("not an address"));
    }
}
