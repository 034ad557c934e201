//! One issuance: account (loaded or created), order, challenges, finalize with our own key,
//! download the chain. The driver in `mod.rs` decides when; this file only does it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewAccount,
    NewOrder, Order, OrderStatus, RetryPolicy,
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

/// Creates the order, naming the certificate it `replaces` (RFC 9773 §5) when given. An order
/// with `replaces` that fails for any reason is made once more without it, so the ARI
/// bookkeeping never blocks a renewal: the server may refuse it (`alreadyReplaced`, a
/// certificate from another account) or, like Pebble 2.4, ignore the field and not reflect it
/// in the order, which instant-acme reports as an error after the order was made.
async fn new_order(
    account: &Account,
    ids: &[Identifier],
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Order, AcmeError> {
    if let Some(id) = replaces {
        let shown = id.to_string();
        match account.new_order(&NewOrder::new(ids).replaces(id)).await {
            Ok(order) => {
                tracing::debug!(replaces = %shown, "the order names the certificate it replaces (ARI)");
                return Ok(order);
            }
            Err(e) => tracing::info!(
                error = %e,
                replaces = %shown,
                "the order naming the certificate it replaces (ARI) failed; ordering without `replaces`"
            ),
        }
    }
    account.new_order(&NewOrder::new(ids)).await.map_err(|e| AcmeError::from_acme("creating the order", e))
}

/// Orders a certificate for `config.domains` (naming the certificate it `replaces`, see
/// [`replaces`]), answers the challenges, and returns the new chain and key (as PEM, and
/// parsed).
pub(crate) async fn issue(
    config: &AcmeConfig,
    account: &Account,
    resolver: &CertResolver,
    http01: &Http01Tokens,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<(String, String, StoredCert), AcmeError> {
    let ids: Vec<Identifier> = config.domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
    let mut order = new_order(account, &ids, replaces).await?;
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

/// What the server says about renewing a certificate (ACME Renewal Information, RFC 9773).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ari {
    /// The directory has no `renewalInfo`: the server offers no ARI; renew by lifetime.
    Unsupported,
    /// The suggested window (`end` after `start`), and when to ask again (its `Retry-After`).
    Window {
        /// Start of the window.
        start: SystemTime,
        /// End of the window.
        end: SystemTime,
        /// The server's `Retry-After`, as a delay from now (not yet clamped).
        retry_after: Duration,
    },
    /// The server offers ARI but this answer is missing or unusable (an HTTP error, no
    /// `Retry-After`, a window that ends before it starts, a certificate without an AKI).
    Failed(String),
}

/// Asks the server's suggested renewal window for `cert` (RFC 9773 §4.2: a plain GET of
/// `<renewalInfo>/<certID>`).
pub(crate) async fn renewal_info(account: &Account, cert: &StoredCert) -> Ari {
    let Some(leaf) = cert.cert.chain.first() else { return Ari::Failed("no certificate in the chain".into()) };
    let id = match CertificateIdentifier::try_from(leaf) {
        Ok(id) => id,
        Err(e) => return Ari::Failed(format!("no ARI identifier for the certificate: {e}")),
    };
    match account.renewal_info(&id).await {
        Ok((info, retry_after)) => {
            let to_system = |t: time::OffsetDateTime| {
                let secs = u64::try_from(t.unix_timestamp()).unwrap_or(0);
                UNIX_EPOCH + Duration::from_secs(secs)
            };
            let (start, end) = (to_system(info.suggested_window.start), to_system(info.suggested_window.end));
            if end <= start {
                // RFC 9773 §4.2: treated as no answer at all.
                return Ari::Failed(format!("the suggested window for {id} ends before it starts"));
            }
            Ari::Window { start, end, retry_after }
        }
        Err(instant_acme::Error::Unsupported(_)) => Ari::Unsupported,
        Err(e) => Ari::Failed(format!("renewal information for {id}: {e}")),
    }
}

/// The certificate a new order replaces (RFC 9773 §5, the order's `replaces`): the one being
/// renewed, named only when the server offers ARI (`renewalInfo` in its directory). `None`
/// for a first order, a server without ARI, or a certificate without an Authority Key
/// Identifier.
pub(crate) fn replaces(current: Option<&StoredCert>, ari_offered: bool) -> Option<CertificateIdentifier<'static>> {
    if !ari_offered {
        return None;
    }
    let leaf = current?.cert.chain.first()?;
    CertificateIdentifier::try_from(leaf).ok().map(CertificateIdentifier::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, IsCa, Issuer, KeyIdMethod, SerialNumber};

    /// A CA whose key identifier and a leaf whose serial are RFC 9773 §4.1's example, so the
    /// identifier must come out as the RFC's `aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE`.
    fn rfc_example(with_aki: bool) -> StoredCert {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_identifier_method = KeyIdMethod::PreSpecified(vec![
            0x69, 0x88, 0x5b, 0x6b, 0x87, 0x46, 0x40, 0x41, 0xe1, 0xb3, 0x7b, 0x84, 0x7b, 0xa0, 0xae, 0x2c, 0xde, 0x01,
            0xc8, 0xd4,
        ]);
        let issuer = Issuer::new(ca, &ca_key);
        let key = KeyPair::generate().expect("key");
        let mut leaf = CertificateParams::new(vec!["node.example".to_owned()]).expect("params");
        leaf.serial_number = Some(SerialNumber::from_slice(&[0x87, 0x65, 0x43, 0x21]));
        leaf.use_authority_key_identifier_extension = with_aki;
        let cert = leaf.signed_by(&key, &issuer).expect("leaf");
        parse_cert(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).expect("parses")
    }

    #[test]
    fn replaces_names_the_renewed_certificate_only_when_the_server_offers_ari() {
        let cert = rfc_example(true);
        let id = replaces(Some(&cert), true).expect("an identifier");
        assert_eq!(id.to_string(), "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE");
        // No renewalInfo in the directory: instant-acme would refuse the order, and the server
        // would not know the field.
        assert_eq!(replaces(Some(&cert), false), None);
        // A first order replaces nothing.
        assert_eq!(replaces(None, true), None);
        // A certificate without an AKI has no identifier: the order goes without `replaces`.
        assert_eq!(replaces(Some(&rfc_example(false)), true), None);
    }
}
