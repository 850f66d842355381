//! The rules an HBONE CONNECT request must pass before the server connects anywhere (steps 1–3
//! of ztunnel's answer order, `docs/hbone.md`). They read only the request and the
//! address the connection arrived on, plus one question to the caller (is that address a local
//! workload's?), so they are checked here without a server, TLS or state: the fuzz target
//! `hbone_request` feeds them hostile requests.

use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, StatusCode};

use ambit_abi::TUNNEL_PORTS;

/// Why a request is refused: the status to answer with and a reason for the log.
pub type Refusal = (StatusCode, &'static str);

/// The address a CONNECT request may be tunneled to, or the status to refuse it with, in this
/// order: 400 not CONNECT; 400 the authority is not `ip:port`; 400 the authority is not the
/// address the connection arrived on (`local`); 503 `is_local_workload(ip)` says no local
/// workload has that address; 503 the port is one of the tunnel's own ([`TUNNEL_PORTS`]).
pub fn check_connect<B>(
    request: &Request<B>,
    local: SocketAddr,
    is_local_workload: impl FnOnce(IpAddr) -> bool,
) -> Result<SocketAddr, Refusal> {
    if request.method() != Method::CONNECT {
        return Err((StatusCode::BAD_REQUEST, "not CONNECT"));
    }
    let target: SocketAddr = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or((StatusCode::BAD_REQUEST, "authority is not ip:port"))?;
    if target.ip().to_canonical() != local.ip().to_canonical() {
        return Err((
            StatusCode::BAD_REQUEST,
            "authority is not the address the connection arrived on",
        ));
    }
    if !is_local_workload(target.ip()) {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "no local workload has that address",
        ));
    }
    if TUNNEL_PORTS.contains(&target.port()) {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "target is a tunnel port"));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = "10.0.0.5:15008";

    fn check(method: &str, authority: &str) -> Result<SocketAddr, Refusal> {
        let request = Request::builder()
            .method(method)
            .uri(authority)
            .body(())
            .unwrap();
        let local: SocketAddr = LOCAL.parse().unwrap();
        check_connect(&request, local, |ip| ip == local.ip())
    }

    #[test]
    fn a_connect_to_this_pods_port_is_accepted() {
        assert_eq!(
            check("CONNECT", "10.0.0.5:8080"),
            Ok("10.0.0.5:8080".parse().unwrap())
        );
    }

    #[test]
    fn refusals_come_in_ztunnels_order() {
        let status = |method, authority| check(method, authority).unwrap_err().0;
        assert_eq!(status("GET", "10.0.0.5:8080"), StatusCode::BAD_REQUEST);
        assert_eq!(status("CONNECT", "example.com:80"), StatusCode::BAD_REQUEST);
        assert_eq!(status("CONNECT", "10.0.0.6:8080"), StatusCode::BAD_REQUEST);
        // The same address, IPv4-mapped: it arrived here, but no workload is known by it.
        assert_eq!(
            status("CONNECT", "[::ffff:10.0.0.5]:8080"),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            check("CONNECT", "10.0.0.5:15008"),
            Err((StatusCode::SERVICE_UNAVAILABLE, "target is a tunnel port"))
        );
    }
}
