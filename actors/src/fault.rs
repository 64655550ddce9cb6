//! Fault injection for the supervision tests, in debug builds only: an [`InjectPanic`] makes the
//! Queue, the Listener or Pickup panic, as a bug would.

use actix::prelude::*;

use crate::listener::Listener;
use crate::pickup::Pickup;
use crate::queue::Queue;

#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectPanic;

macro_rules! panics_on_request {
    ($($actor:ty),*) => {
        $(impl Handler<InjectPanic> for $actor {
            type Result = ();

            fn handle(&mut self, _msg: InjectPanic, _ctx: &mut Self::Context) {
                panic!(concat!("fault injection: the ", stringify!($actor), " panics"));
            }
        })*
    };
}

panics_on_request!(Queue, Listener, Pickup);
