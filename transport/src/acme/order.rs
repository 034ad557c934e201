//! One issuance: account (loaded or created), order, challenges, finalize with our own key,
//! download the chain. The driver in `mod.rs` decides when; this file only does it.

use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};

use super::challenge::{Http01Tokens, tls_alpn_cert};
use super::store::{Store, StoredCert, parse_cert};
use super::{AcmeConfig, AcmeError, ChallengeKind};
use crate::tls::CertResolver;

/// How long the order may take to become ready, and the certificate to be issued.
const POLL_TIMEOUT: Duration = Duration::from_secs(90);

fn retry() -> RetryPolicy {
    RetryPolicy::new().initial_delay(Duration::from_millis(250)).backoff(1.5).timeout(POLL_TIMEOUT)
}

/// An account builder trusting the configured root for the directory's TLS, else the
/// platform's roots.
fn builder(config: &AcmeConfig) -> Result<instant_acme::AccountBuilder, AcmeError> {
    crate::tls::install_crypto_provider();
    match &config.ca_root {
        Some(root) => Account::builder_with_root(root),
        None => Account::builder(),
    }
    .map_err(|e| AcmeError::from_acme("setting up the ACME client", e))
}

/// Loads the stored account, or (without one, or with `fresh`) creates one on the server and
/// stores it.
pub(crate) async fn account(config: &AcmeConfig, store: &Store, fresh: bool) -> Result<Account, AcmeError> {
    if let Some(json) = store.read_account()?.filter(|_| !fresh) {
        let creds: AccountCredentials = serde_json::from_slice(&json).map_err(|e| AcmeError::Storage {
            path: store.account_path(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        return builder(config)?
            .from_credentials(creds)
            .await
            .map_err(|e| AcmeError::from_acme("loading the ACME account", e));
    }
    let contact: Vec<String> =
        config.contact.iter().map(|c| if c.contains(':') { c.clone() } else { format!("mailto:{c}") }).collect();
    let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, creds) = builder(config)?
        .create(&new, config.directory.clone(), None)
        .await
        .map_err(|e| AcmeError::from_acme("creating the ACME account", e))?;
    let json = serde_json::to_vec(&creds).map_err(|e| AcmeError::Certificate(format!("account credentials: {e}")))?;
    store.write_account(&json)?;
    tracing::info!(account = account.id(), directory = %config.directory, "created an ACME account");
    Ok(account)
}

/// Challenge answers installed for one order, removed when dropped (also on error or timeout).
struct Installed<'a> {
    resolver: &'a CertResolver,
    http01: &'a Http01Tokens,
    tokens: Vec<String>,
    domains: Vec<String>,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.http01.remove(t);
        }
        for d in &self.domains {
            self.resolver.clear_acme_challenge(d);
        }
    }
}

/// Orders a certificate for `config.domains`, answers the challenges, and returns the new chain
/// and key (as PEM, and parsed).
pub(crate) async fn issue(
    config: &AcmeConfig,
    account: &Account,
    resolver: &CertResolver,
    http01: &Http01Tokens,
) -> Result<(String, String, StoredCert), AcmeError> {
    let ids: Vec<Identifier> = config.domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
    let mut order =
        account.new_order(&NewOrder::new(&ids)).await.map_err(|e| AcmeError::from_acme("creating the order", e))?;
    let mut installed = Installed { resolver, http01, tokens: Vec::new(), domains: Vec::new() };
    let kind = match config.challenge {
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        ChallengeKind::Http01 => ChallengeType::Http01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|e| AcmeError::from_acme("fetching an authorization", e))?;
        let domain = authz.identifier().to_string();
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(AcmeError::Protocol {
                    during: "authorizing",
                    reason: format!("the authorization for {domain} is {other:?}"),
                });
            }
        }
        let mut challenge = authz
            .challenge(kind.clone())
            .ok_or_else(|| AcmeError::NoChallenge { domain: domain.clone(), kind: config.challenge })?;
        let key_auth = challenge.key_authorization();
        match config.challenge {
            ChallengeKind::Http01 => {
                http01.insert(challenge.token.clone(), key_auth.as_str().to_owned());
                installed.tokens.push(challenge.token.clone());
            }
            ChallengeKind::TlsAlpn01 => {
                let digest: [u8; 32] = key_auth.digest().as_ref().try_into().map_err(|_| AcmeError::Protocol {
                    during: "answering the TLS-ALPN-01 challenge",
                    reason: "the key authorization digest is not 32 bytes".into(),
                })?;
                resolver.set_acme_challenge(&domain, tls_alpn_cert(&domain, &digest)?);
                installed.domains.push(domain.clone());
            }
        }
        challenge.set_ready().await.map_err(|e| AcmeError::from_acme("starting validation", e))?;
        tracing::debug!(%domain, challenge = config.challenge.as_str(), "challenge ready");
    }
    let order_failure = match order.poll_ready(&retry()).await {
        Ok(OrderStatus::Ready) => None,
        Ok(status) => Some(match order.state().error.clone() {
            Some(p) => AcmeError::Problem { during: "validating", problem: p.into() },
            None => AcmeError::Protocol {
                during: "validating",
                reason: format!("the order is {status:?} and the server gave no reason"),
            },
        }),
        Err(instant_acme::Error::Api(p)) => Some(AcmeError::Problem { during: "validating", problem: p.into() }),
        Err(e) => return Err(AcmeError::from_acme("validating", e)),
    };
    if let Some(failure) = order_failure {
        // Name the domain: the failed challenge carries its own problem document.
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authz)) = authorizations.next().await {
            let domain = authz.identifier().to_string();
            let Ok(state) = authz.refresh().await else { continue };
            if let Some(problem) = state.challenges.iter().find_map(|c| c.error.clone()) {
                return Err(AcmeError::ChallengeFailed { domain, kind: config.challenge, problem: problem.into() });
            }
        }
        return Err(failure);
    }
    drop(installed);
    // Our own key and CSR (the key never leaves the node).
    let rc = |e: rcgen::Error| AcmeError::Certificate(format!("making the key or CSR: {e}"));
    let mut params = CertificateParams::new(config.domains.clone()).map_err(rc)?;
    params.distinguished_name = DistinguishedName::new();
    let key = KeyPair::generate().map_err(rc)?;
    let csr = params.serialize_request(&key).map_err(rc)?;
    order.finalize_csr(csr.der()).await.map_err(|e| AcmeError::from_acme("finalizing", e))?;
    let chain_pem =
        order.poll_certificate(&retry()).await.map_err(|e| AcmeError::from_acme("downloading the certificate", e))?;
    let key_pem = key.serialize_pem();
    let stored = parse_cert(chain_pem.as_bytes(), key_pem.as_bytes())
        .map_err(|reason| AcmeError::Certificate(format!("the issued certificate is unusable: {reason}")))?;
    if !stored.info.covers(&config.domains) {
        return Err(AcmeError::Certificate(format!(
            "the issued certificate covers {:?}, not {:?}",
            stored.info.names, config.domains
        )));
    }
    Ok((chain_pem, key_pem, stored))
}

/// The server's suggested renewal window for `cert` (ACME Renewal Information, RFC 9773), or
/// `None` when the server does not offer it.
pub(crate) async fn renewal_window(
    account: &Account,
    cert: &StoredCert,
) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let leaf = cert.cert.chain.first()?;
    let id = match instant_acme::CertificateIdentifier::try_from(leaf) {
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(error = %e, "no ARI identifier for the certificate");
            return None;
        }
    };
    match account.renewal_info(&id).await {
        Ok((info, _recheck)) => {
            let to_system = |t: time::OffsetDateTime| {
                let secs = u64::try_from(t.unix_timestamp()).unwrap_or(0);
                std::time::UNIX_EPOCH + Duration::from_secs(secs)
            };
            Some((to_system(info.suggested_window.start), to_system(info.suggested_window.end)))
        }
        Err(instant_acme::Error::Unsupported(_)) => {
            tracing::debug!("the ACME server offers no renewal information (ARI); renewing by lifetime");
            None
        }
        Err(e) => {
            tracing::info!(error = %e, "ACME renewal information unavailable; renewing by lifetime");
            None
        }
    }
}
