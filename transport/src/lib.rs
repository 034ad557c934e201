//! gearmesh links: an authenticated, encrypted, bidirectional pipe of frames between two nodes.
//!
//! This crate will hold the frame codec, the `Link` abstraction over WebSocket (tokio-tungstenite) and
//! QUIC (quinn), TLS configuration (rustls, development CA, PEM files, ACME), heartbeats and limits.
//! It is empty until the transport work lands.
