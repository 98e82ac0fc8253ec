//! Signed, expiring image links: `/v1/images/files/{name}?expires=T&signature=S`, where
//! `S = hex(HMAC-SHA256(key, "{name}\n{T}"))`. No bearer key is needed to fetch one, as
//! with OpenAI's 60-minute links; a tampered or expired link is a 404.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks links.
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    /// A signer with a secret key (32 random bytes, kept in the data directory).
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    fn mac(&self, name: &str, expires: i64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(name.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The signature of `name` until `expires`.
    pub fn sign(&self, name: &str, expires: i64) -> String {
        hex::encode(self.mac(name, expires).finalize().into_bytes())
    }

    /// Whether `signature` is right, compared in constant time.
    pub fn verify(&self, name: &str, expires: i64, signature: &str) -> bool {
        match hex::decode(signature) {
            Ok(sig) => self.mac(name, expires).verify_slice(&sig).is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tampering_with_any_part_fails() {
        let s = Signer::new(vec![7; 32]);
        let sig = s.sign("abc.png", 100);
        assert!(s.verify("abc.png", 100, &sig));
        assert!(!s.verify("abd.png", 100, &sig));
        assert!(!s.verify("abc.png", 101, &sig));
        assert!(!s.verify("abc.png", 100, "00"));
        assert!(!s.verify("abc.png", 100, "not hex"));
        assert!(!Signer::new(vec![8; 32]).verify("abc.png", 100, &sig));
    }
}
