//! The stand-in istiod's certificate service: `IstioCertificateService/CreateCertificate`
//! signs a workload CSR with the plug-in CA and answers as istiod does: the leaf, then the
//! chain up to and including the root, as PEM strings.

use std::{sync::Arc, time::Duration};

use prost_types::value::Kind;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    tls::{ca::pem as ca_pem, CertificateAuthority as _, PluginCa},
    xds::{
        ca::istio_certificate_service_server::{
            IstioCertificateService, IstioCertificateServiceServer,
        },
        ca_client::IMPERSONATED_IDENTITY,
        proto::ca::{IstioCertificateRequest, IstioCertificateResponse},
    },
};

pub fn server(ca: Arc<PluginCa>, max_lifetime: Duration) -> IstioCertificateServiceServer<Ca> {
    IstioCertificateServiceServer::new(Ca { ca, max_lifetime })
}

pub struct Ca {
    ca: Arc<PluginCa>,
    max_lifetime: Duration,
}

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let has_token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| !token.trim().is_empty());
        if !has_token {
            warn!("CSR refused: no bearer token");
            return Err(Status::unauthenticated("a bearer token is required"));
        }
        let request = request.into_inner();
        let asked = u64::try_from(request.validity_duration).unwrap_or(0);
        let lifetime = match asked {
            0 => self.max_lifetime,
            secs => Duration::from_secs(secs).min(self.max_lifetime),
        };
        let signed = self
            .ca
            .sign_csr(&request.csr, lifetime)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let impersonated = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            });
        if let Some(id) = impersonated {
            if id != signed.identity.to_string() {
                return Err(Status::permission_denied(format!(
                    "{IMPERSONATED_IDENTITY} {id} is not the CSR's identity {}",
                    signed.identity
                )));
            }
        }
        info!(identity = %signed.identity, lifetime = ?lifetime, "certificate signed");
        let mut cert_chain: Vec<String> = signed.chain.iter().map(ca_pem::to_pem).collect();
        // istiod's answer ends with the root; a plug-in chain file may stop below it.
        for root in self.ca.roots() {
            let root = ca_pem::to_pem(&root);
            if cert_chain.last() != Some(&root) {
                cert_chain.push(root);
            }
        }
        Ok(Response::new(IstioCertificateResponse {
            cert_chain,
            root_cert: None,
        }))
    }
}
