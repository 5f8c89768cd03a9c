//! Endpoint URIs: `tcp://host:port`, `shm://name`, `rdma://host:port`, and
//! `sim://LINK@INNER` (a shaped link around any other endpoint; see [`crate::sim`]).

use thiserror::Error;

use crate::sim::LinkSpec;

/// A parsed endpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum Endpoint {
    /// TCP: `host:port` (IPv6 hosts in brackets).
    Tcp(String),
    /// Shared memory on this host: a rendezvous name.
    Shm(String),
    /// RDMA RC queue pairs; the queue pair setup is exchanged over TCP at `host:port`.
    Rdma(String),
    /// A simulated link shaping traffic to the inner endpoint.
    Sim(LinkSpec, Box<Endpoint>),
}

/// Why a URI was rejected.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum UriError {
    /// No `scheme://`.
    #[error("{0:?} is not a URI: expected scheme://address (tcp, shm, rdma, sim)")]
    NoScheme(String),
    /// A scheme this build does not know.
    #[error("unknown scheme {0:?}: expected tcp, shm, rdma or sim")]
    UnknownScheme(String),
    /// The address part is malformed.
    #[error("bad address in {uri:?}: {reason}")]
    BadAddress {
        /// The URI.
        uri: String,
        /// What is wrong.
        reason: String,
    },
}

impl Endpoint {
    /// Parses a URI.
    pub fn parse(uri: &str) -> Result<Endpoint, UriError> {
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| UriError::NoScheme(uri.into()))?;
        let bad = |reason: &str| UriError::BadAddress { uri: uri.into(), reason: reason.into() };
        match scheme {
            "tcp" | "rdma" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("expected host:port"))?;
                if host.is_empty() {
                    return Err(bad("empty host"));
                }
                port.parse::<u16>().map_err(|_| bad("port must be a number from 0 to 65535"))?;
                Ok(if scheme == "tcp" { Endpoint::Tcp(rest.into()) } else { Endpoint::Rdma(rest.into()) })
            }
            "shm" => {
                let ok = !rest.is_empty()
                    && rest.len() <= 64
                    && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !ok {
                    return Err(bad("name must be 1-64 characters of [A-Za-z0-9._-]"));
                }
                Ok(Endpoint::Shm(rest.into()))
            }
            "sim" => {
                let (link, inner) = rest.split_once('@').ok_or_else(|| bad("expected sim://LINK@INNER-URI"))?;
                let spec = LinkSpec::parse(link).map_err(|e| bad(&e))?;
                let inner = Endpoint::parse(inner)?;
                if matches!(inner, Endpoint::Sim(..)) {
                    return Err(bad("a sim link cannot wrap another sim link"));
                }
                Ok(Endpoint::Sim(spec, Box::new(inner)))
            }
            other => Err(UriError::UnknownScheme(other.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme() {
        assert_eq!(Endpoint::parse("tcp://127.0.0.1:80"), Ok(Endpoint::Tcp("127.0.0.1:80".into())));
        assert_eq!(Endpoint::parse("tcp://[::1]:80"), Ok(Endpoint::Tcp("[::1]:80".into())));
        assert_eq!(Endpoint::parse("shm://node-1"), Ok(Endpoint::Shm("node-1".into())));
        assert_eq!(Endpoint::parse("rdma://10.0.0.1:7471"), Ok(Endpoint::Rdma("10.0.0.1:7471".into())));
        assert!(matches!(Endpoint::parse("sim://10gbe@tcp://h:1"), Ok(Endpoint::Sim(_, _))));
    }

    #[test]
    fn rejects_bad_uris_with_reasons() {
        assert!(matches!(Endpoint::parse("127.0.0.1:80"), Err(UriError::NoScheme(_))));
        assert!(matches!(Endpoint::parse("udp://x:1"), Err(UriError::UnknownScheme(_))));
        assert!(matches!(Endpoint::parse("tcp://x"), Err(UriError::BadAddress { .. })));
        assert!(matches!(Endpoint::parse("tcp://:80"), Err(UriError::BadAddress { .. })));
        assert!(matches!(Endpoint::parse("tcp://x:99999"), Err(UriError::BadAddress { .. })));
        assert!(matches!(Endpoint::parse("shm://a/b"), Err(UriError::BadAddress { .. })));
        assert!(matches!(Endpoint::parse("shm://"), Err(UriError::BadAddress { .. })));
        assert!(matches!(Endpoint::parse("sim://10gbe"), Err(UriError::BadAddress { .. })));
        assert!(matches!(Endpoint::parse("sim://nonsense@tcp://h:1"), Err(UriError::BadAddress { .. })));
        assert!(matches!(Endpoint::parse("sim://10gbe@sim://10gbe@tcp://h:1"), Err(UriError::BadAddress { .. })));
    }
}
