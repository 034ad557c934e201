//! When to renew: pure functions of a certificate's validity window, the current time and a
//! random draw passed in (no clock, no RNG here), so the schedule is tested exactly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;

/// What the renewal schedule needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The DNS names (and IP addresses, as text) it covers, lower-case.
    pub names: Vec<String>,
    /// The serial number, as colon-separated hex.
    pub serial: String,
}

impl CertInfo {
    /// Reads the validity, names and serial of a DER certificate.
    ///
    /// # Errors
    /// The certificate cannot be parsed.
    pub fn parse(der: &CertificateDer<'_>) -> Result<Self, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
        let at = |ts: i64| match u64::try_from(ts) {
            Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
            Err(_) => UNIX_EPOCH,
        };
        let validity = cert.validity();
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                    GeneralName::IPAddress(ip) => match <[u8; 4]>::try_from(*ip) {
                        Ok(v4) => names.push(std::net::Ipv4Addr::from(v4).to_string()),
                        Err(_) => {
                            if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                                names.push(std::net::Ipv6Addr::from(v6).to_string());
                            }
                        }
                    },
                    _other => {}
                }
            }
        }
        Ok(CertInfo {
            not_before: at(validity.not_before.timestamp()),
            not_after: at(validity.not_after.timestamp()),
            names,
            serial: cert.raw_serial_as_string(),
        })
    }

    /// The whole validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }

    /// Whether it covers every one of `domains` (case-insensitive).
    pub fn covers(&self, domains: &[String]) -> bool {
        domains.iter().all(|d| self.names.iter().any(|n| n.eq_ignore_ascii_case(d)))
    }

    /// Whether it is past its end of validity at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Seconds of validity left at `now` (negative once expired).
    pub fn remaining_secs(&self, now: SystemTime) -> i64 {
        match self.not_after.duration_since(now) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        }
    }
}

/// The shortest wait before asking a certificate's renewal information again (RFC 9773 §4.3).
pub const ARI_RECHECK_MIN: Duration = Duration::from_secs(60);
/// The longest wait before asking a certificate's renewal information again (RFC 9773 §4.3).
pub const ARI_RECHECK_MAX: Duration = Duration::from_secs(86_400);
/// The wait before asking again after a failed or unusable answer (the lifetime rule, or the
/// last window the server suggested, stands meanwhile).
pub const ARI_RECHECK_AFTER_ERROR: Duration = Duration::from_secs(3600);

/// The renewal policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewPolicy {
    /// Renew when this fraction of the lifetime remains (default 1/3, as Let's Encrypt
    /// recommends for 90-day certificates).
    pub remaining_fraction: f64,
    /// Renew up to this fraction of the lifetime earlier, chosen at random per certificate, so
    /// nodes that got certificates at the same time do not all renew at the same moment
    /// (default 1/30: three days of a 90-day certificate).
    pub jitter_fraction: f64,
}

impl Default for RenewPolicy {
    fn default() -> Self {
        RenewPolicy { remaining_fraction: 1.0 / 3.0, jitter_fraction: 1.0 / 30.0 }
    }
}

impl RenewPolicy {
    /// When to renew `cert`, with `draw` a uniform random number in `[0, 1)`.
    pub fn renew_at(&self, cert: &CertInfo, draw: f64) -> SystemTime {
        let lifetime = cert.lifetime().as_secs_f64();
        let remaining = self.remaining_fraction.clamp(0.0, 1.0);
        let jitter = self.jitter_fraction.clamp(0.0, 1.0) * draw.clamp(0.0, 1.0);
        let before_end = Duration::from_secs_f64((lifetime * (remaining + jitter)).min(lifetime));
        cert.not_after.checked_sub(before_end).unwrap_or(cert.not_before)
    }

    /// A point in an ACME Renewal Information window (RFC 9773): uniformly at `draw` in
    /// `[start, end)`, never before `now` (a window in the past means "now").
    pub fn in_window(start: SystemTime, end: SystemTime, draw: f64, now: SystemTime) -> SystemTime {
        let span = end.duration_since(start).unwrap_or_default();
        let at = start + Duration::from_secs_f64(span.as_secs_f64() * draw.clamp(0.0, 1.0));
        at.max(now)
    }

    /// How long to wait before asking the server's renewal information again, from its
    /// `Retry-After`, clamped to [`ARI_RECHECK_MIN`, `ARI_RECHECK_MAX`] as RFC 9773 §4.3
    /// suggests (a server asking for less than a minute, or more than a day, is not followed).
    pub fn ari_recheck(retry_after: Duration) -> Duration {
        retry_after.clamp(ARI_RECHECK_MIN, ARI_RECHECK_MAX)
    }

    /// When expiry counts as near: half-way from the renewal time to the end of validity. Past
    /// this point, failing renewals are logged as errors instead of warnings.
    pub fn warn_at(renew_at: SystemTime, cert: &CertInfo) -> SystemTime {
        let left = cert.not_after.duration_since(renew_at).unwrap_or_default();
        renew_at + left / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(start: u64, days: u64) -> CertInfo {
        let not_before = UNIX_EPOCH + Duration::from_secs(start);
        CertInfo {
            not_before,
            not_after: not_before + Duration::from_secs(days * 86_400),
            names: vec!["a.example".into(), "b.example".into()],
            serial: "01".into(),
        }
    }

    #[test]
    fn renews_when_a_third_remains_minus_jitter() {
        let c = cert(1_000_000, 90);
        let p = RenewPolicy::default();
        assert_eq!(p.renew_at(&c, 0.0), c.not_before + Duration::from_secs(60 * 86_400));
        // The largest draw renews three days earlier.
        let early = p.renew_at(&c, 0.999_999_999);
        let expected = c.not_before + Duration::from_secs(57 * 86_400);
        let diff = early.duration_since(expected).unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_secs(1), "{diff:?}");
        // Out-of-range inputs stay inside the validity window.
        let odd = RenewPolicy { remaining_fraction: 5.0, jitter_fraction: 5.0 };
        assert_eq!(odd.renew_at(&c, 7.0), c.not_before);
    }

    #[test]
    fn ari_window_is_sampled_and_never_in_the_past() {
        let s = UNIX_EPOCH + Duration::from_secs(100);
        let e = UNIX_EPOCH + Duration::from_secs(200);
        assert_eq!(RenewPolicy::in_window(s, e, 0.5, UNIX_EPOCH), UNIX_EPOCH + Duration::from_secs(150));
        let now = UNIX_EPOCH + Duration::from_secs(500);
        assert_eq!(RenewPolicy::in_window(s, e, 0.5, now), now);
    }

    #[test]
    fn ari_retry_after_is_clamped_to_a_minute_and_a_day() {
        assert_eq!(RenewPolicy::ari_recheck(Duration::ZERO), Duration::from_secs(60));
        assert_eq!(RenewPolicy::ari_recheck(Duration::from_secs(1)), Duration::from_secs(60));
        assert_eq!(RenewPolicy::ari_recheck(Duration::from_secs(6 * 3600)), Duration::from_secs(6 * 3600));
        assert_eq!(RenewPolicy::ari_recheck(Duration::from_secs(30 * 86_400)), Duration::from_secs(86_400));
    }

    #[test]
    fn coverage_expiry_and_warning_point() {
        let c = cert(0, 90);
        assert!(c.covers(&["A.example".into()]));
        assert!(!c.covers(&["a.example".into(), "c.example".into()]));
        assert!(!c.expired_at(c.not_before));
        assert!(c.expired_at(c.not_after));
        assert_eq!(c.remaining_secs(c.not_after + Duration::from_secs(5)), -5);
        let renew = c.not_before + Duration::from_secs(60 * 86_400);
        assert_eq!(RenewPolicy::warn_at(renew, &c), c.not_before + Duration::from_secs(75 * 86_400));
    }
}
