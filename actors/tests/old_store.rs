//! A queue store written by the version before delivery outcomes were typed (the fixture in
//! `tests/fixtures/store-before-typed-outcomes/`, made by `generator.rs.txt` beside it with that
//! version's `Store`) still opens: every envelope, body and retry time loads, and each stored
//! result text becomes a typed outcome with its class, code, enhanced code and remote MTA.

use std::path::Path;

use mailroot_actors::delivery::Class;
use mailroot_actors::store::{RcptStatus, SledStore as Store};

fn open_copy() -> (tempfile::TempDir, Store) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-before-typed-outcomes");
    let dir = tempfile::tempdir().unwrap();
    for name in ["conf", "db"] {
        std::fs::copy(fixture.join(name), dir.path().join(name)).unwrap();
    }
    let store = Store::open(dir.path(), 1).unwrap();
    (dir, store)
}

#[test]
fn envelopes_from_before_typed_outcomes_load() {
    let (_dir, store) = open_copy();
    let envs = store.envelopes().unwrap();
    assert_eq!(envs.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
    let env = &envs[0];
    assert_eq!((env.sender.as_str(), env.received_at, env.delay_notified), ("alice@example.org", 1_764_000_000, true));

    // address, status, class, code, enhanced, text, remote MTA, as one line
    let want = [
        (
            "bob@far.test",
            RcptStatus::Pending,
            Some((Class::Temporary, 451, "4.2.1", "Mailbox busy, try later", Some("mx.far.test[192.0.2.7]"))),
        ),
        (
            "carol@far.test",
            RcptStatus::Failed,
            Some((Class::Permanent, 550, "5.1.1", "No such user here", Some("mx.far.test[192.0.2.7]"))),
        ),
        ("dave@localhost", RcptStatus::Delivered, Some((Class::Delivered, 250, "2.0.0", "dropped as 1.eml", None))),
        // A local error stored without a code: temporary, 451, the class's X.0.0 in reports.
        (
            "erin@slow.test",
            RcptStatus::Pending,
            Some((
                Class::Temporary,
                451,
                "4.0.0",
                "writing the Drop file: No space left on device (os error 28)",
                None,
            )),
        ),
        // An expiry, stored as "4.4.7 Message expired …" on a failed recipient.
        (
            "frank@gone.test",
            RcptStatus::Failed,
            Some((
                Class::Permanent,
                550,
                "4.4.7",
                "Message expired after 5d in the queue; last result: 451 4.4.1 No host answered",
                None,
            )),
        ),
        ("gina@new.test", RcptStatus::Pending, None),
    ];
    assert_eq!(env.recipients.len(), want.len());
    for (r, (address, status, last)) in env.recipients.iter().zip(want) {
        assert_eq!((r.address.as_str(), r.status), (address, status));
        let got = r
            .last
            .as_ref()
            .map(|o| (o.class, o.code, o.status().to_string(), o.text.as_str(), o.remote_mta.as_deref()));
        let last = last.map(|(class, code, status, text, mta)| (class, code, status.to_string(), text, mta));
        assert_eq!(got, last, "{address}");
    }
    assert_eq!(env.recipients[0].next_attempt, Some(4_000_000_000));
    assert!(envs[1].held);

    // Bodies and the retry index are untouched by the change.
    assert!(String::from_utf8(store.body(1).unwrap()).unwrap().contains("Subject: fixture 1"));
    let due: Vec<u64> = store.due_envelopes(4_000_000_000, 10, &|_| false).unwrap().iter().map(|e| e.id).collect();
    assert_eq!(due, [1]);
    assert_eq!(store.next_id().unwrap(), 3);
}

/// An old envelope written back is stored typed, and reads back the same.
#[test]
fn old_envelopes_are_written_back_typed() {
    let (_dir, store) = open_copy();
    let mut env = store.envelope(1).unwrap().unwrap();
    let before = env.clone();
    env.recipients[0].attempts += 1;
    store.update(&env, before.next_attempt).unwrap();
    let again = store.envelope(1).unwrap().unwrap();
    assert_eq!(again, env);
    assert_eq!(again.recipients[1].last, before.recipients[1].last);
}
