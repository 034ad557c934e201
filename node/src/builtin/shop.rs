//! A small shop in the spirit of the Kraken seed: `orders.place` calls `users.find`,
//! `products.reserve` and `billing.charge`, and releases the reservation when the charge fails.
//! The request and reply types are shared Rust types, so these gear-to-gear calls stay typed
//! in-process (no serialization) and go through JSON only when they cross a socket.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use gearmesh_gears::{CallError, Ctx, Gear, PortSpec};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `users.find` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindUser {
    /// The user id.
    pub id: String,
}

/// A user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The user id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
}

/// `products.reserve` and `products.release` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserve {
    /// The product.
    pub product_id: String,
    /// How many.
    pub qty: u32,
}

/// `products.reserve` and `products.release` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// The product.
    pub product_id: String,
    /// How many were reserved or released.
    pub qty: u32,
    /// The unit price, in cents.
    pub unit_price_cents: u64,
    /// `qty` x `unit_price_cents` (what the `order` pipeline charges).
    #[serde(default)]
    pub total_cents: u64,
    /// What is left in stock.
    pub remaining: u32,
}

/// `billing.charge` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Who pays.
    pub user_id: String,
    /// How much, in cents.
    pub cents: u64,
}

/// `billing.charge` output, also published on `billing.charged`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The charge id.
    pub charge_id: String,
    /// Who paid.
    pub user_id: String,
    /// How much, in cents.
    pub cents: u64,
}

/// `orders.place` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceOrder {
    /// Who orders.
    pub user_id: String,
    /// What.
    pub product_id: String,
    /// How many.
    pub qty: u32,
}

/// `orders.place` output, also published on `orders.placed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The order id.
    pub order_id: String,
    /// The customer.
    pub user: User,
    /// The product.
    pub product_id: String,
    /// How many.
    pub qty: u32,
    /// The total, in cents.
    pub cents: u64,
    /// The charge's id.
    pub charge_id: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `users.find {"id"}` → a [`User`]; knows `alice`, `bob` and `mallory`.
pub fn users() -> Gear {
    Gear::new("users").version(env!("CARGO_PKG_VERSION")).describe("The shop's customers").port_with(
        PortSpec::new("find").describe("Finds a user by {\"id\"}").idempotent(true),
        |_ctx: Ctx, req: FindUser| async move {
            let name = match req.id.as_str() {
                "alice" => "Alice Liddell",
                "bob" => "Bob Builder",
                "mallory" => "Mallory Malicious",
                _ => return Err(CallError::not_found(format!("no user {:?}", req.id))),
            };
            Ok(User { email: format!("{}@example.com", req.id), id: req.id, name: name.to_owned() })
        },
    )
}

/// `products.reserve` / `products.release` `{"product_id","qty"}` → [`Stock`]. Stock: `widget`
/// (1000 at 250 cents), `gadget` (10 at 1999 cents), `gizmo` (none). Reserving more than is left
/// fails with the app code `out_of_stock`.
pub fn products() -> Gear {
    let stock: Arc<Mutex<BTreeMap<String, (u32, u64)>>> = Arc::new(Mutex::new(BTreeMap::from([
        ("widget".to_owned(), (1000, 250)),
        ("gadget".to_owned(), (10, 1999)),
        ("gizmo".to_owned(), (0, 4999)),
    ])));
    let (s_res, s_rel) = (stock.clone(), stock);
    Gear::new("products")
        .version(env!("CARGO_PKG_VERSION"))
        .describe("The shop's stock")
        .port_with(
            PortSpec::new("reserve").describe("Takes {\"qty\"} of a product from stock"),
            move |_ctx: Ctx, r: Reserve| {
                let result = (|| {
                    if r.qty == 0 {
                        return Err(CallError::bad_request("qty must be at least 1"));
                    }
                    let mut stock = lock(&s_res);
                    let Some((left, price)) = stock.get_mut(&r.product_id) else {
                        return Err(CallError::not_found(format!("no product {:?}", r.product_id)));
                    };
                    if *left < r.qty {
                        return Err(CallError::app("out_of_stock", format!("only {left} {} left", r.product_id)));
                    }
                    *left -= r.qty;
                    Ok(Stock {
                        product_id: r.product_id.clone(),
                        qty: r.qty,
                        unit_price_cents: *price,
                        total_cents: *price * u64::from(r.qty),
                        remaining: *left,
                    })
                })();
                std::future::ready(result)
            },
        )
        .port_with(
            PortSpec::new("release").describe("Puts {\"qty\"} of a product back"),
            move |_ctx: Ctx, r: Reserve| {
                let result = (|| {
                    let mut stock = lock(&s_rel);
                    let Some((left, price)) = stock.get_mut(&r.product_id) else {
                        return Err(CallError::not_found(format!("no product {:?}", r.product_id)));
                    };
                    *left = left.saturating_add(r.qty);
                    Ok(Stock {
                        product_id: r.product_id.clone(),
                        qty: r.qty,
                        unit_price_cents: *price,
                        total_cents: *price * u64::from(r.qty),
                        remaining: *left,
                    })
                })();
                std::future::ready(result)
            },
        )
}

/// `billing.charge {"user_id","cents"}` → a [`Receipt`], published on `billing.charged`.
/// Refuses `mallory` with the app code `insufficient_funds`.
pub fn billing() -> Gear {
    let next = Arc::new(AtomicU64::new(1));
    Gear::new("billing").version(env!("CARGO_PKG_VERSION")).describe("Charges customers").port_with(
        PortSpec::new("charge").describe("Charges {\"user_id\"} {\"cents\"}"),
        move |ctx: Ctx, req: Charge| {
            let id = next.fetch_add(1, Ordering::Relaxed);
            async move {
                if req.user_id == "mallory" {
                    return Err(CallError::app(
                        "insufficient_funds",
                        format!("{} cannot pay {} cents", req.user_id, req.cents),
                    ));
                }
                let receipt = Receipt { charge_id: format!("ch-{id}"), user_id: req.user_id, cents: req.cents };
                ctx.notify("billing.charged", &receipt).await?;
                Ok(receipt)
            }
        },
    )
}

/// `orders.confirm` input: an order whose user was found, stock reserved and charge made (the
/// last step of the `order` pipeline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirm {
    /// The customer.
    pub user: User,
    /// The product.
    pub product_id: String,
    /// How many.
    pub qty: u32,
    /// The total charged, in cents.
    pub cents: u64,
    /// The charge's id.
    pub charge_id: String,
}

/// `orders.place {"user_id","product_id","qty"}` → an [`Order`], published on `orders.placed`.
/// Calls `users.find`, `products.reserve` and `billing.charge`; when the charge fails, it calls
/// `products.release` and returns the charge's error. `orders.confirm` ([`Confirm`]) → an
/// [`Order`], published on `orders.placed`: the same order, when a pipeline made the calls.
pub fn orders() -> Gear {
    let next = Arc::new(AtomicU64::new(1));
    let next_confirm = next.clone();
    Gear::new("orders")
        .version(env!("CARGO_PKG_VERSION"))
        .describe("Places orders")
        .port_with(
            PortSpec::new("confirm").describe("Records an order whose stock is reserved and charge made"),
            move |ctx: Ctx, c: Confirm| {
                let id = next_confirm.fetch_add(1, Ordering::Relaxed);
                async move {
                    let order = Order {
                        order_id: format!("o-{id}"),
                        user: c.user,
                        product_id: c.product_id,
                        qty: c.qty,
                        cents: c.cents,
                        charge_id: c.charge_id,
                    };
                    ctx.notify("orders.placed", &order).await?;
                    Ok(order)
                }
            },
        )
        .port_with(
            PortSpec::new("place").describe("Finds the user, reserves stock, charges, confirms"),
            move |ctx: Ctx, req: PlaceOrder| {
                let id = next.fetch_add(1, Ordering::Relaxed);
                async move {
                    let user: User = ctx.call("users", "find", &FindUser { id: req.user_id.clone() }).await?;
                    let reserve = Reserve { product_id: req.product_id.clone(), qty: req.qty };
                    let stock: Stock = ctx.call("products", "reserve", &reserve).await?;
                    let cents = stock.unit_price_cents * u64::from(req.qty);
                    let charge = Charge { user_id: user.id.clone(), cents };
                    let receipt: Receipt = match ctx.call("billing", "charge", &charge).await {
                        Ok(r) => r,
                        Err(e) => {
                            if let Err(undo) = ctx.call::<_, Stock>("products", "release", &reserve).await {
                                tracing::warn!(error = %undo, "could not release a reservation after a failed charge");
                            }
                            return Err(e);
                        }
                    };
                    let order = Order {
                        order_id: format!("o-{id}"),
                        user,
                        product_id: req.product_id,
                        qty: req.qty,
                        cents,
                        charge_id: receipt.charge_id,
                    };
                    ctx.notify("orders.placed", &order).await?;
                    Ok(order)
                }
            },
        )
}

/// `audit` listens to `orders.placed` and `billing.charged` and keeps the last 100 events;
/// `audit.recent` returns them, oldest first, as `[{"topic","event"}]`.
pub fn audit() -> Gear {
    const KEEP: usize = 100;
    let log: Arc<Mutex<VecDeque<Value>>> = Arc::new(Mutex::new(VecDeque::with_capacity(KEEP)));
    let record = |log: Arc<Mutex<VecDeque<Value>>>, topic: &'static str| {
        move |_ctx: Ctx, ev: Value| {
            let mut l = lock(&log);
            if l.len() == KEEP {
                l.pop_front();
            }
            l.push_back(serde_json::json!({ "topic": topic, "event": ev }));
            std::future::ready(Ok(()))
        }
    };
    let reader = log.clone();
    Gear::new("audit")
        .version(env!("CARGO_PKG_VERSION"))
        .describe("Keeps the shop's recent events")
        .listen("orders.placed", record(log.clone(), "orders.placed"))
        .listen("billing.charged", record(log, "billing.charged"))
        .port_with(
            PortSpec::new("recent").describe("The last 100 events").idempotent(true),
            move |_ctx: Ctx, _: Value| std::future::ready(Ok(lock(&reader).iter().cloned().collect::<Vec<_>>())),
        )
}
