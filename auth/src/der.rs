//! A tiny DER reader: just enough to tell which algorithm a PKCS#8 or SubjectPublicKeyInfo key is
//! for, and to pull out its public parts. Never panics on any input.

/// DER tag numbers used here.
pub(crate) const SEQUENCE: u8 = 0x30;
pub(crate) const INTEGER: u8 = 0x02;
pub(crate) const OCTET_STRING: u8 = 0x04;
pub(crate) const BIT_STRING: u8 = 0x03;
pub(crate) const OID: u8 = 0x06;

/// id-ecPublicKey, 1.2.840.10045.2.1.
pub(crate) const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// prime256v1 (P-256), 1.2.840.10045.3.1.7.
pub(crate) const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// id-Ed25519, 1.3.101.112.
pub(crate) const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
/// rsaEncryption, 1.2.840.113549.1.1.1.
pub(crate) const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// A cursor over DER bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Der(bytes)
    }

    /// Reads one element and returns `(tag, contents)`.
    pub(crate) fn next_any(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let (len_bytes, rest) = rest.split_at(n);
            let len = len_bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, rest)
        };
        if rest.len() < len {
            return None;
        }
        let (contents, rest) = rest.split_at(len);
        self.0 = rest;
        Some((tag, contents))
    }

    /// Reads one element that must have `tag`.
    pub(crate) fn next(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next_any()? {
            (t, contents) if t == tag => Some(contents),
            _ => None,
        }
    }
}

/// The algorithm part of a key: the key-type OID and, for EC keys, the curve OID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AlgorithmId<'a> {
    pub(crate) oid: &'a [u8],
    pub(crate) param_oid: Option<&'a [u8]>,
}

fn algorithm_id(contents: &[u8]) -> Option<AlgorithmId<'_>> {
    let mut d = Der::new(contents);
    let oid = d.next(OID)?;
    let param_oid = match d.next_any() {
        Some((OID, p)) => Some(p),
        _ => None,
    };
    Some(AlgorithmId { oid, param_oid })
}

/// PKCS#8 `PrivateKeyInfo`: the algorithm and the inner private key bytes.
pub(crate) fn pkcs8(der: &[u8]) -> Option<(AlgorithmId<'_>, &[u8])> {
    let mut outer = Der::new(der);
    let mut seq = Der::new(outer.next(SEQUENCE)?);
    seq.next(INTEGER)?;
    let alg = algorithm_id(seq.next(SEQUENCE)?)?;
    let key = seq.next(OCTET_STRING)?;
    Some((alg, key))
}

/// `SubjectPublicKeyInfo`: the algorithm and the public key bits (unused-bits byte removed).
pub(crate) fn spki(der: &[u8]) -> Option<(AlgorithmId<'_>, &[u8])> {
    let mut outer = Der::new(der);
    let mut seq = Der::new(outer.next(SEQUENCE)?);
    let alg = algorithm_id(seq.next(SEQUENCE)?)?;
    let bits = seq.next(BIT_STRING)?;
    let (&unused, key) = bits.split_first()?;
    if unused != 0 {
        return None;
    }
    Some((alg, key))
}

/// PKCS#1 `RSAPublicKey`: `(n, e)` as unsigned big-endian bytes (leading zeros removed).
pub(crate) fn rsa_public_key(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut outer = Der::new(der);
    let mut seq = Der::new(outer.next(SEQUENCE)?);
    let n = strip_zeros(seq.next(INTEGER)?);
    let e = strip_zeros(seq.next(INTEGER)?);
    if n.is_empty() || e.is_empty() {
        return None;
    }
    Some((n, e))
}

/// Encodes a PKCS#1 `RSAPublicKey` from unsigned big-endian `n` and `e`.
pub(crate) fn encode_rsa_public_key(n: &[u8], e: &[u8]) -> Vec<u8> {
    let mut body = encode_uint(n);
    body.extend(encode_uint(e));
    encode_tlv(SEQUENCE, &body)
}

fn encode_uint(v: &[u8]) -> Vec<u8> {
    let v = strip_zeros(v);
    let mut contents = Vec::with_capacity(v.len() + 1);
    if v.first().is_none_or(|&b| b & 0x80 != 0) {
        contents.push(0);
    }
    contents.extend_from_slice(v);
    encode_tlv(INTEGER, &contents)
}

fn encode_tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

fn strip_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_panics_on_garbage() {
        let samples: [&[u8]; 6] = [
            &[],
            &[0x30],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x03, 0x02, 0x01],
            &[0x30, 0x02, 0x30, 0x00],
        ];
        for s in samples {
            assert!(pkcs8(s).is_none());
            assert!(spki(s).is_none());
            assert!(rsa_public_key(s).is_none());
        }
        // Every prefix of a valid structure is refused without panicking.
        let valid = [0x30, 0x08, 0x02, 0x02, 0x00, 0xc1, 0x02, 0x02, 0x01, 0x00];
        assert!(rsa_public_key(&valid).is_some());
        for i in 0..valid.len() {
            assert!(rsa_public_key(&valid[..i]).is_none());
        }
    }

    #[test]
    fn rsa_public_key_encoding_round_trips() {
        let n: Vec<u8> = (0..=255u8).rev().collect(); // high bit set: needs a leading zero
        let e = [1, 0, 1];
        let der = encode_rsa_public_key(&n, &e);
        assert_eq!(rsa_public_key(&der), Some((&n[..], &e[..])));
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x0a]);
    }
}
