//! The mesh core's own wire format for gossip messages (carried as opaque bytes in transport
//! `Gossip` frames). Hand-rolled, versioned and bounded: decoding never panics, checks every count
//! against the bytes left, and refuses messages over the configured size.
//!
//! Layout: `b"gm"`, a format version byte (1), a kind byte, then the body. Integers are big-endian;
//! strings are a u16 length and UTF-8 bytes; lists are a u16 count then the items.

use super::id::NodeId;
use super::types::{GearAd, NodeRecord, NodeState};

const MAGIC: [u8; 2] = *b"gm";
/// The wire format version this core speaks.
pub const WIRE_VERSION: u8 = 1;

const KIND_HEARTBEAT: u8 = 1;
const KIND_RECORDS: u8 = 2;
const KIND_DIGEST: u8 = 3;
const KIND_PRUNE: u8 = 4;
const KIND_SUMMARY: u8 = 5;

/// Anti-entropy splits the id space into this many buckets by the first byte of the id.
pub(crate) const SUMMARY_BUCKETS: usize = 64;

/// The bucket of an id.
pub(crate) fn bucket_of(id: NodeId) -> usize {
    usize::from(id.as_bytes()[0] >> 2)
}

/// The inclusive id range of a bucket.
pub(crate) fn bucket_range(b: usize) -> (NodeId, NodeId) {
    let first = (b as u8) << 2;
    let mut lo = [0u8; 16];
    lo[0] = first;
    let mut hi = [0xffu8; 16];
    hi[0] = first | 3;
    (NodeId::from_bytes(lo), NodeId::from_bytes(hi))
}

const MAX_STR: usize = 1024;
const MAX_ADDRS: usize = 16;
const MAX_LINKS: usize = 64;
const MAX_SUSPECTERS: usize = 8;
const MAX_PORTS: usize = 256;

/// Why bytes did not decode as a gossip message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message is larger than `Config::max_message_size`.
    #[error("message of {0} bytes exceeds the size limit")]
    TooLarge(usize),
    /// The message does not start with the gossip magic.
    #[error("not a gossip message")]
    BadMagic,
    /// The message uses a wire format version this core does not speak.
    #[error("unsupported gossip format version {0}")]
    UnsupportedVersion(u8),
    /// The message kind is unknown.
    #[error("unknown gossip message kind {0}")]
    UnknownKind(u8),
    /// The message ended in the middle of a field.
    #[error("message truncated")]
    Truncated,
    /// A string is not UTF-8.
    #[error("invalid UTF-8 in a string")]
    InvalidUtf8,
    /// A count or length exceeds its limit.
    #[error("{0} exceeds its limit")]
    Limit(&'static str),
    /// A field has a value outside its domain.
    #[error("invalid value for {0}")]
    Invalid(&'static str),
    /// Bytes follow the end of the message.
    #[error("trailing bytes after the message")]
    Trailing,
}

/// One entry of a digest: which version of a node's record the sender holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DigestEntry {
    pub(crate) id: NodeId,
    pub(crate) key: (u64, u8, u64),
}

/// Size of one encoded digest entry.
pub(crate) const DIGEST_ENTRY_LEN: usize = 16 + 8 + 1 + 8;
/// Size of a message header.
pub(crate) const HEADER_LEN: usize = 4;

/// A decoded gossip message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Msg {
    /// Nothing new; proves the sender is alive.
    Heartbeat,
    /// Records the receiver may not have.
    Records(Vec<NodeRecord>),
    /// The sender's record versions for every node with an id in `lo..=hi`.
    Digest { lo: NodeId, hi: NodeId, entries: Vec<DigestEntry>, want_reply: bool },
    /// The sender drops this link; the addresses are other nodes to try.
    Prune { referrals: Vec<String> },
    /// Per-bucket hashes of the sender's record versions (starts anti-entropy).
    Summary { hashes: Vec<u64> },
}

pub(crate) fn encode_summary(hashes: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + hashes.len() * 8);
    header(&mut b, KIND_SUMMARY);
    for h in hashes.iter().take(SUMMARY_BUCKETS) {
        b.extend_from_slice(&h.to_be_bytes());
    }
    b
}

/// Starts a message of the given kind in `buf`.
fn header(buf: &mut Vec<u8>, kind: u8) {
    buf.extend_from_slice(&MAGIC);
    buf.push(WIRE_VERSION);
    buf.push(kind);
}

pub(crate) fn encode_heartbeat() -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN);
    header(&mut b, KIND_HEARTBEAT);
    b
}

/// A records message from already-encoded records (see [`encode_record`]).
pub(crate) fn encode_records<'a>(records: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut b = Vec::new();
    header(&mut b, KIND_RECORDS);
    put_u16(&mut b, u16::try_from(records.len()).unwrap_or(u16::MAX));
    for r in records.take(usize::from(u16::MAX)) {
        b.extend_from_slice(r);
    }
    b
}

pub(crate) fn encode_digest(lo: NodeId, hi: NodeId, entries: &[DigestEntry], want_reply: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + 35 + entries.len() * DIGEST_ENTRY_LEN);
    header(&mut b, KIND_DIGEST);
    b.push(u8::from(want_reply));
    b.extend_from_slice(lo.as_bytes());
    b.extend_from_slice(hi.as_bytes());
    let n = entries.len().min(usize::from(u16::MAX));
    put_u16(&mut b, n as u16);
    for e in &entries[..n] {
        b.extend_from_slice(e.id.as_bytes());
        b.extend_from_slice(&e.key.0.to_be_bytes());
        b.push(e.key.1);
        b.extend_from_slice(&e.key.2.to_be_bytes());
    }
    b
}

pub(crate) fn encode_prune(referrals: &[String]) -> Vec<u8> {
    let mut b = Vec::new();
    header(&mut b, KIND_PRUNE);
    let n = referrals.len().min(MAX_ADDRS);
    put_u16(&mut b, n as u16);
    for r in &referrals[..n] {
        put_str(&mut b, r);
    }
    b
}

/// Appends one record to `b`. Strings longer than the wire limit are truncated to stay decodable.
pub(crate) fn encode_record(b: &mut Vec<u8>, r: &NodeRecord) {
    b.extend_from_slice(r.id.as_bytes());
    b.extend_from_slice(&r.incarnation.to_be_bytes());
    b.extend_from_slice(&r.version.to_be_bytes());
    b.push(r.state.rank());
    put_ids(b, &r.suspecters, MAX_SUSPECTERS);
    put_strs(b, &r.addrs, MAX_ADDRS);
    put_u16(b, u16::try_from(r.gears.len()).unwrap_or(u16::MAX));
    for g in r.gears.iter().take(usize::from(u16::MAX)) {
        put_str(b, &g.name);
        put_str(b, &g.version);
        put_strs(b, &g.ports, MAX_PORTS);
        put_strs(b, &g.idempotent, MAX_PORTS);
    }
    put_strs(b, &r.topics, usize::from(u16::MAX));
    put_ids(b, &r.links, MAX_LINKS);
    put_str(b, &r.name);
}

fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_STR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_u16(b, end as u16);
    b.extend_from_slice(&s.as_bytes()[..end]);
}

fn put_strs(b: &mut Vec<u8>, v: &[String], max: usize) {
    let n = v.len().min(max);
    put_u16(b, n as u16);
    for s in &v[..n] {
        put_str(b, s);
    }
}

fn put_ids(b: &mut Vec<u8>, v: &[NodeId], max: usize) {
    let n = v.len().min(max);
    put_u16(b, n as u16);
    for id in &v[..n] {
        b.extend_from_slice(id.as_bytes());
    }
}

/// Decodes one message, refusing anything over `max_size` bytes.
pub(crate) fn decode(bytes: &[u8], max_size: usize) -> Result<Msg, DecodeError> {
    if bytes.len() > max_size {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let mut r = Reader { b: bytes };
    if r.take(2)? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let v = r.u8()?;
    if v != WIRE_VERSION {
        return Err(DecodeError::UnsupportedVersion(v));
    }
    let msg = match r.u8()? {
        KIND_HEARTBEAT => Msg::Heartbeat,
        KIND_RECORDS => {
            let n = r.count(1, usize::from(u16::MAX), "records")?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(r.record()?);
            }
            Msg::Records(v)
        }
        KIND_DIGEST => {
            let want_reply = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Invalid("reply flag")),
            };
            let lo = r.id()?;
            let hi = r.id()?;
            let n = r.count(DIGEST_ENTRY_LEN, usize::from(u16::MAX), "digest entries")?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let id = r.id()?;
                let inc = r.u64()?;
                let rank = r.u8()?;
                if rank > 3 {
                    return Err(DecodeError::Invalid("state"));
                }
                let ver = r.u64()?;
                entries.push(DigestEntry { id, key: (inc, rank, ver) });
            }
            Msg::Digest { lo, hi, entries, want_reply }
        }
        KIND_PRUNE => Msg::Prune { referrals: r.strs(MAX_ADDRS, "referrals")? },
        KIND_SUMMARY => {
            let mut hashes = Vec::with_capacity(SUMMARY_BUCKETS);
            for _ in 0..SUMMARY_BUCKETS {
                hashes.push(r.u64()?);
            }
            Msg::Summary { hashes }
        }
        k => return Err(DecodeError::UnknownKind(k)),
    };
    if !r.b.is_empty() {
        return Err(DecodeError::Trailing);
    }
    Ok(msg)
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }

    fn id(&mut self) -> Result<NodeId, DecodeError> {
        let s = self.take(16)?;
        let mut a = [0u8; 16];
        a.copy_from_slice(s);
        Ok(NodeId::from_bytes(a))
    }

    /// A u16 count, checked against `max` and against the bytes left (each item is at least
    /// `min_item` bytes), so a forged count cannot make us allocate.
    fn count(&mut self, min_item: usize, max: usize, what: &'static str) -> Result<usize, DecodeError> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(DecodeError::Limit(what));
        }
        if n.saturating_mul(min_item) > self.b.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }

    fn str(&mut self) -> Result<String, DecodeError> {
        let n = usize::from(self.u16()?);
        if n > MAX_STR {
            return Err(DecodeError::Limit("string"));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError::InvalidUtf8)
    }

    fn strs(&mut self, max: usize, what: &'static str) -> Result<Vec<String>, DecodeError> {
        let n = self.count(2, max, what)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.str()?);
        }
        Ok(v)
    }

    fn ids(&mut self, max: usize, what: &'static str) -> Result<Vec<NodeId>, DecodeError> {
        let n = self.count(16, max, what)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.id()?);
        }
        Ok(v)
    }

    fn record(&mut self) -> Result<NodeRecord, DecodeError> {
        let id = self.id()?;
        let incarnation = self.u64()?;
        let version = self.u64()?;
        let state = match self.u8()? {
            0 => NodeState::Alive,
            1 => NodeState::Suspect,
            2 => NodeState::Dead,
            3 => NodeState::Left,
            _ => return Err(DecodeError::Invalid("state")),
        };
        let suspecters = self.ids(MAX_SUSPECTERS, "suspecters")?;
        let addrs = self.strs(MAX_ADDRS, "addresses")?;
        let n = self.count(8, usize::from(u16::MAX), "gears")?;
        let mut gears = Vec::with_capacity(n);
        for _ in 0..n {
            let name = self.str()?;
            let version = self.str()?;
            let ports = self.strs(MAX_PORTS, "ports")?;
            let idempotent = self.strs(MAX_PORTS, "idempotent ports")?;
            gears.push(GearAd { name, version, ports, idempotent });
        }
        let topics = self.strs(usize::from(u16::MAX), "topics")?;
        let links = self.ids(MAX_LINKS, "links")?;
        let name = self.str()?;
        Ok(NodeRecord { id, incarnation, version, state, suspecters, addrs, gears, topics, links, name })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sample() -> NodeRecord {
        NodeRecord {
            id: NodeId::from_bytes([7; 16]),
            incarnation: 3,
            version: 9,
            state: NodeState::Suspect,
            suspecters: vec![NodeId::from_bytes([1; 16])],
            addrs: vec!["wss://a:1".into()],
            gears: vec![GearAd {
                name: "billing".into(),
                version: "1.2.0".into(),
                ports: vec!["charge".into(), "refund".into()],
                idempotent: vec!["refund".into()],
            }],
            topics: vec!["orders.cancelled".into()],
            links: vec![NodeId::from_bytes([2; 16]), NodeId::from_bytes([3; 16])],
            name: "billing-eu-1".into(),
        }
    }

    #[test]
    fn round_trips() {
        let r = sample();
        let mut enc = Vec::new();
        encode_record(&mut enc, &r);
        let msg = encode_records([enc.as_slice()].into_iter());
        assert_eq!(decode(&msg, 1 << 16), Ok(Msg::Records(vec![r])));
        let e = DigestEntry { id: NodeId::from_bytes([5; 16]), key: (1, 2, 3) };
        let hi = NodeId::from_bytes([255; 16]);
        let d = encode_digest(NodeId::default(), hi, &[e], true);
        assert_eq!(
            decode(&d, 1 << 16),
            Ok(Msg::Digest { lo: NodeId::default(), hi, entries: vec![e], want_reply: true })
        );
        let p = encode_prune(&["x".into()]);
        assert_eq!(decode(&p, 1 << 16), Ok(Msg::Prune { referrals: vec!["x".into()] }));
        assert_eq!(decode(&encode_heartbeat(), 16), Ok(Msg::Heartbeat));
        let h: Vec<u64> = (0..SUMMARY_BUCKETS as u64).collect();
        assert_eq!(decode(&encode_summary(&h), 1 << 16), Ok(Msg::Summary { hashes: h }));
        assert_eq!(decode(&msg, 8), Err(DecodeError::TooLarge(msg.len())));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut enc = Vec::new();
        encode_record(&mut enc, &sample());
        let good = encode_records([enc.as_slice()].into_iter());
        for _ in 0..20_000 {
            let mut b = good.clone();
            let flips = rng.random_range(1..4);
            for _ in 0..flips {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            let cut = rng.random_range(0..=b.len());
            let _ = decode(&b[..cut], 1 << 16);
            let noise: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            let _ = decode(&noise, 1 << 16);
        }
    }
}
