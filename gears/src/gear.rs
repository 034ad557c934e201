//! What a gear declares: its name, version, ports and listeners, and the metadata published about
//! them. Handlers are type-erased here, once, so dispatch never sees generics.

use std::{future::Future, num::NonZeroUsize, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{Arg, BoxFuture, CallError, Ctx, Event, GearName, InvalidName, Payload, PortName, Topic, host::Run};

/// A type-erased port: converts the argument, then returns the port's future, already wrapped by
/// the host's [`Run`] (deadline, panic isolation, bookkeeping) so a call costs one allocation.
pub(crate) type ErasedPort =
    dyn Fn(Ctx, Arg<'_>, Run) -> Result<BoxFuture<'static, Result<Payload, CallError>>, CallError> + Send + Sync;

/// A type-erased listener.
pub(crate) type ErasedListener =
    dyn Fn(Ctx, &Event) -> Result<BoxFuture<'static, Result<(), CallError>>, CallError> + Send + Sync;

/// Per-port options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortOptions {
    /// The default deadline of a call to this port when the caller sets none (else the host's
    /// default applies). Always capped by the host's maximum.
    #[serde(default, with = "opt_millis", rename = "timeout_ms", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// How many calls may run at once; one more gets `overloaded` at once (no queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<NonZeroUsize>,
    /// Whether running the port twice has the same effect as once (allows retries).
    #[serde(default)]
    pub idempotent: bool,
}

mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// The declaration of one port: its name, documentation and options.
#[derive(Debug, Clone)]
pub struct PortSpec {
    name: String,
    description: Option<String>,
    input_schema: Option<serde_json::Value>,
    output_schema: Option<serde_json::Value>,
    options: PortOptions,
}

impl PortSpec {
    /// A port with default options.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: None,
            input_schema: None,
            output_schema: None,
            options: PortOptions::default(),
        }
    }

    /// A one-line description, shown in `/v1/gears` and the dashboard.
    #[must_use]
    pub fn describe(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// A JSON Schema of the input.
    #[must_use]
    pub fn input_schema(mut self, schema: serde_json::Value) -> Self {
        self.input_schema = Some(schema);
        self
    }

    /// A JSON Schema of the output.
    #[must_use]
    pub fn output_schema(mut self, schema: serde_json::Value) -> Self {
        self.output_schema = Some(schema);
        self
    }

    /// The default deadline of calls that set none.
    #[must_use]
    pub fn timeout(mut self, t: Duration) -> Self {
        self.options.timeout = Some(t);
        self
    }

    /// The most calls that may run at once.
    #[must_use]
    pub fn max_concurrency(mut self, n: NonZeroUsize) -> Self {
        self.options.max_concurrency = Some(n);
        self
    }

    /// Marks the port idempotent (safe to retry).
    #[must_use]
    pub fn idempotent(mut self, yes: bool) -> Self {
        self.options.idempotent = yes;
        self
    }
}

/// Published metadata of one port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortMeta {
    /// The port's name.
    pub name: PortName,
    /// A one-line description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema of the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<serde_json::Value>,
    /// A JSON Schema of the output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<serde_json::Value>,
    /// The port's options.
    #[serde(flatten)]
    pub options: PortOptions,
}

/// Published metadata of one event subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerMeta {
    /// The topic listened to.
    pub topic: Topic,
}

/// Published metadata of a gear: what `/v1/gears` lists and the mesh advertises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GearMeta {
    /// The gear's name.
    pub name: GearName,
    /// Its semantic version.
    pub version: semver::Version,
    /// A one-line description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its ports, in declaration order.
    pub ports: Vec<PortMeta>,
    /// The topics it listens to.
    pub listens: Vec<ListenerMeta>,
}

/// A gear definition was invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GearError {
    /// A gear, port or topic name was invalid.
    #[error(transparent)]
    Name(#[from] InvalidName),
    /// The version is not semantic versioning.
    #[error("gear {gear}: invalid version {version:?}: {reason}")]
    Version {
        /// The gear.
        gear: String,
        /// The rejected version.
        version: String,
        /// The parser's complaint.
        reason: String,
    },
    /// Two ports share a name.
    #[error("gear {gear}: port {port} is declared twice")]
    DuplicatePort {
        /// The gear.
        gear: String,
        /// The port.
        port: String,
    },
    /// A gear of the same name is already hosted.
    #[error("gear {0} is already hosted here")]
    DuplicateGear(String),
    /// The gear listens to topics but no tokio runtime was running to host its listeners.
    #[error("gear {0} has listeners, which need a tokio runtime to be hosted")]
    NoRuntime(String),
}

pub(crate) struct PortDef {
    pub(crate) meta: PortMeta,
    pub(crate) handler: Arc<ErasedPort>,
}

pub(crate) struct ListenerDef {
    pub(crate) topic: Topic,
    pub(crate) handler: Arc<ErasedListener>,
}

/// A validated gear, ready to host.
pub(crate) struct GearParts {
    pub(crate) meta: GearMeta,
    pub(crate) ports: Vec<PortDef>,
    pub(crate) listeners: Vec<ListenerDef>,
}

/// A gear: a named service with ports and event listeners. Built with chained calls, validated
/// when it is hosted.
pub struct Gear {
    name: String,
    version: String,
    description: Option<String>,
    ports: Vec<(PortSpec, Arc<ErasedPort>)>,
    listeners: Vec<(String, Arc<ErasedListener>)>,
}

impl std::fmt::Debug for Gear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gear")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("ports", &self.ports.iter().map(|(s, _)| &s.name).collect::<Vec<_>>())
            .field("listens", &self.listeners.iter().map(|(t, _)| t).collect::<Vec<_>>())
            .finish()
    }
}

impl Gear {
    /// A new gear with version `0.1.0` and no ports.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: "0.1.0".to_owned(),
            description: None,
            ports: Vec::new(),
            listeners: Vec::new(),
        }
    }

    /// The gear's name as given (validated when hosted).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the semantic version.
    #[must_use]
    pub fn version(mut self, v: impl Into<String>) -> Self {
        self.version = v.into();
        self
    }

    /// Sets a one-line description.
    #[must_use]
    pub fn describe(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// Adds a typed port with default options.
    ///
    /// `Req` is decoded from JSON when the caller is not typed Rust (or uses another type); when
    /// the caller lends a `Req`, the port receives a clone of it and nothing is serialized.
    /// `Req` or `Resp` may be `serde_json::Value` (raw JSON) or `bytes::Bytes` (raw bytes).
    #[must_use]
    pub fn port<Req, Resp, F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        Req: DeserializeOwned + Clone + Send + 'static,
        Resp: serde::Serialize + Send + Sync + 'static,
        F: Fn(Ctx, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, CallError>> + Send + 'static,
    {
        self.port_with(PortSpec::new(name), f)
    }

    /// Adds a typed port with a full [`PortSpec`] (description, schemas, timeout, concurrency).
    #[must_use]
    pub fn port_with<Req, Resp, F, Fut>(mut self, spec: PortSpec, f: F) -> Self
    where
        Req: DeserializeOwned + Clone + Send + 'static,
        Resp: serde::Serialize + Send + Sync + 'static,
        F: Fn(Ctx, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, CallError>> + Send + 'static,
    {
        let handler: Arc<ErasedPort> = Arc::new(move |ctx: Ctx, arg: Arg<'_>, run: Run| {
            let req = arg.take::<Req>()?;
            let fut = f(ctx, req);
            Ok(Box::pin(run.drive(async move { fut.await.map(Payload::typed) })) as BoxFuture<'static, _>)
        });
        self.ports.push((spec, handler));
        self
    }

    /// Adds a port whose handler works on [`Arg`] and [`Payload`] directly (for adapters such as
    /// external gears, which forward values without decoding them).
    #[must_use]
    pub fn port_raw<F>(mut self, spec: PortSpec, f: F) -> Self
    where
        F: Fn(Ctx, Arg<'_>) -> Result<BoxFuture<'static, Result<Payload, CallError>>, CallError>
            + Send
            + Sync
            + 'static,
    {
        let handler: Arc<ErasedPort> = Arc::new(move |ctx: Ctx, arg: Arg<'_>, run: Run| {
            let fut = f(ctx, arg)?;
            Ok(Box::pin(run.drive(fut)) as BoxFuture<'static, _>)
        });
        self.ports.push((spec, handler));
        self
    }

    /// Subscribes to a topic. Each listener has its own bounded queue and handles its events one
    /// at a time, in order (see [`crate::host`] for what happens when the queue is full).
    #[must_use]
    pub fn listen<Ev, F, Fut>(mut self, topic: impl Into<String>, f: F) -> Self
    where
        Ev: DeserializeOwned + Clone + Send + 'static,
        F: Fn(Ctx, Ev) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CallError>> + Send + 'static,
    {
        let handler: Arc<ErasedListener> = Arc::new(move |ctx: Ctx, ev: &Event| {
            let ev = ev.as_arg().take::<Ev>()?;
            Ok(Box::pin(f(ctx, ev)) as BoxFuture<'static, _>)
        });
        self.listeners.push((topic.into(), handler));
        self
    }

    /// Validates names and version and produces the metadata.
    pub(crate) fn into_parts(self) -> Result<GearParts, GearError> {
        let version = self.validate()?;
        let name = GearName::new(&self.name)?;
        let mut ports: Vec<PortDef> = Vec::with_capacity(self.ports.len());
        for (spec, handler) in self.ports {
            let meta = PortMeta {
                name: PortName::new(&spec.name)?,
                description: spec.description,
                input_schema: spec.input_schema,
                output_schema: spec.output_schema,
                options: spec.options,
            };
            ports.push(PortDef { meta, handler });
        }
        let mut listeners = Vec::with_capacity(self.listeners.len());
        for (topic, handler) in self.listeners {
            listeners.push(ListenerDef { topic: Topic::new(&topic)?, handler });
        }
        let meta = GearMeta {
            name,
            version,
            description: self.description,
            ports: ports.iter().map(|p| p.meta.clone()).collect(),
            listens: listeners.iter().map(|l| ListenerMeta { topic: l.topic.clone() }).collect(),
        };
        Ok(GearParts { meta, ports, listeners })
    }

    /// Checks the definition without hosting it.
    ///
    /// # Errors
    /// The first invalid name, version or duplicate port.
    pub fn validate(&self) -> Result<semver::Version, GearError> {
        GearName::new(&self.name)?;
        let version = semver::Version::parse(&self.version).map_err(|e| GearError::Version {
            gear: self.name.clone(),
            version: self.version.clone(),
            reason: e.to_string(),
        })?;
        for (i, (spec, _)) in self.ports.iter().enumerate() {
            PortName::new(&spec.name)?;
            if self.ports[..i].iter().any(|(s, _)| s.name == spec.name) {
                return Err(GearError::DuplicatePort { gear: self.name.clone(), port: spec.name.clone() });
            }
        }
        for (topic, _) in &self.listeners {
            Topic::new(topic)?;
        }
        Ok(version)
    }
}
