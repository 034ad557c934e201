//! The auth parts of the `gearmesh` command: the `--auth-*` flags of `gearmesh start`,
//! `gearmesh keygen` and `gearmesh token issue`.
//!
//! The key and token logic is the `gearmesh-auth` library's; this file only parses flags, writes
//! files and prints.

use std::{io::Write, path::PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gearmesh::auth::{
    Algorithm, AuthConfig, Issuer, LOCAL_ISSUER, Scopes, TokenRequest, keygen, load_key_file, parse_ttl,
};

/// The `--auth-*` flags of `gearmesh start` (each also a `GEARMESH_AUTH_*` variable and a key
/// of the `[auth]` table).
#[derive(Debug, Args)]
pub(crate) struct AuthArgs {
    /// Key file verifying tokens: a shared secret or a PEM key (repeatable). A secret or private
    /// key also signs the node's own tokens.
    #[arg(long = "auth-key", env = "GEARMESH_AUTH_KEYS", value_delimiter = ',', value_name = "FILE")]
    keys: Vec<PathBuf>,
    /// JWKS source: a local file or an identity provider's `https://` URL (repeatable).
    #[arg(long = "auth-jwks", env = "GEARMESH_AUTH_JWKS", value_delimiter = ',', value_name = "SRC")]
    jwks: Vec<String>,
    /// The mesh's audience: required in every token's `aud` when set.
    #[arg(long = "auth-audience", env = "GEARMESH_AUTH_AUDIENCE", value_name = "AUD")]
    audience: Option<String>,
    /// A token this node presents to its peers when it holds no signing key.
    #[arg(long = "node-token", env = "GEARMESH_NODE_TOKEN", value_name = "FILE")]
    node_token: Option<PathBuf>,
}

impl AuthArgs {
    /// Applies the flags over the file's `[auth]` table (flags replace lists, as other flags do).
    pub(crate) fn apply(self, auth: &mut AuthConfig) {
        if !self.keys.is_empty() {
            auth.keys = self.keys;
        }
        if !self.jwks.is_empty() {
            auth.jwks = self.jwks;
        }
        if let Some(v) = self.audience {
            auth.audience = Some(v);
        }
        if let Some(v) = self.node_token {
            auth.node_token = Some(v);
        }
    }
}

/// `gearmesh keygen`.
#[derive(Debug, Args)]
pub(crate) struct KeygenArgs {
    /// The algorithm: EdDSA, ES256 (key pairs) or HS256, HS384, HS512 (shared secrets).
    #[arg(long, default_value = "EdDSA", value_parser = parse_alg)]
    alg: Algorithm,
    /// Where to write the key (mode 0600; an existing file is not overwritten). Without it the
    /// key is printed to stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// `gearmesh token ...`.
#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Sign a token with a key file and print it.
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
struct IssueArgs {
    /// The key file (a shared secret or a PEM private key).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The algorithm of a shared secret (HS384, HS512) [default: HS256 for secrets].
    #[arg(long, value_parser = parse_alg)]
    key_alg: Option<Algorithm>,
    /// The subject (`sub`): who the token is for.
    #[arg(long, value_name = "NAME")]
    sub: String,
    /// A scope, e.g. `call:billing/*`, `publish:orders.*`, `observe` (repeatable; each may hold
    /// several separated by spaces).
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// How long the token lives: `90s`, `15m`, `1h`, `7d`.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// The audience (`aud`): the mesh's audience, when nodes check one.
    #[arg(long, value_name = "AUD")]
    aud: Option<String>,
}

fn parse_alg(s: &str) -> Result<Algorithm, String> {
    s.parse().map_err(|_| {
        let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.as_str()).collect();
        format!("unknown algorithm {s:?} (one of {})", names.join(", "))
    })
}

/// `gearmesh keygen`: writes the key (or prints it) and says how to use it.
pub(crate) fn run_keygen(args: KeygenArgs) -> Result<()> {
    let generated = keygen(args.alg).with_context(|| format!("generating a {} key", args.alg))?;
    let Some(path) = args.out else {
        print!("{}", generated.contents);
        if !generated.contents.ends_with('\n') {
            println!();
        }
        return Ok(());
    };
    write_private(&path, generated.contents.as_bytes())?;
    print!("{}", generated.usage(&path.display().to_string()));
    if let Some(jwk) = generated.key.verify_key().public_jwk() {
        println!("\nPublic key (JWK), also served at /.well-known/jwks.json:\n{}", serde_json::to_string(&jwk)?);
    }
    Ok(())
}

/// Creates `path` readable only by its owner, refusing to overwrite an existing file.
pub(crate) fn write_private(path: &std::path::Path, contents: &[u8]) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| {
        if path.exists() {
            format!("{} already exists; not overwriting a key", path.display())
        } else {
            format!("cannot create {}", path.display())
        }
    })?;
    file.write_all(contents).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", path.display()))
}

/// `gearmesh token ...`.
pub(crate) fn run_token(args: TokenArgs) -> Result<()> {
    match args.command {
        TokenCommand::Issue(a) => issue(a),
    }
}

fn issue(args: IssueArgs) -> Result<()> {
    let loaded = load_key_file(&args.key, args.key_alg).with_context(|| format!("key {}", args.key.display()))?;
    let Some(key) = loaded.signing_key().cloned() else {
        bail!("{} is a public key: tokens are signed with a secret or private key", args.key.display());
    };
    let scopes = Scopes::parse_strict(&args.scopes.join(" "))?;
    if scopes.is_empty() {
        bail!("give at least one --scope (e.g. --scope 'call:*' or --scope observe)");
    }
    let ttl = parse_ttl(&args.ttl).with_context(|| format!("--ttl {:?} (e.g. 90s, 15m, 1h, 7d)", args.ttl))?;
    let mut request = TokenRequest::new(args.sub, scopes, ttl);
    if let Some(aud) = args.aud {
        request = request.audience(aud);
    }
    let token = Issuer::new(key).with_issuer(LOCAL_ISSUER).issue(&request)?;
    println!("{token}");
    Ok(())
}
