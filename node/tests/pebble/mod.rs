//! A Pebble (Let's Encrypt's test ACME server) on loopback for the ACME tests, with
//! pebble-challtestsrv as its DNS server so every challenge is really validated (never
//! `PEBBLE_VA_ALWAYS_VALID`): every name resolves to 127.0.0.1, and Pebble validates HTTP-01 on
//! `http_port` and TLS-ALPN-01 on `tls_port`, which the tests point at the node's ports.
//!
//! Both processes are killed when the [`Pebble`] is dropped. Without the `pebble` package the
//! tests print a SKIP line and pass, unless GEARMESH_REQUIRE_PEBBLE is set (CI sets it).
//!
//! `ari.rs` adds the ACME Renewal Information resource that Pebble 2.4 lacks, in front of it.

pub(crate) mod ari;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};
use tokio::process::{Child, Command};

/// Whether Pebble is installed; panics when it is required (CI) but missing.
pub(crate) fn available() -> bool {
    let found = ["pebble", "pebble-challtestsrv"].iter().all(|bin| {
        std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(bin).is_file()))
    });
    if !found {
        assert!(
            std::env::var_os("GEARMESH_REQUIRE_PEBBLE").is_none(),
            "GEARMESH_REQUIRE_PEBBLE is set but pebble or pebble-challtestsrv is not on PATH (apt-get install pebble)"
        );
        println!("SKIP ACME tests: pebble is not installed (apt-get install pebble)");
    }
    found
}

/// A loopback port free for both TCP and UDP, for the servers whose port Pebble must know in
/// advance (so port 0 will not do). It is picked at random below the kernel's ephemeral range
/// (32768 and up on Linux): a port taken from that range could be handed to some other
/// process's outgoing socket (Pebble's DNS queries, other tests' clients) before our server
/// binds it. Checked free, then released: a small race with other tests' picks remains.
pub(crate) fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(20_000u16..32_000);
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

fn free_udp_port() -> u16 {
    free_port()
}

/// What a Pebble instance is configured with.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Where Pebble validates HTTP-01 (a node's `--acme-http-listen` port).
    pub(crate) http_port: u16,
    /// Where Pebble validates TLS-ALPN-01 (a node's listening port).
    pub(crate) tls_port: u16,
    /// Certificate lifetime in seconds (Pebble's default is five years).
    pub(crate) validity_secs: Option<u64>,
}

/// A running Pebble and pebble-challtestsrv.
pub(crate) struct Pebble {
    dir: PathBuf,
    opts: Options,
    api: u16,
    mgmt: u16,
    dns: u16,
    dns_mgmt: u16,
    pebble: Option<Child>,
    challtestsrv: Option<Child>,
}

impl Pebble {
    /// Starts both processes in a fresh directory named after `test`.
    pub(crate) async fn start(test: &str, opts: Options) -> Pebble {
        let dir =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pebble-{test}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("pebble dir");
        write_api_cert(&dir);
        let mut p = Pebble {
            dir,
            opts,
            api: free_port(),
            mgmt: free_port(),
            dns: free_udp_port(),
            dns_mgmt: free_port(),
            pebble: None,
            challtestsrv: None,
        };
        p.write_config();
        p.start_challtestsrv();
        p.start_pebble().await;
        p
    }

    fn write_config(&self) {
        let mut pebble = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{}", self.api),
            "managementListenAddress": format!("127.0.0.1:{}", self.mgmt),
            "certificate": "api-cert.pem",
            "privateKey": "api-key.pem",
            "httpPort": self.opts.http_port,
            "tlsPort": self.opts.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(v) = self.opts.validity_secs {
            pebble["certificateValidityPeriod"] = v.into();
        }
        let cfg = serde_json::json!({ "pebble": pebble });
        std::fs::write(self.dir.join("config.json"), cfg.to_string()).expect("pebble config");
    }

    fn start_challtestsrv(&mut self) {
        let log = std::fs::File::create(self.dir.join("challtestsrv.log")).expect("log file");
        let child = Command::new("pebble-challtestsrv")
            .current_dir(&self.dir)
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-dns01", &format!("127.0.0.1:{}", self.dns)])
            .args(["-management", &format!("127.0.0.1:{}", self.dns_mgmt)])
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("pebble-challtestsrv started");
        self.challtestsrv = Some(child);
    }

    /// Starts (or restarts, on the same ports) the Pebble server and waits for its directory.
    /// A restarted Pebble has a new root and knows no accounts.
    pub(crate) async fn start_pebble(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("pebble.log")).expect("log file");
        let child = Command::new("pebble")
            .current_dir(&self.dir)
            .args(["-config", "config.json", "-dnsserver", &format!("127.0.0.1:{}", self.dns)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            // Every order validates its challenges again (no reuse of earlier authorizations).
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("pebble started");
        self.pebble = Some(child);
        let client = self.api_client();
        let url = self.directory_url();
        for _ in 0..200 {
            if client.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("pebble did not serve its directory within 20 s; see {}", self.dir.join("pebble.log").display());
    }

    /// Stops the Pebble server (the DNS server stays), as an outage.
    pub(crate) async fn stop_pebble(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            child.kill().await.expect("pebble killed");
        }
    }

    /// The ACME directory URL.
    pub(crate) fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.api)
    }

    /// The CA of Pebble's API certificate (for `--acme-ca-root`).
    pub(crate) fn api_ca(&self) -> PathBuf {
        self.dir.join("api-ca.pem")
    }

    /// The directory holding Pebble's files and logs.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pebble's API certificate and key (PEM files), which the ARI front serves too.
    pub(crate) fn api_cert(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("api-cert.pem"), self.dir.join("api-key.pem"))
    }

    /// A client trusting Pebble's API CA.
    pub(crate) fn api_client(&self) -> reqwest::Client {
        let certs = gearmesh_transport::tls::load_certs(&self.api_ca()).expect("api ca");
        let tls = gearmesh_transport::tls::ClientTls::new(&gearmesh_transport::tls::ClientTrust::Ca(certs))
            .expect("client tls")
            .wss_config();
        reqwest::Client::builder()
            .tls_backend_preconfigured(rustls::ClientConfig::clone(&tls))
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    /// The root that issued chains lead to (`/roots/0` of the management interface), as PEM.
    pub(crate) async fn root_pem(&self) -> String {
        let url = format!("https://127.0.0.1:{}/roots/0", self.mgmt);
        let resp = self.api_client().get(&url).send().await.expect("pebble management answers");
        assert!(resp.status().is_success(), "{url}: {}", resp.status());
        resp.text().await.expect("root PEM")
    }

    /// How many orders this Pebble was asked to create (from its log).
    pub(crate) fn orders(&self) -> usize {
        std::fs::read_to_string(self.dir.join("pebble.log"))
            .map(|log| log.matches("POST /order-plz").count())
            .unwrap_or(0)
    }

    /// How many certificates this Pebble issued (from its log).
    pub(crate) fn issued(&self) -> usize {
        std::fs::read_to_string(self.dir.join("pebble.log"))
            .map(|log| log.matches("Issued certificate serial").count())
            .unwrap_or(0)
    }
}

/// Pebble's API certificate: a small CA and a `CA:FALSE` leaf for localhost and 127.0.0.1.
fn write_api_cert(dir: &Path) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "gearmesh test: Pebble API CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let leaf_key = KeyPair::generate().expect("key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
    leaf.is_ca = IsCa::ExplicitNoCa;
    let issuer = Issuer::new(ca, &ca_key);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf");
    std::fs::write(dir.join("api-ca.pem"), ca_cert.pem()).expect("write");
    std::fs::write(dir.join("api-cert.pem"), leaf_cert.pem()).expect("write");
    std::fs::write(dir.join("api-key.pem"), leaf_key.serialize_pem()).expect("write");
}

/// The address Pebble's validation reaches a node at.
pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
