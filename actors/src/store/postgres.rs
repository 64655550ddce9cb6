//! The queue store on PostgreSQL: several mailroot nodes share one queue. Envelopes, bodies (in
//! `bytea` chunks), the retry time of each message, message IDs (a sequence) and Pickup marks
//! live in one schema that mailroot creates and migrates itself.
//!
//! Invariants:
//! - Writes are buffered in memory in the order they are made and sent at the next
//!   [`QueueStore::commit`] as one transaction: the `250` for a message comes after that
//!   transaction's COMMIT (durable as the server's `synchronous_commit` makes it).
//! - A failed commit makes the store refuse every later commit until [`QueueStore::recover`]
//!   (as sled keeps a write error until it is reopened): a writer whose write was in the failed
//!   transaction can never be told by a later, empty commit that it is durable.
//! - A message is worked on by one node at a time: the node that inserts it or claims it
//!   (`claim_due`, `SELECT … FOR UPDATE SKIP LOCKED`) holds a lease (node name, expiry in the
//!   database's clock) that it renews while it works; a node that dies stops renewing, and once
//!   the lease has expired another node claims the message. Delivery is at least once.
//! - Message IDs come from one sequence, taken in blocks of [`ID_BLOCK`]: unique across nodes,
//!   never reused. A node keeps a block or two in hand so that taking an ID never waits.
//! - Reads first commit what this node has written (a node reads its own writes, as on sled);
//!   what nobody waits for is committed within [`FLUSH_EVERY`] anyway.
//! - All database work runs on the store's own thread and runtime, never on an actor's: a slow
//!   or absent database delays answers, it does not stop the Queue from answering.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::runtime::Handle;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use super::{
    remove_spool_file, Claim, Counts, Envelope, PickupMark, QueueId, QueueStore, Result, Spool, StagedBody, Startup,
    StoreError, StoreFuture,
};

/// IDs taken from the sequence at once (its increment).
pub const ID_BLOCK: i64 = 256;
/// Bodies are stored in chunks of this size: few rows per message, each well within `bytea`.
const PG_CHUNK: usize = 1024 * 1024;

/// The schema's versions, in order: each is applied once, in one transaction, under an advisory
/// lock (two nodes starting together do not both apply it).
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE SEQUENCE message_ids INCREMENT BY 256 MINVALUE 1 START WITH 1;
     CREATE TABLE messages (
         id bigint PRIMARY KEY,
         envelope text NOT NULL,
         -- Unix seconds the message is due (0: now); NULL while held.
         due_at bigint,
         held boolean NOT NULL DEFAULT false,
         lease_node text,
         -- Unix seconds, in the database's clock.
         lease_until bigint
     );
     CREATE INDEX messages_due ON messages (due_at) WHERE due_at IS NOT NULL;
     CREATE INDEX messages_held ON messages (id) WHERE held;
     CREATE INDEX messages_leased ON messages (lease_node) WHERE lease_node IS NOT NULL;
     CREATE TABLE bodies (
         id bigint NOT NULL,
         chunk integer NOT NULL,
         data bytea NOT NULL,
         PRIMARY KEY (id, chunk)
     );
     CREATE TABLE pickup_marks (
         node text NOT NULL,
         name text NOT NULL,
         id bigint NOT NULL,
         fingerprint text NOT NULL,
         PRIMARY KEY (node, name)
     );
     CREATE TABLE nodes (
         name text PRIMARY KEY,
         seen_at bigint NOT NULL
     );",
)];

/// How often writes left in memory (delivery results, which nobody waits for) are committed.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// The database's clock in Unix seconds (leases are in it, so nodes' clocks need not agree).
const DB_NOW: &str = "(extract(epoch from clock_timestamp()))::bigint";

/// How to reach the database, and this node's part in it.
#[derive(Clone)]
pub struct PgSettings {
    /// `postgres://user@host:port/database` (libpq's URL or key=value form).
    pub url: String,
    /// The password, when not in the URL (from a file or the environment).
    pub password: Option<String>,
    /// The schema mailroot's tables live in (created if missing).
    pub schema: String,
    /// This node's name, on its leases and Pickup marks: unique among the nodes.
    pub node: String,
    /// Connections at most.
    pub pool_size: usize,
    /// How long a claimed message stays this node's without a renewal.
    pub lease: Duration,
    /// How often the retry scheduler looks for work other nodes left (and expired leases).
    pub poll_every: Duration,
    /// Connecting, and waiting for a free connection, at most this long.
    pub connect_timeout: Duration,
    /// Any statement, at most this long (a large body's insert included).
    pub statement_timeout: Duration,
    /// TLS to the database.
    pub tls: PgTls,
    /// The CA certificates (PEM) that `PgTls::Verify` trusts; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// TLS to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgTls {
    /// None to a database on this machine (loopback, a Unix socket), `Verify` to any other.
    Auto,
    Off,
    /// Encrypted, certificate not checked (libpq's `sslmode=require`).
    Require,
    /// Encrypted, chain and name checked (libpq's `sslmode=verify-full`).
    Verify,
}

impl PgTls {
    pub fn parse(s: &str) -> std::result::Result<PgTls, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(PgTls::Auto),
            "off" => Ok(PgTls::Off),
            "require" => Ok(PgTls::Require),
            "verify" => Ok(PgTls::Verify),
            other => Err(format!("{other:?} is not auto, off, require or verify")),
        }
    }
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .field("schema", &self.schema)
            .field("node", &self.node)
            .field("pool_size", &self.pool_size)
            .field("lease", &self.lease)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Whether `url` is a connection string the client understands.
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    url.parse::<tokio_postgres::Config>().map(|_| ()).map_err(|e| e.to_string())
}

impl Default for PgSettings {
    fn default() -> Self {
        PgSettings {
            url: "postgres://localhost/mailroot".into(),
            password: None,
            schema: "mailroot".into(),
            node: "node1".into(),
            pool_size: 8,
            lease: Duration::from_secs(60),
            poll_every: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(60),
            tls: PgTls::Auto,
            ca_file: None,
        }
    }
}

/// A schema name mailroot can put in SQL as it is.
pub fn valid_schema(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A write waiting for the next commit.
enum Op {
    Insert {
        id: i64,
        envelope: String,
        due_at: Option<i64>,
        held: bool,
        body: Body,
        mark: Option<PickupMark>,
    },
    /// `release`: the lease goes with it (the Queue is done with the message for now).
    Update {
        id: i64,
        envelope: String,
        due_at: Option<i64>,
        held: bool,
        release: bool,
    },
    Remove {
        id: i64,
    },
    Release {
        id: i64,
    },
    ForgetPickup {
        name: String,
    },
}

enum Body {
    /// Shared with the Queue (no copy of the body is made for the commit).
    Memory(Arc<Vec<u8>>),
    /// Our trace header, then the spool file's bytes (read at commit, removed after it).
    Staged { header: Vec<u8>, path: PathBuf, bytes: u64 },
}

fn db(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::DISK_FULL) {
        StoreError::DatabaseFull(e.to_string())
    } else {
        StoreError::Database(match e.as_db_error() {
            Some(d) => format!("{}: {}", d.code().code(), d.message()),
            // The client's own errors keep their cause apart (a TLS handshake's reason, an
            // I/O error): say it.
            None => match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            },
        })
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        other => StoreError::Database(format!("no connection to the queue database: {other}")),
    }
}

fn due_at(env: &Envelope) -> Option<i64> {
    if env.held || env.is_finished() {
        None
    } else {
        Some(env.next_attempt.unwrap_or(0).min(i64::MAX as u64) as i64)
    }
}

fn to_json(env: &Envelope) -> Result<String> {
    serde_json::to_string(env).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json(id: i64, text: &str) -> Result<Envelope> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("envelope {id}: {e}")))
}

/// What the store shares with the tasks on its runtime.
struct Inner {
    pool: Pool,
    node: String,
    lease_secs: i64,
    /// Writes since the last commit started, in order.
    pending: Mutex<Vec<Op>>,
    /// Set by a failed commit, cleared by `recover` (see the invariants).
    failed: Mutex<Option<String>>,
    /// One transaction of writes at a time, in the order they were taken.
    committing: tokio::sync::Mutex<()>,
    /// Blocks of IDs in hand: `(next, end)`.
    ids: Mutex<VecDeque<(i64, i64)>>,
    refilling: AtomicBool,
    /// Messages claimed whose expired lease was another node's (see `QueueStore::taken_over`).
    taken_over: std::sync::atomic::AtomicU64,
}

/// The PostgreSQL store (see the module's documentation).
pub struct PgStore {
    inner: Arc<Inner>,
    rt: Handle,
    /// Ends the store's runtime thread when the store goes.
    _stop: tokio::sync::oneshot::Sender<()>,
    dir: PathBuf,
    spool: Spool,
    poll_every: Duration,
    lease: Duration,
}

impl PgStore {
    /// Connects, creates or migrates the schema, and takes a first block of IDs (above
    /// `id_floor`). `dir` is the local folder for the spool of large bodies being received.
    /// Blocks the calling thread (the daemon's start) until done or `connect_timeout` × a few.
    pub fn open(settings: &PgSettings, dir: &Path, id_floor: QueueId) -> Result<PgStore> {
        if !valid_schema(&settings.schema) {
            return Err(StoreError::Database(format!(
                "schema {:?}: lower-case letters, digits and _ only, at most 63",
                settings.schema
            )));
        }
        let mut config: tokio_postgres::Config =
            settings.url.parse().map_err(|e| StoreError::Database(format!("queue.postgres.url: {e}")))?;
        if let Some(p) = &settings.password {
            config.password(p);
        }
        config
            .connect_timeout(settings.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .application_name("mailroot")
            .options(format!(
                "-c search_path={} -c statement_timeout={}",
                settings.schema,
                settings.statement_timeout.as_millis()
            ));
        let local = config.get_hosts().iter().all(|h| match h {
            tokio_postgres::config::Host::Unix(_) => true,
            tokio_postgres::config::Host::Tcp(name) => {
                name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
        });
        let tls = match settings.tls {
            PgTls::Auto if local => PgTls::Off,
            PgTls::Auto => PgTls::Verify,
            chosen => chosen,
        };
        let manager_config = || ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match tls {
            PgTls::Off | PgTls::Auto => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                Manager::from_config(config, NoTls, manager_config())
            }
            PgTls::Require | PgTls::Verify => {
                // Never falls back to clear text.
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let configs =
                    crate::remote::tls::TlsConfigs::new(settings.ca_file.as_deref()).map_err(StoreError::Database)?;
                let client = if tls == PgTls::Verify {
                    configs.verified.map_err(|e| StoreError::Database(format!("TLS to the database: {e}")))?
                } else {
                    configs.any
                };
                Manager::from_config(config, super::pg_tls::MakeRustls(client), manager_config())
            }
        };
        let (rt, stop) = runtime_thread()?;
        let pool = {
            let _entered = rt.enter();
            Pool::builder(manager)
                .max_size(settings.pool_size.max(2))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(settings.connect_timeout))
                .create_timeout(Some(settings.connect_timeout))
                .recycle_timeout(Some(settings.connect_timeout))
                .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
                    Box::pin(async move {
                        // A prepared statement's generic plan is made from the table's statistics
                        // of that moment — often an empty queue, where a sequential scan is
                        // cheapest — and kept until the table is analysed again. Without
                        // autovacuum that is never: a queue grown to 100,000 deferred messages
                        // then had every delivery result's update scan the whole table. On such
                        // a server each statement is planned when run (measured: ~9% of the
                        // relay benchmark's speed, so not where autovacuum does the work).
                        let on: String = client
                            .query_one("SHOW autovacuum", &[])
                            .await
                            .map_err(deadpool_postgres::HookError::Backend)?
                            .get(0);
                        if on != "on" {
                            client
                                .batch_execute("SET plan_cache_mode = force_custom_plan")
                                .await
                                .map_err(deadpool_postgres::HookError::Backend)?;
                        }
                        Ok(())
                    })
                }))
                .build()
                .map_err(|e| StoreError::Database(e.to_string()))?
        };
        let inner = Arc::new(Inner {
            pool,
            node: settings.node.clone(),
            lease_secs: settings.lease.as_secs().max(1) as i64,
            pending: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            committing: tokio::sync::Mutex::new(()),
            ids: Mutex::new(VecDeque::new()),
            refilling: AtomicBool::new(false),
            taken_over: std::sync::atomic::AtomicU64::new(0),
        });
        std::fs::create_dir_all(dir)?;
        let spool = Spool::new(dir.join("spool"))?;
        // Bodies are in the database once committed: any file here is of a message never queued.
        spool.sweep(|_| false)?;
        let store = PgStore {
            inner: inner.clone(),
            rt: rt.clone(),
            _stop: stop,
            dir: dir.to_path_buf(),
            spool,
            poll_every: settings.poll_every,
            lease: settings.lease,
        };
        // Writes nobody waits for (delivery results, releases) reach the database within
        // FLUSH_EVERY, as sled flushes its log twice a second.
        let weak = Arc::downgrade(&inner);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(FLUSH_EVERY).await;
                let Some(inner) = weak.upgrade() else { return };
                if lock(&inner.pending).is_empty() || lock(&inner.failed).is_some() {
                    continue;
                }
                if let Err(e) = inner.commit().await {
                    tracing::error!(error = %e, "cannot commit to the queue database");
                }
            }
        });
        let schema = settings.schema.clone();
        let floor = id_floor.min(i64::MAX as u64) as i64;
        store.block_on(settings.connect_timeout * 6, async move {
            inner.migrate(&schema).await?;
            inner.seen().await?;
            inner.forget_predecessor().await?;
            let block = inner.take_block(floor).await?;
            lock(&inner.ids).push_back(block);
            Ok(())
        })?;
        Ok(store)
    }

    /// Runs `fut` on the store's runtime and waits for it here (never from that runtime).
    fn block_on<T: Send + 'static>(
        &self,
        wait: Duration,
        fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(wait)
            .unwrap_or_else(|_| Err(StoreError::Database(format!("no answer from the queue database in {wait:?}"))))
    }

    /// Runs `fut` on the store's runtime; the answer can be awaited anywhere.
    fn spawn<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> StoreFuture<T> {
        let task = self.rt.spawn(fut);
        Box::pin(async move { task.await.unwrap_or_else(|e| Err(StoreError::Database(format!("store task: {e}")))) })
    }

    fn push(&self, op: Op) {
        lock(&self.inner.pending).push(op);
    }

    /// Starts taking another block of IDs when fewer than one block is left in hand.
    fn refill_ids(&self) {
        let left: i64 = lock(&self.inner.ids).iter().map(|(n, e)| e - n).sum();
        if left >= ID_BLOCK || self.inner.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            match inner.take_block(0).await {
                Ok(block) => lock(&inner.ids).push_back(block),
                Err(e) => tracing::warn!(error = %e, "cannot take message IDs from the queue database"),
            }
            inner.refilling.store(false, Ordering::SeqCst);
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A thread running a current-thread runtime until the sender is dropped.
fn runtime_thread() -> Result<(Handle, tokio::sync::oneshot::Sender<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new().name("mailroot-pg".into()).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => {
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stopped.await;
                });
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    })?;
    Ok((rx.recv().map_err(|e| StoreError::Database(e.to_string()))??, stop))
}

impl Inner {
    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_error)
    }

    /// A connection for a read that must see this node's own writes: they are committed first.
    async fn reader(&self) -> Result<deadpool_postgres::Object> {
        self.commit().await?;
        self.client().await
    }

    /// Creates the schema or brings it to the newest version this build knows.
    async fn migrate(&self, schema: &str) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        // The lock's key: the schema's name, so nodes on other schemas do not wait for us.
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&schema]).await.map_err(db)?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.schema_version (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(db)?;
        let current: i32 = tx
            .query_one(&format!("SELECT coalesce(max(version), 0) FROM {schema}.schema_version"), &[])
            .await
            .map_err(db)?
            .get(0);
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > newest {
            return Err(StoreError::Database(format!(
                "the queue database's schema is version {current}, newer than this mailroot knows ({newest}): upgrade mailroot"
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql).await.map_err(db)?;
            tx.execute(&format!("INSERT INTO {schema}.schema_version (version) VALUES ($1)"), &[version])
                .await
                .map_err(db)?;
            tracing::info!(version, schema, "queue database schema migrated");
        }
        tx.commit().await.map_err(db)?;
        // Every delivery result rewrites a row: without autovacuum the tables only grow, and the
        // planner never learns how large they are.
        let autovacuum: String = c.query_one("SHOW autovacuum", &[]).await.map_err(db)?.get(0);
        if autovacuum != "on" {
            tracing::warn!(
                schema,
                "autovacuum is off on the queue's PostgreSQL server: its tables will bloat and every \
                 statement is planned anew (slower); turn it on, or VACUUM ANALYZE the schema's tables regularly"
            );
        }
        Ok(())
    }

    /// Records that this node is alive (and proves that the database takes writes).
    async fn seen(&self) -> Result<()> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "INSERT INTO nodes (name, seen_at) VALUES ($1, {DB_NOW})
                 ON CONFLICT (name) DO UPDATE SET seen_at = EXCLUDED.seen_at"
            ))
            .await
            .map_err(db)?;
        c.execute(&st, &[&self.node]).await.map_err(db)?;
        Ok(())
    }

    /// Leases under this node's name are a dead predecessor's (a name is one running node's):
    /// what it was working on is free again at once, not after its leases expire.
    async fn forget_predecessor(&self) -> Result<()> {
        let c = self.client().await?;
        let freed = c
            .execute("UPDATE messages SET lease_node = NULL, lease_until = NULL WHERE lease_node = $1", &[&self.node])
            .await
            .map_err(db)?;
        if freed > 0 {
            tracing::warn!(
                messages = freed,
                node = %self.node,
                "messages this node was working on when it last stopped are queued again (delivery is at least once)"
            );
        }
        Ok(())
    }

    /// A block of IDs from the sequence, all at least `floor`.
    async fn take_block(&self, floor: i64) -> Result<(i64, i64)> {
        let c = self.client().await?;
        let mut start: i64 = c.query_one("SELECT nextval('message_ids')", &[]).await.map_err(db)?.get(0);
        if start < floor {
            // The Drop folder holds higher IDs (its queue was wiped, or it came from sled).
            c.execute("SELECT setval('message_ids', $1, false)", &[&floor]).await.map_err(db)?;
            start = c.query_one("SELECT nextval('message_ids')", &[]).await.map_err(db)?.get(0);
        }
        Ok((start, start + ID_BLOCK))
    }

    /// Sends `ops` in one transaction, in their order. Consecutive writes of one kind (the
    /// inserts of a batch of new messages, the results of a batch of deliveries) go as one
    /// statement each over arrays (`unnest`): a batch costs a few statements, not a few per
    /// message.
    async fn apply(&self, ops: &[Op]) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let mut i = 0;
        while i < ops.len() {
            let kind = std::mem::discriminant(&ops[i]);
            let staged = matches!(&ops[i], Op::Insert { body: Body::Staged { .. }, .. });
            let mut j = i + 1;
            if !staged && !matches!(ops[i], Op::ForgetPickup { .. }) {
                while j < ops.len()
                    && std::mem::discriminant(&ops[j]) == kind
                    && !matches!(&ops[j], Op::Insert { body: Body::Staged { .. }, .. })
                {
                    j += 1;
                }
            }
            let run = &ops[i..j];
            i = j;
            match &run[0] {
                Op::Insert { body: Body::Staged { .. }, .. } => self.insert_staged(&tx, &run[0]).await?,
                Op::Insert { .. } => self.insert_run(&tx, run).await?,
                Op::Update { .. } => {
                    // The last change to a message wins (an UPDATE … FROM with two rows for one
                    // message would take either).
                    let mut last: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
                    for (n, op) in run.iter().enumerate() {
                        if let Op::Update { id, .. } = op {
                            last.insert(*id, n);
                        }
                    }
                    let (mut ids, mut envs, mut dues, mut helds, mut releases) =
                        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
                    for (n, op) in run.iter().enumerate() {
                        if let Op::Update { id, envelope, due_at, held, release } = op {
                            if last.get(id) == Some(&n) {
                                ids.push(*id);
                                envs.push(envelope.as_str());
                                dues.push(*due_at);
                                helds.push(*held);
                                releases.push(*release);
                            }
                        }
                    }
                    let st = tx
                        .prepare_cached(
                            "UPDATE messages AS m SET envelope = t.e, due_at = t.d, held = t.h,
                                 lease_node = CASE WHEN t.r AND m.lease_node = $6 THEN NULL ELSE m.lease_node END,
                                 lease_until = CASE WHEN t.r AND m.lease_node = $6 THEN NULL ELSE m.lease_until END
                             FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bool[], $5::bool[])
                                 AS t(i, e, d, h, r)
                             WHERE m.id = t.i",
                        )
                        .await
                        .map_err(db)?;
                    tx.execute(&st, &[&ids, &envs, &dues, &helds, &releases, &self.node]).await.map_err(db)?;
                }
                Op::Remove { .. } => {
                    let ids: Vec<i64> =
                        run.iter().filter_map(|op| if let Op::Remove { id } = op { Some(*id) } else { None }).collect();
                    let st = tx.prepare_cached("DELETE FROM messages WHERE id = ANY($1)").await.map_err(db)?;
                    tx.execute(&st, &[&ids]).await.map_err(db)?;
                    let st = tx.prepare_cached("DELETE FROM bodies WHERE id = ANY($1)").await.map_err(db)?;
                    tx.execute(&st, &[&ids]).await.map_err(db)?;
                }
                Op::Release { .. } => {
                    let ids: Vec<i64> = run
                        .iter()
                        .filter_map(|op| if let Op::Release { id } = op { Some(*id) } else { None })
                        .collect();
                    let st = tx
                        .prepare_cached(
                            "UPDATE messages SET lease_node = NULL, lease_until = NULL
                             WHERE id = ANY($1) AND lease_node = $2",
                        )
                        .await
                        .map_err(db)?;
                    tx.execute(&st, &[&ids, &self.node]).await.map_err(db)?;
                }
                Op::ForgetPickup { name } => {
                    let st = tx
                        .prepare_cached("DELETE FROM pickup_marks WHERE node = $1 AND name = $2")
                        .await
                        .map_err(db)?;
                    tx.execute(&st, &[&self.node, name]).await.map_err(db)?;
                }
            }
        }
        tx.commit().await.map_err(db)
    }

    /// New messages whose bodies are in memory: their chunks, then their envelopes (holding this
    /// node's lease), then their Pickup marks, three statements for the run.
    async fn insert_run(&self, tx: &deadpool_postgres::Transaction<'_>, run: &[Op]) -> Result<()> {
        let (mut chunk_ids, mut chunk_ns, mut chunks) = (Vec::new(), Vec::new(), Vec::<&[u8]>::new());
        let (mut ids, mut envs, mut dues, mut helds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut mark_ids, mut names, mut prints) = (Vec::new(), Vec::new(), Vec::new());
        for op in run {
            let Op::Insert { id, envelope, due_at, held, body: Body::Memory(bytes), mark } = op else { continue };
            for (n, piece) in bytes.chunks(PG_CHUNK).enumerate() {
                chunk_ids.push(*id);
                chunk_ns.push(n as i32);
                chunks.push(piece);
            }
            ids.push(*id);
            envs.push(envelope.as_str());
            dues.push(*due_at);
            helds.push(*held);
            if let Some(m) = mark {
                mark_ids.push(*id);
                names.push(m.name.as_str());
                prints.push(m.fingerprint.as_str());
            }
        }
        // The bodies first: an envelope never names a body that is not there.
        let st = tx
            .prepare_cached(
                "INSERT INTO bodies (id, chunk, data) SELECT * FROM unnest($1::bigint[], $2::int[], $3::bytea[])",
            )
            .await
            .map_err(db)?;
        tx.execute(&st, &[&chunk_ids, &chunk_ns, &chunks]).await.map_err(db)?;
        let st = tx
            .prepare_cached(&format!(
                "INSERT INTO messages (id, envelope, due_at, held, lease_node, lease_until)
                 SELECT i, e, d, h, $5, {DB_NOW} + $6
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bool[]) AS t(i, e, d, h)"
            ))
            .await
            .map_err(db)?;
        tx.execute(&st, &[&ids, &envs, &dues, &helds, &self.node, &self.lease_secs]).await.map_err(db)?;
        if !mark_ids.is_empty() {
            let st = tx
                .prepare_cached(
                    "INSERT INTO pickup_marks (node, name, id, fingerprint)
                     SELECT $1, n, i, f FROM unnest($2::text[], $3::bigint[], $4::text[]) AS t(n, i, f)
                     ON CONFLICT (node, name) DO UPDATE SET id = EXCLUDED.id, fingerprint = EXCLUDED.fingerprint",
                )
                .await
                .map_err(db)?;
            tx.execute(&st, &[&self.node, &names, &mark_ids, &prints]).await.map_err(db)?;
        }
        Ok(())
    }

    /// A new message whose body is in a spool file: our trace header, then the file in chunks
    /// read one at a time (a large body never sits whole in memory), then its envelope.
    async fn insert_staged(&self, tx: &deadpool_postgres::Transaction<'_>, op: &Op) -> Result<()> {
        let Op::Insert { id, envelope, due_at, held, body: Body::Staged { header, path, bytes }, .. } = op else {
            return Ok(());
        };
        let chunk = tx.prepare_cached("INSERT INTO bodies (id, chunk, data) VALUES ($1, $2, $3)").await.map_err(db)?;
        tx.execute(&chunk, &[id, &0i32, &header.as_slice()]).await.map_err(db)?;
        let mut file = tokio::fs::File::open(path).await?;
        let mut left = *bytes;
        let mut n = 1i32;
        let mut buf = vec![0u8; PG_CHUNK];
        while left > 0 {
            let want = (left as usize).min(PG_CHUNK);
            tokio::io::AsyncReadExt::read_exact(&mut file, &mut buf[..want]).await?;
            tx.execute(&chunk, &[id, &n, &&buf[..want]]).await.map_err(db)?;
            left -= want as u64;
            n += 1;
        }
        let st = tx
            .prepare_cached(&format!(
                "INSERT INTO messages (id, envelope, due_at, held, lease_node, lease_until)
                 VALUES ($1, $2, $3, $4, $5, {DB_NOW} + $6)"
            ))
            .await
            .map_err(db)?;
        tx.execute(&st, &[id, envelope, due_at, held, &self.node, &self.lease_secs]).await.map_err(db)?;
        Ok(())
    }

    /// Commits what was written before the call (see the invariants).
    async fn commit(&self) -> Result<()> {
        let _one = self.committing.lock().await;
        if let Some(why) = lock(&self.failed).clone() {
            return Err(StoreError::Database(format!("an earlier commit failed ({why}); recovering")));
        }
        let ops = std::mem::take(&mut *lock(&self.pending));
        if ops.is_empty() {
            return Ok(());
        }
        match self.apply(&ops).await {
            Ok(()) => {
                // The bodies are in the database now: their spool files are no longer needed.
                for op in &ops {
                    if let Op::Insert { body: Body::Staged { path, .. }, .. } = op {
                        if let Err(e) = remove_spool_file(path) {
                            tracing::warn!(file = %path.display(), error = %e, "cannot remove a spool file");
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                *lock(&self.failed) = Some(e.to_string());
                Err(e)
            }
        }
    }
}

impl QueueStore for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn spool(&self) -> &Spool {
        &self.spool
    }

    fn next_id(&self) -> Result<QueueId> {
        let id = {
            let mut ids = lock(&self.inner.ids);
            loop {
                match ids.front_mut() {
                    Some((next, end)) if *next < *end => {
                        let id = *next;
                        *next += 1;
                        break Some(id);
                    }
                    Some(_) => {
                        ids.pop_front();
                    }
                    None => break None,
                }
            }
        };
        self.refill_ids();
        match id {
            Some(id) => Ok(id as QueueId),
            None => Err(StoreError::Database("no message IDs in hand: the queue database is slow or away".into())),
        }
    }

    fn insert(&self, env: &Envelope, message: Arc<Vec<u8>>, mark: Option<&PickupMark>) -> Result<()> {
        self.push(Op::Insert {
            id: env.id as i64,
            envelope: to_json(env)?,
            due_at: due_at(env),
            held: env.held,
            body: Body::Memory(message),
            mark: mark.cloned(),
        });
        Ok(())
    }

    fn insert_staged(&self, env: &Envelope, header: &[u8], staged: &StagedBody) -> Result<()> {
        self.spool.check(staged, env.id)?;
        self.push(Op::Insert {
            id: env.id as i64,
            envelope: to_json(env)?,
            due_at: due_at(env),
            held: env.held,
            body: Body::Staged { header: header.to_vec(), path: self.spool.path(env.id), bytes: staged.bytes },
            mark: None,
        });
        Ok(())
    }

    fn update(&self, env: &Envelope, _old_next: Option<u64>) -> Result<()> {
        self.push(Op::Update {
            id: env.id as i64,
            envelope: to_json(env)?,
            due_at: due_at(env),
            held: env.held,
            release: false,
        });
        Ok(())
    }

    fn remove(&self, id: QueueId, _stored_next: Option<u64>) -> Result<()> {
        self.push(Op::Remove { id: id as i64 });
        Ok(())
    }

    fn release(&self, id: QueueId) {
        let id = id as i64;
        let mut pending = lock(&self.inner.pending);
        // Folded into the write just made about the same message (the usual case: its results),
        // so that a batch of results stays one run of one kind.
        match pending.last_mut() {
            Some(Op::Remove { id: i }) if *i == id => {}
            Some(Op::Update { id: i, release, .. }) if *i == id => *release = true,
            _ => pending.push(Op::Release { id }),
        }
    }

    fn discard(&self, env: &Envelope, mark: Option<&PickupMark>) -> Result<()> {
        let id = env.id as i64;
        // Not committed yet (the usual case): it never reaches the database.
        lock(&self.inner.pending).retain(|op| !matches!(op, Op::Insert { id: i, .. } if *i == id));
        if let Some(m) = mark {
            self.forget_pickup(&m.name)?;
        }
        self.push(Op::Remove { id });
        Ok(())
    }

    fn forget_pickup(&self, name: &str) -> Result<()> {
        self.push(Op::ForgetPickup { name: name.to_string() });
        Ok(())
    }

    fn commit(&self) -> StoreFuture<()> {
        let inner = self.inner.clone();
        self.spawn(async move { inner.commit().await })
    }

    fn commit_blocking(&self, wait: Duration) -> Result<()> {
        let inner = self.inner.clone();
        self.block_on(wait, async move { inner.commit().await })
    }

    fn envelope(&self, id: QueueId) -> StoreFuture<Option<Envelope>> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let c = inner.reader().await?;
            let st = c.prepare_cached("SELECT envelope FROM messages WHERE id = $1").await.map_err(db)?;
            let id = id as i64;
            match c.query_opt(&st, &[&id]).await.map_err(db)? {
                Some(row) => Ok(Some(from_json(id, row.get(0))?)),
                None => Ok(None),
            }
        })
    }

    fn body(&self, id: QueueId) -> StoreFuture<Vec<u8>> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let c = inner.client().await?;
            let st = c.prepare_cached("SELECT data FROM bodies WHERE id = $1 ORDER BY chunk").await.map_err(db)?;
            let mut out = Vec::new();
            for row in c.query(&st, &[&(id as i64)]).await.map_err(db)? {
                out.extend_from_slice(row.get::<_, &[u8]>(0));
            }
            Ok(out)
        })
    }

    fn body_head(&self, id: QueueId, max: usize) -> StoreFuture<Vec<u8>> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let c = inner.client().await?;
            // Each chunk cut to `max` in the database; the first chunks are enough (chunk 0 can
            // be as small as our trace header, the others are 1 MiB).
            let st = c
                .prepare_cached("SELECT substring(data FROM 1 FOR $2) FROM bodies WHERE id = $1 ORDER BY chunk LIMIT 4")
                .await
                .map_err(db)?;
            let max_i32 = i32::try_from(max).unwrap_or(i32::MAX);
            let mut out = Vec::new();
            for row in c.query(&st, &[&(id as i64), &max_i32]).await.map_err(db)? {
                let data = row.get::<_, &[u8]>(0);
                out.extend_from_slice(&data[..data.len().min(max - out.len())]);
                if out.len() >= max {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn page(&self, after: QueueId, limit: usize) -> StoreFuture<Vec<Envelope>> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let c = inner.reader().await?;
            let st = c
                .prepare_cached("SELECT id, envelope FROM messages WHERE id > $1 ORDER BY id LIMIT $2")
                .await
                .map_err(db)?;
            let after = after.min(i64::MAX as u64) as i64;
            let rows = c.query(&st, &[&after, &(limit as i64)]).await.map_err(db)?;
            rows.iter().map(|r| from_json(r.get(0), r.get(1))).collect()
        })
    }

    fn claim_due(&self, now: u64, limit: usize, _working: &dyn Fn(QueueId) -> bool) -> StoreFuture<Vec<Envelope>> {
        let inner = self.inner.clone();
        self.spawn(async move {
            // What this node wrote first: the database must not hand out a message on an older
            // word (one it removed, or whose lease it gave back with its results).
            let c = inner.reader().await?;
            let st = c
                .prepare_cached(&format!(
                    "WITH picked AS (
                         SELECT id, lease_node AS before FROM messages
                         WHERE due_at <= $3 AND NOT held
                           AND (lease_until IS NULL OR lease_until < {DB_NOW})
                         ORDER BY due_at
                         LIMIT $4
                         FOR UPDATE SKIP LOCKED)
                     UPDATE messages AS m SET lease_node = $1, lease_until = {DB_NOW} + $2
                     FROM picked WHERE m.id = picked.id
                     RETURNING m.id, m.envelope, picked.before"
                ))
                .await
                .map_err(db)?;
            let now = now.min(i64::MAX as u64) as i64;
            let rows = c.query(&st, &[&inner.node, &inner.lease_secs, &now, &(limit as i64)]).await.map_err(db)?;
            let mut out = Vec::with_capacity(rows.len());
            // Messages whose lease was another node's, by that node: it died or lost the
            // database while working on them, and may have delivered some already.
            let mut from: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
            for row in &rows {
                if let Some(node) = row.get::<_, Option<String>>(2).filter(|n| *n != inner.node) {
                    *from.entry(node).or_default() += 1;
                }
            }
            for (node, n) in from {
                inner.taken_over.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(
                    messages = n,
                    from = %node,
                    "took over messages whose lease had expired; those it had already handed on will be delivered twice"
                );
            }
            for row in rows {
                let id: i64 = row.get(0);
                match from_json(id, row.get(1)) {
                    Ok(env) => out.push(env),
                    Err(e) => tracing::error!(id, error = %e, "unreadable envelope left in the queue"),
                }
            }
            out.sort_by_key(|e| e.next_attempt.unwrap_or(0));
            Ok(out)
        })
    }

    fn claim(&self, id: QueueId) -> StoreFuture<Claim> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let c = inner.reader().await?;
            let st = c
                .prepare_cached(&format!(
                    "UPDATE messages SET lease_node = $1, lease_until = {DB_NOW} + $2
                     WHERE id = $3 AND (lease_node IS NULL OR lease_node = $1 OR lease_until < {DB_NOW})
                     RETURNING envelope"
                ))
                .await
                .map_err(db)?;
            let id = id.min(i64::MAX as u64) as i64;
            if let Some(row) = c.query_opt(&st, &[&inner.node, &inner.lease_secs, &id]).await.map_err(db)? {
                return Ok(Claim::Taken(from_json(id, row.get(0))?));
            }
            let st = c.prepare_cached("SELECT lease_node FROM messages WHERE id = $1").await.map_err(db)?;
            Ok(match c.query_opt(&st, &[&id]).await.map_err(db)? {
                Some(row) => Claim::Busy(row.get::<_, Option<String>>(0).unwrap_or_default()),
                None => Claim::Missing,
            })
        })
    }

    fn renew(&self, ids: Vec<QueueId>) -> StoreFuture<()> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let c = inner.client().await?;
            let st = c
                .prepare_cached(&format!(
                    "UPDATE messages SET lease_until = {DB_NOW} + $2 WHERE id = ANY($1) AND lease_node = $3"
                ))
                .await
                .map_err(db)?;
            let ids: Vec<i64> = ids.into_iter().map(|i| i as i64).collect();
            c.execute(&st, &[&ids, &inner.lease_secs, &inner.node]).await.map_err(db)?;
            inner.seen().await
        })
    }

    fn renew_every(&self) -> Option<Duration> {
        Some((self.lease / 3).max(Duration::from_secs(1)))
    }

    fn earliest_retry(&self, from: u64) -> StoreFuture<Option<u64>> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let c = inner.reader().await?;
            let st = c.prepare_cached("SELECT min(due_at) FROM messages WHERE due_at >= $1").await.map_err(db)?;
            let from = from.min(i64::MAX as u64) as i64;
            let at: Option<i64> = c.query_one(&st, &[&from]).await.map_err(db)?.get(0);
            Ok(at.map(|t| t.max(0) as u64))
        })
    }

    fn counts(&self, now: u64) -> StoreFuture<Counts> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let c = inner.reader().await?;
            let st = c
                .prepare_cached(
                    "SELECT count(*), count(*) FILTER (WHERE due_at > $1), count(*) FILTER (WHERE held)
                     FROM messages",
                )
                .await
                .map_err(db)?;
            let now = now.min(i64::MAX as u64) as i64;
            let row = c.query_one(&st, &[&now]).await.map_err(db)?;
            let n = |i: usize| row.get::<_, i64>(i).max(0) as usize;
            Ok(Counts { total: Some(n(0)), deferred: n(1), held: Some(n(2)) })
        })
    }

    fn startup(&self) -> StoreFuture<Startup> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let c = inner.reader().await?;
            let row = c.query_one("SELECT count(*) FROM messages", &[]).await.map_err(db)?;
            // Nothing to resume by hand: `claim_due` hands out every message due now.
            Ok(Startup { queued: row.get::<_, i64>(0).max(0) as usize, held: Vec::new(), resume: Vec::new() })
        })
    }

    fn pickup_taken(&self, mark: &PickupMark) -> StoreFuture<Option<QueueId>> {
        let inner = self.inner.clone();
        let mark = mark.clone();
        self.spawn(async move {
            let c = inner.reader().await?;
            let st = c
                .prepare_cached("SELECT id, fingerprint FROM pickup_marks WHERE node = $1 AND name = $2")
                .await
                .map_err(db)?;
            Ok(c.query_opt(&st, &[&inner.node, &mark.name]).await.map_err(db)?.and_then(|row| {
                let (id, fingerprint): (i64, String) = (row.get(0), row.get(1));
                (fingerprint == mark.fingerprint).then_some(id as QueueId)
            }))
        })
    }

    fn recover(self: Arc<Self>) -> StoreFuture<()> {
        let inner = self.inner.clone();
        self.spool.next_generation();
        self.spawn(async move {
            // A durable write first: only then is the store healthy again.
            inner.seen().await?;
            let _one = inner.committing.lock().await;
            lock(&inner.pending).clear();
            *lock(&inner.failed) = None;
            Ok(())
        })
    }

    fn poll_every(&self) -> Option<Duration> {
        Some(self.poll_every)
    }

    fn taken_over(&self) -> u64 {
        self.inner.taken_over.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine's PostgreSQL (see tests/common/pg.rs), or `None` when it cannot be reached
    /// and CI does not require it.
    fn server() -> Option<String> {
        let url = std::env::var("MAILROOT_TEST_PG").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into());
        let reachable = url
            .split('@')
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|addr| addr.parse::<std::net::SocketAddr>().ok())
            .is_some_and(|addr| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
        if !reachable {
            assert!(std::env::var_os("MAILROOT_INTEROP").is_none(), "PostgreSQL at {url} is needed");
            eprintln!("skipped: no PostgreSQL at {url}");
            return None;
        }
        Some(url)
    }

    /// Whether the store's connections are encrypted, then its schema dropped.
    fn encrypted(store: &PgStore, schema: &str) -> bool {
        let inner = store.inner.clone();
        let schema = schema.to_string();
        store
            .block_on(Duration::from_secs(10), async move {
                let c = inner.client().await?;
                let ssl: bool = c
                    .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
                    .await
                    .map_err(db)?
                    .get(0);
                c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.map_err(db)?;
                Ok(ssl)
            })
            .expect("query the connection")
    }

    /// `require` encrypts (the machine's server has Debian's self-signed certificate); `verify`
    /// refuses that certificate rather than fall back to clear text; `auto` to a loopback
    /// address does not encrypt.
    #[test]
    fn tls_to_the_database() {
        let Some(url) = server() else { return };
        let dir = tempfile::tempdir().unwrap();
        let settings = |tls: PgTls, schema: &str| PgSettings {
            url: url.clone(),
            schema: format!("{schema}_{}", std::process::id()),
            tls,
            ..PgSettings::default()
        };
        let s = settings(PgTls::Require, "tls_require");
        let store = PgStore::open(&s, dir.path(), 1).expect("open with tls = require");
        assert!(encrypted(&store, &s.schema), "require encrypts");
        let s = settings(PgTls::Auto, "tls_auto");
        let store = PgStore::open(&s, dir.path(), 1).expect("open with tls = auto");
        assert!(!encrypted(&store, &s.schema), "auto to loopback does not");
        let s = settings(PgTls::Verify, "tls_verify");
        let refused = PgStore::open(&s, dir.path(), 1).err().expect("verify refuses a self-signed certificate");
        assert!(refused.to_string().to_lowercase().contains("certificate"), "{refused}");
    }
}
