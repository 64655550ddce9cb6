//! Supervision: a [`DeliverySupervisor`] stands at a stable address in front of one route's
//! actor (built in or user-written), forwards each [`Deliver`] to it, and when the actor dies (a
//! panic in a handler ends its mailbox) starts a fresh one on a fresh arbiter. A
//! [`QueueSupervisor`] does the same for the Queue, for every message the Queue takes.
//!
//! Invariants:
//! - A `Deliver` always gets a report: when the actor died with the request, every recipient in it
//!   is a temporary failure, so the queue retries it on its schedule. Nothing is lost.
//! - One death causes one restart, however many requests were in flight with it (generations).
//! - The per-actor metrics of the route (`handled`, `handling_seconds`, `in_flight`, `live`,
//!   `restarts`) are kept here, so every delivery actor is measured alike, custom ones included.

use std::sync::Arc;

use actix::prelude::*;
use actix_rt::{Arbiter, ArbiterHandle};
use tracing::{error, warn};

use crate::delivery::{replies, Deliver, DeliveryReport};
use crate::metrics::ActorMeter;
use crate::queue::{self, Queue};
use crate::queue::{RetryBatch, RetryDue};
use crate::store::Envelope;

/// Starts one instance of a delivery actor on the given arbiter.
pub type ChildFactory = Arc<dyn Fn(&ArbiterHandle) -> Result<Recipient<Deliver>, String> + Send + Sync>;

/// A [`ChildFactory`] from a function that builds the actor; it is called again at each restart,
/// so every restart begins from a freshly built actor.
pub fn factory<A, F>(build: F) -> ChildFactory
where
    A: Actor<Context = Context<A>> + Handler<Deliver> + Send,
    F: Fn() -> Result<A, String> + Send + Sync + 'static,
{
    Arc::new(move |arbiter: &ArbiterHandle| {
        let actor = build()?;
        Ok(A::start_in_arbiter(arbiter, move |_| actor).recipient())
    })
}

pub struct DeliverySupervisor {
    name: String,
    factory: ChildFactory,
    child: Option<Recipient<Deliver>>,
    /// The arbiter (thread) the child runs on: each child gets its own, so a panic that takes a
    /// thread down takes nothing else with it.
    arbiter: Option<Arbiter>,
    /// Bumped at each restart: requests that failed with an older child do not restart again.
    generation: u64,
    meter: ActorMeter,
}

impl DeliverySupervisor {
    /// `name` is the route's name, used in logs and as the metrics label.
    pub fn new(name: &str, factory: ChildFactory, meter: ActorMeter) -> Self {
        DeliverySupervisor { name: name.to_string(), factory, child: None, arbiter: None, generation: 0, meter }
    }

    fn start_child(&mut self) {
        if let Some(old) = self.arbiter.take() {
            old.stop();
        }
        let arbiter = Arbiter::new();
        match (self.factory)(&arbiter.handle()) {
            Ok(child) => {
                self.child = Some(child);
                self.meter.started();
            }
            Err(e) => {
                error!(route = %self.name, error = %e, "cannot start the delivery actor; will try again at the next message");
                self.child = None;
            }
        }
        self.arbiter = Some(arbiter);
    }

    fn restart(&mut self, why: &str) {
        if self.child.take().is_some() {
            self.meter.stopped();
        }
        self.generation += 1;
        self.meter.restarted();
        warn!(route = %self.name, why, "delivery actor died; restarting it");
        self.start_child();
    }
}

impl Actor for DeliverySupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The queue bounds what it sends (`max_in_flight`); this only caps a burst.
        ctx.set_mailbox_capacity(1024);
        self.start_child();
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if self.child.take().is_some() {
            self.meter.stopped();
        }
        if let Some(a) = self.arbiter.take() {
            a.stop();
        }
    }
}

impl Handler<Deliver> for DeliverySupervisor {
    type Result = ResponseActFuture<Self, DeliveryReport>;

    fn handle(&mut self, req: Deliver, _ctx: &mut Self::Context) -> Self::Result {
        let handling = self.meter.handling();
        if self.child.as_ref().is_none_or(|c| !c.connected()) {
            // Died between requests, or never started.
            if self.child.is_some() {
                self.restart("its mailbox closed");
            } else {
                self.start_child();
            }
        }
        let indices = req.indices();
        let Some(child) = self.child.clone() else {
            let outcome = replies::actor_not_running(&self.name);
            return Box::pin(actix::fut::ready(DeliveryReport::all(indices, outcome)));
        };
        let generation = self.generation;
        Box::pin(async move { child.send(req).await }.into_actor(self).map(move |res, act, _ctx| {
            drop(handling);
            match res {
                Ok(report) => report,
                Err(e) => {
                    if act.generation == generation {
                        act.restart("it failed while delivering (panic?)");
                    }
                    DeliveryReport::all(indices, replies::actor_failed(&act.name, e))
                }
            }
        }))
    }
}

/// A message the Queue takes, and the answer its sender gets when the Queue died with it.
pub trait Fallback: Message {
    fn fallback() -> Self::Result;
}

macro_rules! fallback {
    ($($m:ty => $e:expr),* $(,)?) => {
        $(impl Fallback for $m {
            fn fallback() -> Self::Result {
                $e
            }
        })*
    };
}

fn unavailable() -> queue::AdminError {
    queue::AdminError::Internal("the queue restarted after a failure; try again".into())
}

fallback! {
    queue::Enqueue => Err(crate::protocol::EnqueueError::Temporary),
    queue::PickupDone => (),
    queue::Inspect => None::<Envelope>,
    queue::Flush => Err("the queue restarted after a failure".into()),
    queue::SetRouter => (),
    queue::SetSigner => (),
    queue::List => Err(unavailable()),
    queue::Show => Err(unavailable()),
    queue::Headers => Err(unavailable()),
    queue::RetryNow => Err(unavailable()),
    queue::RetryAll => Err(unavailable()),
    queue::Hold => Err(unavailable()),
    queue::Release => Err(unavailable()),
    queue::Bounce => Err(unavailable()),
    queue::Delete => Err(unavailable()),
    queue::Summary => queue::QueueSummary::default(),
    queue::Drain => 0,
    RetryDue => RetryBatch { more: true },
}

#[cfg(debug_assertions)]
fallback! { crate::fault::InjectPanic => () }

/// Builds the Queue, at start and at each restart (it reopens nothing: the store is shared).
pub type QueueFactory = Box<dyn Fn() -> Queue + Send>;

/// The Queue's supervisor: everyone talks to this address; the Queue behind it is replaced by a
/// fresh one, on a fresh arbiter, when it dies. A new Queue reads the store as at start, so
/// messages whose delivery was in flight are delivered again (at least once, never lost).
pub struct QueueSupervisor {
    factory: QueueFactory,
    child: Option<Addr<Queue>>,
    arbiter: Option<Arbiter>,
    generation: u64,
    meter: ActorMeter,
}

impl QueueSupervisor {
    /// `meter` counts the Queue's restarts (the Queue keeps its own `queue` meter).
    pub fn new(factory: QueueFactory, meter: ActorMeter) -> Self {
        QueueSupervisor { factory, child: None, arbiter: None, generation: 0, meter }
    }

    fn start_child(&mut self) -> Addr<Queue> {
        if let Some(old) = self.arbiter.take() {
            old.stop();
        }
        let arbiter = Arbiter::new();
        let queue = (self.factory)();
        let child = Queue::start_in_arbiter(&arbiter.handle(), move |_| queue);
        self.child = Some(child.clone());
        self.arbiter = Some(arbiter);
        child
    }

    fn restart(&mut self) -> Addr<Queue> {
        self.generation += 1;
        self.meter.restarted();
        error!("the queue died (a panic?); starting a new one from the store");
        self.start_child()
    }

    /// The current Queue, restarted first if it died since the last message.
    fn child(&mut self) -> Addr<Queue> {
        match &self.child {
            Some(c) if c.connected() => c.clone(),
            Some(_) => self.restart(),
            None => self.start_child(),
        }
    }
}

impl Actor for QueueSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Like the Queue's own: writers wait here rather than pile up. What is forwarded stays
        // bounded too: every sender waits for its answer (a session one Enqueue at a time,
        // Pickup at most its `max_concurrent`).
        ctx.set_mailbox_capacity(1024);
        self.start_child();
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(a) = self.arbiter.take() {
            a.stop();
        }
    }
}

impl<M> Handler<M> for QueueSupervisor
where
    M: Fallback + Send + 'static,
    M::Result: Send + 'static,
    Queue: Handler<M>,
{
    type Result = ResponseActFuture<Self, M::Result>;

    fn handle(&mut self, msg: M, _ctx: &mut Self::Context) -> Self::Result {
        // Every message to the Queue passes here, so the `queue` actor metrics are kept here
        // (only `RetryDue`, from the Queue's own scheduler, is measured by the Queue).
        let handling = self.meter.handling();
        let child = self.child();
        let generation = self.generation;
        Box::pin(async move { child.send(msg).await }.into_actor(self).map(move |res, act, _ctx| {
            drop(handling);
            match res {
                Ok(r) => r,
                Err(_) => {
                    if act.generation == generation {
                        act.restart();
                    }
                    M::fallback()
                }
            }
        }))
    }
}
