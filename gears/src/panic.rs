//! Panic isolation for ports and listeners: a panicking port fails its own call with `internal`
//! and is logged once, by the host, with the gear and port named; other calls go on.
//!
//! The hook installed by [`install_panic_hook`] stays quiet for panics raised while a port is
//! being polled (it records the message and location for the host to log) and hands every other
//! panic to the hook that was installed before it.

use std::{
    any::Any,
    cell::{Cell, RefCell},
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    sync::Once,
    task::{Context, Poll},
};

thread_local! {
    static IN_PORT: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs the process-wide panic hook that keeps port panics out of stderr (the host logs them
/// with context instead). Idempotent; chains to the previously installed hook for other panics.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_PORT.with(Cell::get) {
                let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                let msg = format!("{}{location}", payload_message(info.payload()));
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(msg));
            } else {
                previous(info);
            }
        }));
    });
}

fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs `f` as port code: a panic becomes `Err(description)`.
pub(crate) fn isolate<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let prev = IN_PORT.with(|c| c.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    IN_PORT.with(|c| c.set(prev));
    r.map_err(|payload| LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| payload_message(&*payload)))
}

pin_project_lite::pin_project! {
    /// A future whose every poll is isolated: a panic completes it with `Err(description)`.
    pub(crate) struct Isolated<F> {
        #[pin]
        inner: F,
        done: bool,
    }
}

impl<F> Isolated<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self { inner, done: false }
    }
}

impl<F: Future> Future for Isolated<F> {
    type Output = Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(Err("polled after a panic".to_owned()));
        }
        let inner = this.inner;
        match isolate(|| inner.poll(cx)) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(msg) => {
                *this.done = true;
                Poll::Ready(Err(msg))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_future_becomes_an_error_with_its_message() {
        install_panic_hook();
        let r = Isolated::new(async {
            if std::hint::black_box(true) {
                panic!("boom");
            }
            1
        })
        .await;
        let msg = r.expect_err("panicked");
        assert!(msg.starts_with("boom at "), "{msg}");
        assert_eq!(Isolated::new(async { 7 }).await, Ok(7));
    }
}
