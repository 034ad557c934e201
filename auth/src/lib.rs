//! gearmesh authentication.
//!
//! This crate will hold JWT verification and issuing (jsonwebtoken): keys pinned to their algorithm,
//! local and remote JWKS, claims validation, and the scope model (`call:`, `publish:`, `observe`,
//! `serve:`, `admin`, `mesh:link`). It is empty until the auth work lands.
