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
/// binds it. Checked free, then released, and never handed out twice in this process, so the
/// tests running in parallel here never pick the same port. Another process may still take
/// it before our server binds it: the servers' starts below notice that and pick again.
pub(crate) fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..1000 {
        let port = rand::random_range(20_000u16..32_000);
        if handed_out.contains(&port) {
            continue;
        }
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// How long a server gets to start, and how often a start that lost its port is tried again.
const START_WAIT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 5;

/// The last lines of a log, for a failure message (CI keeps no files).
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Whether a server's log, from byte `from` on, says it could not bind one of its ports.
fn lost_a_port(log: &Path, from: usize) -> bool {
    std::fs::read(log).is_ok_and(|log| {
        String::from_utf8_lossy(log.get(from..).unwrap_or_default()).contains("address already in use")
    })
}

/// Whether a DNS server answers on `port` (one A query over UDP, with the query's id echoed).
async fn dns_answers(port: u16) -> bool {
    let Ok(socket) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else { return false };
    // Header: id 0x6d67, recursion desired, one question; then "gm.test" A IN.
    let query = b"\x6d\x67\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x02gm\x04test\x00\x00\x01\x00\x01";
    if socket.send_to(query, ("127.0.0.1", port)).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await,
        Ok(Ok(n)) if n >= 2 && buf[..2] == query[..2]
    )
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
            dns: free_port(),
            dns_mgmt: free_port(),
            pebble: None,
            challtestsrv: None,
        };
        p.start_challtestsrv().await;
        p.start_pebble_on_free_ports().await;
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

    /// Starts pebble-challtestsrv and waits until its DNS server answers and its management
    /// interface accepts connections. It does not exit when it cannot bind its DNS port (it only
    /// logs it), so a lost port is read from its log, and the start is tried again on new ports.
    async fn start_challtestsrv(&mut self) {
        let log_path = self.dir.join("challtestsrv.log");
        for _ in 0..START_ATTEMPTS {
            let log = std::fs::File::create(&log_path).expect("log file");
            let mut child = Command::new("pebble-challtestsrv")
                .current_dir(&self.dir)
                .args([
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                ])
                .args(["-dns01", &format!("127.0.0.1:{}", self.dns)])
                .args(["-management", &format!("127.0.0.1:{}", self.dns_mgmt)])
                .stdout(Stdio::from(log.try_clone().expect("log")))
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .expect("pebble-challtestsrv started");
            let deadline = tokio::time::Instant::now() + START_WAIT;
            while tokio::time::Instant::now() < deadline && !lost_a_port(&log_path, 0) {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                let mgmt = tokio::net::TcpStream::connect(("127.0.0.1", self.dns_mgmt)).await.is_ok();
                if mgmt && dns_answers(self.dns).await && !lost_a_port(&log_path, 0) {
                    self.challtestsrv = Some(child);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ignored = child.kill().await;
            assert!(
                lost_a_port(&log_path, 0),
                "pebble-challtestsrv did not start within {START_WAIT:?}:\n{}",
                log_tail(&log_path)
            );
            (self.dns, self.dns_mgmt) = (free_port(), free_port());
        }
        panic!("pebble-challtestsrv lost its ports {START_ATTEMPTS} times:\n{}", log_tail(&log_path));
    }

    /// The first start of Pebble: when another process took one of its ports, it starts again
    /// on new ones (a restart must keep its ports: nodes know its directory URL).
    async fn start_pebble_on_free_ports(&mut self) {
        for _ in 0..START_ATTEMPTS {
            self.write_config();
            if self.try_start_pebble().await {
                return;
            }
            (self.api, self.mgmt) = (free_port(), free_port());
        }
        panic!("pebble lost its ports {START_ATTEMPTS} times:\n{}", log_tail(&self.dir.join("pebble.log")));
    }

    /// Starts (or restarts, on the same ports) the Pebble server and waits for its directory.
    /// A restarted Pebble has a new root and knows no accounts. The port the stopped Pebble
    /// used is this process's alone, so a restart that finds it taken tries again for a while.
    pub(crate) async fn start_pebble(&mut self) {
        for _ in 0..START_ATTEMPTS {
            if self.try_start_pebble().await {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("pebble lost its ports {START_ATTEMPTS} times:\n{}", log_tail(&self.dir.join("pebble.log")));
    }

    /// One start of Pebble: true once it serves its directory, false when it exited because one
    /// of its ports was taken. Panics with its log when it failed any other way.
    async fn try_start_pebble(&mut self) -> bool {
        let log_path = self.dir.join("pebble.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("log file");
        let start = usize::try_from(log.metadata().expect("log").len()).expect("log length");
        let mut child = Command::new("pebble")
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
        let client = self.api_client();
        let url = self.directory_url();
        let deadline = tokio::time::Instant::now() + START_WAIT;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(lost_a_port(&log_path, start), "pebble exited ({status}):\n{}", log_tail(&log_path));
                return false;
            }
            if client.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                self.pebble = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("pebble did not serve its directory within {START_WAIT:?}:\n{}", log_tail(&log_path));
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
