//! The Queue actor through its messages: a user-written delivery actor slots in as a route, its
//! results are recorded per recipient, and a Pickup enqueue is idempotent across a restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use mailroot_actors::delivery::{Deliver, DeliveryReport, Outcome, RecipientResult};
use mailroot_actors::local_drop::LocalDrop;
use mailroot_actors::metrics::Metrics;
use mailroot_actors::protocol::address::parse_mailbox;
use mailroot_actors::protocol::received::Origin;
use mailroot_actors::protocol::LocalDomains;
use mailroot_actors::queue::{Enqueue, Inspect, Queue, QueueSettings};
use mailroot_actors::routes::Router;
use mailroot_actors::store::{PickupMark, QueueStore, RcptStatus, SledStore};

/// A delivery actor as a user would write one: accepts `ok@`, refuses `bad@` permanently,
/// defers everyone else.
struct Scripted {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Actor for Scripted {
    type Context = Context<Self>;
}

impl Handler<Deliver> for Scripted {
    type Result = DeliveryReport;

    fn handle(&mut self, req: Deliver, _ctx: &mut Self::Context) -> DeliveryReport {
        let mut results = Vec::new();
        for r in &req.recipients {
            self.seen.lock().unwrap().push(r.address.clone());
            let outcome = if r.address.starts_with("ok@") {
                Outcome::from_reply(250, "2.0.0 taken")
            } else if r.address.starts_with("bad@") {
                Outcome::from_reply(550, "5.1.1 no such user")
            } else {
                Outcome::from_reply(451, "4.3.0 later")
            };
            results.push(RecipientResult::new(r.index, outcome));
        }
        DeliveryReport { results }
    }
}

fn enqueue(rcpts: &[&str], mark: Option<PickupMark>) -> Enqueue {
    Enqueue {
        sender: Some(parse_mailbox("s@example.test").unwrap()),
        recipients: rcpts.iter().map(|r| parse_mailbox(r).unwrap()).collect(),
        dsn: Default::default(),
        rcpt_dsn: Vec::new(),
        body: b"Subject: t\r\n\r\nx\r\n".to_vec(),
        origin: Origin::Pickup,
        origin_text: "test".into(),
        pickup: mark,
        staged: None,
        sign: true,
        auth_results: String::new(),
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Queue with a real LocalDrop for `example.test` and `remote` for every other domain.
fn queue_with(remote: Option<Recipient<Deliver>>) -> (tempfile::TempDir, std::path::PathBuf, Addr<Queue>) {
    let dir = tempfile::tempdir().unwrap();
    let (drop_dir, temp) = (dir.path().join("Drop"), dir.path().join("SortTemp"));
    std::fs::create_dir_all(&drop_dir).unwrap();
    std::fs::create_dir_all(&temp).unwrap();
    let metrics = Metrics::unregistered();
    let local = LocalDrop::new(drop_dir.clone(), temp, metrics.clone()).start();
    let router = Router::simple(LocalDomains::new(["example.test"]), local.recipient(), remote);
    let store: Arc<dyn QueueStore> = Arc::new(SledStore::open(&dir.path().join("Queue"), 1).unwrap());
    let queue = Queue::new(store, QueueSettings::default(), router, metrics).start();
    (dir, drop_dir, queue)
}

#[actix_rt::test]
async fn custom_delivery_actor_results_are_recorded_per_recipient() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let remote = Scripted { seen: seen.clone() }.start();
    let (_dir, drop_dir, queue) = queue_with(Some(remote.recipient()));

    let id = queue
        .send(enqueue(&["local@example.test", "ok@far.test", "bad@far.test", "later@far.test"], None))
        .await
        .unwrap()
        .unwrap();
    until("the local drop file", || drop_dir.join(format!("{id}.eml")).exists()).await;
    until("three remote results", || seen.lock().unwrap().len() == 3).await;
    // One Deliver carried all three remote recipients.
    assert_eq!(*seen.lock().unwrap(), vec!["ok@far.test", "bad@far.test", "later@far.test"]);
    let env = loop {
        let env = queue.send(Inspect { id }).await.unwrap().expect("still queued: one recipient is deferred");
        if env.recipients.iter().all(|r| r.attempts == 1) {
            break env;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let states: Vec<(&str, RcptStatus, String)> = env
        .recipients
        .iter()
        .map(|r| (r.address.as_str(), r.status, r.last.as_ref().map(|o| o.to_string()).unwrap_or_default()))
        .collect();
    assert_eq!(
        states,
        vec![
            ("local@example.test", RcptStatus::Delivered, format!("250 2.0.0 dropped as {id}.eml")),
            ("ok@far.test", RcptStatus::Delivered, "250 2.0.0 taken".into()),
            ("bad@far.test", RcptStatus::Failed, "550 5.1.1 no such user".into()),
            ("later@far.test", RcptStatus::Pending, "451 4.3.0 later".into()),
        ]
    );
    // The deferred recipient waits for the first retry interval (15 minutes by default).
    let next = env.recipients[3].next_attempt.expect("a retry time");
    assert_eq!(env.next_attempt, Some(next));
    let now = mailroot_actors::clock::unix_now();
    assert!((now + 14 * 60..=now + 15 * 60).contains(&next), "next {next}, now {now}");
}

#[actix_rt::test]
async fn pickup_enqueue_is_idempotent() {
    let (_dir, drop_dir, queue) = queue_with(None);
    let mark = PickupMark { name: "a.eml".into(), fingerprint: "1:2:3".into() };
    let first = queue.send(enqueue(&["x@example.test"], Some(mark.clone()))).await.unwrap().unwrap();
    let again = queue.send(enqueue(&["x@example.test"], Some(mark))).await.unwrap().unwrap();
    assert_eq!(first, again, "the same file is one message");
    until("the drop file", || drop_dir.join(format!("{first}.eml")).exists()).await;
    assert_eq!(std::fs::read_dir(&drop_dir).unwrap().count(), 1);
}

/// A buggy delivery actor: answers for the first recipient only.
struct Forgetful;

impl Actor for Forgetful {
    type Context = Context<Self>;
}

impl Handler<Deliver> for Forgetful {
    type Result = DeliveryReport;

    fn handle(&mut self, req: Deliver, _ctx: &mut Self::Context) -> DeliveryReport {
        let first = req.recipients.first().map(|r| r.index).unwrap_or(0);
        DeliveryReport { results: vec![RecipientResult::new(first, Outcome::from_reply(250, "2.0.0 ok"))] }
    }
}

#[actix_rt::test]
async fn a_recipient_left_out_of_a_report_is_retried_not_stuck() {
    let (_dir, _drop_dir, queue) = queue_with(Some(Forgetful.start().recipient()));
    let id = queue.send(enqueue(&["a@far.test", "b@far.test"], None)).await.unwrap().unwrap();
    let env = loop {
        let env = queue.send(Inspect { id }).await.unwrap().expect("still queued");
        if env.recipients.iter().all(|r| r.attempts == 1) {
            break env;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(env.recipients[0].status, RcptStatus::Delivered);
    let b = &env.recipients[1];
    assert_eq!(b.status, RcptStatus::Pending);
    let last = b.last.as_ref().expect("a result");
    assert!(last.is_temporary() && last.text.contains("no result"), "{b:?}");
    assert!(b.next_attempt.is_some(), "it has a retry time");
}

/// The Queue panics; its supervisor starts a new one from the store: nothing accepted is lost,
/// the sender of the message in hand gets a temporary failure, and the next one goes through.
#[cfg(debug_assertions)]
#[actix_rt::test]
async fn a_panicking_queue_is_restarted_from_the_store() {
    use mailroot_actors::fault::InjectPanic;
    use mailroot_actors::supervisor::{QueueFactory, QueueSupervisor};

    let dir = tempfile::tempdir().unwrap();
    let (drop_dir, temp) = (dir.path().join("Drop"), dir.path().join("SortTemp"));
    std::fs::create_dir_all(&drop_dir).unwrap();
    std::fs::create_dir_all(&temp).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let scripted = Scripted { seen: seen.clone() }.start();
    let local = LocalDrop::new(drop_dir.clone(), temp, metrics.clone()).start();
    let router = Router::simple(LocalDomains::new(["example.test"]), local.recipient(), Some(scripted.recipient()));
    let store: Arc<dyn QueueStore> = Arc::new(SledStore::open(&dir.path().join("Queue"), 1).unwrap());
    let m = metrics.clone();
    let factory: QueueFactory =
        Box::new(move || Queue::new(store.clone(), QueueSettings::default(), router.clone(), m.clone()));
    let queue = QueueSupervisor::new(factory, metrics.actor("queue")).start();

    // Deferred at the remote actor: stays queued with a retry time far away.
    let first = queue.send(enqueue(&["later@remote.test"], None)).await.unwrap().unwrap();
    until("the first attempt", || seen.lock().unwrap().len() == 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.send(Inspect { id: first }).await.unwrap().is_none_or(|e| e.recipients[0].attempts == 0) {
        assert!(Instant::now() < deadline, "the attempt is never recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    queue.send(InjectPanic).await.unwrap();
    let text = || {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &registry).unwrap();
        s
    };
    // The new Queue has the old message, and takes new ones.
    let env = queue.send(Inspect { id: first }).await.unwrap().expect("still queued");
    assert!(text().contains("mailroot_actor_restarts_total{actor=\"queue\"} 1"), "{}", text());
    assert!(text().contains("mailroot_actor_live{actor=\"queue\"} 1"), "{}", text());
    // The dead Queue's retry scheduler goes too (the new Queue started its own).
    until("one scheduler", || text().contains("mailroot_actor_live{actor=\"scheduler\"} 1")).await;
    assert_eq!(env.recipients[0].attempts, 1);
    let second = queue.send(enqueue(&["ok@example.test"], None)).await.unwrap().unwrap();
    assert!(second > first);
    until("local delivery after the restart", || drop_dir.join(format!("{second}.eml")).exists()).await;
}
