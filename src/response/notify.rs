//! Outbound notifications (NOTIFY_WEBHOOK): one signed HTTP POST, to an
//! address checked before connecting.
//!
//! **No probing of internal networks.** A tenant chooses the URL, so without
//! a check any tenant could make Picket send requests to its own loopback,
//! the cloud metadata address or the operator's private network. The host is
//! resolved here, every resolved address is checked, and the connection goes
//! to a checked address itself (never back through DNS, so a second lookup
//! that answers differently — DNS rebinding — cannot redirect it). Loopback,
//! private (RFC 1918), shared (100.64/10), link-local (incl. 169.254.169.254),
//! unique-local, multicast, broadcast, unspecified, documentation and reserved
//! addresses are refused, also when embedded in IPv6 (mapped, NAT64, 6to4),
//! unless an operator-allowed range (`--notify-allow-cidr`) contains them.
//! A host that resolves to any refused address is refused entirely.
//! Redirects are not followed.
//!
//! TLS (https) is rustls with the Mozilla root store (webpki-roots), with
//! the URL's host as the name verified.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// Time to connect (TCP and TLS) to one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most response body bytes read (and dropped).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why a notification was not delivered. Messages are for tenants: they never
/// name an internal address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyError {
    /// Whether trying again may help (network errors, 5xx, 429).
    pub retryable: bool,
    /// What happened.
    pub message: String,
}

impl NotifyError {
    fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            message: message.into(),
        }
    }

    fn transient(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            message: message.into(),
        }
    }
}

/// Sends notifications.
#[derive(Clone)]
pub struct Notifier {
    /// Address ranges the operator allows although they are not public.
    allow: Arc<Vec<IpNet>>,
    /// TLS client settings.
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19)))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s[0] {
        // NAT64 (64:ff9b::/96): the IPv4 address is the last 32 bits.
        0x0064 if s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] => {
            is_public_v4(embedded_v4(s[6], s[7]))
        }
        // 6to4 (2002::/16): the IPv4 address follows the prefix.
        0x2002 => is_public_v4(embedded_v4(s[1], s[2])),
        // Teredo (2001::/32) and documentation (2001:db8::/32).
        0x2001 if s[1] == 0 || s[1] == 0x0db8 => false,
        _ => {
            !(ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local
                || (s[0..6] == [0, 0, 0, 0, 0, 0])) // IPv4-compatible, ::/96
        }
    }
}

/// A POST to send.
pub struct Post<'a> {
    /// http(s) URL (checked by `domain::playbook::check_url`).
    pub url: &'a str,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// JSON body.
    pub body: Vec<u8>,
}

impl Notifier {
    /// A notifier allowing the non-public ranges `allow`.
    pub fn new(allow: Vec<IpNet>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Self {
            allow: Arc::new(allow),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    /// Whether the notifier may connect to `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        is_public(ip) || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Resolves `host`, refusing it if any address is not allowed.
    async fn addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, NotifyError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|_| NotifyError::transient(format!("could not resolve `{host}`")))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(NotifyError::transient(format!("`{host}` has no address")));
        }
        if addrs.iter().any(|a| !self.allows(a.ip())) {
            metrics::counter!("picket_playbook_notify_refused_total").increment(1);
            return Err(NotifyError::permanent(format!(
                "refused: `{host}` is (or resolves to) a loopback, private, link-local or other \
                 non-public address; the operator can allow such targets with --notify-allow-cidr"
            )));
        }
        Ok(addrs)
    }

    /// POSTs `post`; `Ok(status)` for a 2xx answer.
    pub async fn post(&self, post: Post<'_>) -> Result<u16, NotifyError> {
        let uri: http::Uri = post
            .url
            .parse()
            .map_err(|_| NotifyError::permanent("the URL does not parse"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(NotifyError::permanent("the URL must be http or https")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| NotifyError::permanent("the URL names no host"))?
            .clone();
        let host = authority.host().to_owned();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs = self.addresses(&host, port).await?;
        let mut last = NotifyError::transient(format!("could not connect to `{host}`"));
        for addr in addrs {
            let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(_)) => {
                    last = NotifyError::transient(format!(
                        "could not connect to `{host}` (connection refused or unreachable)"
                    ));
                    continue;
                }
                Err(_) => {
                    last = NotifyError::transient(format!("connecting to `{host}` timed out"));
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let path = uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
            let mut req = http::Request::post(path)
                .header(http::header::HOST, authority.as_str())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(
                    http::header::USER_AGENT,
                    concat!("picket/", env!("CARGO_PKG_VERSION")),
                );
            for (k, v) in &post.headers {
                req = req.header(*k, v.as_str());
            }
            let req = req
                .body(Full::new(Bytes::from(post.body.clone())))
                .map_err(|_| NotifyError::permanent("a header value is not valid"))?;
            let outcome = if https {
                let name = rustls::pki_types::ServerName::try_from(
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                )
                .map_err(|_| NotifyError::permanent(format!("`{host}` is not a valid TLS name")))?;
                match tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(name, tcp)).await {
                    Ok(Ok(tls)) => send(TokioIo::new(tls), req).await,
                    Ok(Err(_)) => {
                        return Err(NotifyError::permanent(format!(
                            "the TLS handshake with `{host}` failed (certificate not trusted or \
                             no common protocol)"
                        )));
                    }
                    Err(_) => {
                        last = NotifyError::transient(format!(
                            "the TLS handshake with `{host}` timed out"
                        ));
                        continue;
                    }
                }
            } else {
                send(TokioIo::new(tcp), req).await
            };
            return outcome;
        }
        Err(last)
    }
}

/// Sends `req` over an established connection and classifies the answer.
async fn send<IO>(io: IO, req: http::Request<Full<Bytes>>) -> Result<u16, NotifyError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|_| NotifyError::transient("the HTTP handshake failed"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = async {
        let resp = sender.send_request(req).await.map_err(|_| {
            NotifyError::transient("the receiver closed the connection without answering")
        })?;
        let status = resp.status();
        // Read (a bounded part of) the answer so the exchange completes.
        let mut body = resp.into_body();
        let mut read = 0usize;
        while read < MAX_RESPONSE_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
        let code = status.as_u16();
        if status.is_success() {
            Ok(code)
        } else if status.is_server_error() || code == 408 || code == 425 || code == 429 {
            Err(NotifyError::transient(format!(
                "the receiver answered {code}"
            )))
        } else if status.is_redirection() {
            Err(NotifyError::permanent(format!(
                "the receiver answered {code} (redirects are not followed)"
            )))
        } else {
            Err(NotifyError::permanent(format!(
                "the receiver answered {code}"
            )))
        }
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_not_public() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip(s)), "{s} is not public");
        }
        for s in [
            "203.0.114.7",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(ip(s)), "{s} is public");
        }
    }

    #[tokio::test]
    async fn refuses_internal_targets_unless_allowed() {
        let strict = Notifier::new(Vec::new());
        for url in [
            "http://127.0.0.1:9/x",
            "http://[::1]:9/x",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost:9/",
        ] {
            let err = strict
                .post(Post {
                    url,
                    headers: Vec::new(),
                    body: b"{}".to_vec(),
                })
                .await
                .unwrap_err();
            assert!(!err.retryable, "{url}: {err:?}");
            assert!(err.message.starts_with("refused"), "{url}: {err:?}");
            assert!(!err.message.contains("127.0.0.1") || url.contains("127.0.0.1"));
        }
        let allowed = Notifier::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(allowed.allows(ip("127.0.0.1")));
        assert!(allowed.allows(ip("::ffff:127.0.0.1")));
        assert!(!allowed.allows(ip("10.0.0.1")));
    }
}
