//! Built-in gears, hosted with `--gears`: `echo` (testing), `kv` (an in-memory store), and a small
//! shop (`users`, `products`, `billing`, `orders`, plus `audit`, which listens to the shop's events).
//! Their ports are documented in `docs/gears.md`. They are ordinary gears: library code others can
//! reuse and read as examples.

mod echo;
mod kv;
pub mod shop;

pub use echo::echo;
pub use kv::{KvLimits, kv, kv_with};
pub use shop::{audit, billing, orders, products, users};

use gearmesh_gears::Gear;

/// The names `--gears` accepts: each gear, plus `shop` (the five shop gears) and `all`.
pub const NAMES: &[&str] = &["echo", "kv", "users", "products", "billing", "orders", "audit", "shop", "all"];

/// The shop's gears (a node hosting any of them defines the `order` pipeline).
pub(crate) const SHOP: &[&str] = &["users", "products", "billing", "orders", "audit"];

/// Expands `shop` and `all` and removes duplicates, keeping the order.
///
/// # Errors
/// The first unknown name.
pub fn expand(names: &[String]) -> Result<Vec<&'static str>, String> {
    let mut out: Vec<&'static str> = Vec::new();
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let group: &[&'static str] = match n {
            "shop" => SHOP,
            "all" => &["echo", "kv", "users", "products", "billing", "orders", "audit"],
            other => match NAMES.iter().find(|k| **k == other) {
                Some(k) => std::slice::from_ref(k),
                None => return Err(other.to_owned()),
            },
        };
        for g in group {
            if !out.contains(g) {
                out.push(g);
            }
        }
    }
    Ok(out)
}

/// A fresh instance of a built-in gear by name (`None` for unknown names and groups).
pub fn by_name(name: &str) -> Option<Gear> {
    Some(match name {
        "echo" => echo(),
        "kv" => kv(),
        "users" => users(),
        "products" => products(),
        "billing" => billing(),
        "orders" => orders(),
        "audit" => audit(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_expand_without_duplicates() {
        let got = expand(&["echo".into(), "shop".into(), "users".into()]).expect("known");
        assert_eq!(got, vec!["echo", "users", "products", "billing", "orders", "audit"]);
        assert_eq!(expand(&["nope".into()]), Err("nope".into()));
        for n in expand(&["all".into()]).expect("known") {
            assert!(by_name(n).is_some(), "{n}");
        }
    }
}
