//! gearmesh: an in-process service mesh node.
//!
//! A node hosts **gears** (named services with async **ports**), dispatches calls between them
//! in-process, and serves its HTTP API on one listening port. The gear SDK lives in
//! [`gearmesh_gears`] and is re-exported here as [`gears`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use gearmesh::{Node, builtin};
//!
//! let node = Node::builder()
//!     .listen("127.0.0.1:0".parse()?)
//!     .insecure_dev(true)
//!     .gear(builtin::echo())
//!     .build()?
//!     .start()
//!     .await?;
//! println!("listening on {}", node.local_addr());
//! node.shutdown().await;
//! # Ok(()) }
//! ```

mod api;
mod authn;
pub mod builtin;
mod config;
mod dashboard;
mod interface;
mod links;
mod node;
pub mod pipeline;

pub use config::{
    CallsConfig, ConfigError, DEFAULT_MESH_NAME, DialTransport, HttpConfig, InterfaceConfig, LogFormat,
    MeshLinksConfig, NodeConfig, ResilienceSettings, TlsConfig, TlsMode,
};
pub use gearmesh_auth as auth;
pub use gearmesh_gears as gears;
pub use links::{DEV_CA_CERT_FILE, LinksError};
pub use node::{BuildError, Node, NodeBuilder, RunningNode, StartError};

/// Installs aws-lc-rs as the process's rustls crypto provider (the one provider of the whole
/// tree). Idempotent; call it before building any TLS client or server.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _already_installed = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
