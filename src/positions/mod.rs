//! A consumer group that writes its results to the database: the mechanism the aggregator
//! (counts, sketches) and each alerter (window counts, alerts) share.
//!
//! Offsets never go to Kafka: each flush stores, in the same transaction as the group's
//! results, the next offset of every partition that moved, compare-and-set against what this
//! member last read or wrote. On assignment a partition is paused, its stored position read,
//! and the consumer seeked there; on revocation its un-flushed results are dropped. Results are
//! therefore exact across crashes and rebalances, and a revoked member (a zombie) is fenced off
//! by the compare-and-set (see [`crate::store`]).
//!
//! - [`tally`]: the pure per-partition state machine (results, offsets, source watermarks that
//!   drop a preprocessor's replays), generic over what a group accumulates ([`Accumulator`]).
//! - [`start`]: where a newly owned partition starts (stored offset, a recreated topic, an
//!   offset past the log end) and which partitions still wait for that decision.
//! - [`GroupMember`]: the Kafka side: the rebalance callback, positioning, the flush with its
//!   conflict handling.
//! - [`consume`]: the one loop every such group runs (message, flush due, shutdown, the final
//!   flush); a group says what it counts and writes by implementing [`Group`] in its own
//!   folder.

pub mod start;
pub mod tally;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedHeaders, Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::event::headers as event_headers;
use crate::kafka::{ClientRole, KafkaSettings, RAW_TOPIC};
use crate::store::{FlushOutcome, Store, StoreError, StoredPositions, TopicIdentity};
use start::{Awaiting, Notice};
pub use tally::{Accumulator, Pending, Recorded, Source, Tally};

/// Reading stored positions, topic ids or a log end: longer counts as a failed attempt
/// (retried with backoff; the partitions stay paused meanwhile).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Shared between the consume loop and the rebalance callback (both run on the task that
/// polls the consumer, so the locks are never contended).
pub struct Shared<A> {
    tally: Mutex<Tally<A>>,
    /// Partitions assigned (or fenced off) and not yet positioned; paused meanwhile.
    awaiting: Mutex<Awaiting>,
    /// Wakes the loop when the rebalance callback added partitions to `awaiting` (the
    /// consumer then has nothing to deliver: every new partition is paused).
    pub wake: Notify,
}

impl<A> Shared<A> {
    pub fn tally(&self) -> MutexGuard<'_, Tally<A>> {
        // A poisoned lock only means a panic elsewhere; the tally itself stays consistent.
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn awaiting(&self) -> MutexGuard<'_, Awaiting> {
        self.awaiting.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// When the next positioning attempt is due (`None`: nothing waits).
    pub fn position_due(&self) -> Option<std::time::Instant> {
        self.awaiting().due_at()
    }
}

/// Runs a blocking librdkafka call from async code without stalling the other tasks on this
/// worker (an in-process broker may be among them).
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The consumer's context: the rebalance callback.
pub struct GroupContext<A> {
    shared: Arc<Shared<A>>,
    topic: String,
}

impl<A: Send + Sync> ClientContext for GroupContext<A> {}

impl<A: Accumulator + Send + Sync> ConsumerContext for GroupContext<A> {
    /// No database or broker round trip here: the callback runs inside the consumer's poll,
    /// and anything slow in it (a hung database) would hold up the whole group's rebalance
    /// and the process's shutdown. New partitions are assigned paused; the loop reads their
    /// stored positions, seeks and resumes them ([`GroupMember::position`]).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                for &p in &partitions {
                    // Where it starts is decided once the stored positions are read; until
                    // then it is paused, and whatever arrives from it is not counted.
                    if let Err(e) = tpl.set_partition_offset(&self.topic, p, Offset::Beginning) {
                        tracing::warn!(partition = p, %e, "cannot set start offset");
                    }
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(%e, "cannot pause new partitions; their early messages are skipped");
                }
                let mut awaiting = self.shared.awaiting();
                for &p in &partitions {
                    awaiting.add(p);
                }
                drop(awaiting);
                self.shared.wake.notify_one();
                tracing::info!(?partitions, "assigned");
                assigned
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut tally = self.shared.tally();
                let mut awaiting = self.shared.awaiting();
                for &p in &partitions {
                    tally.revoke(p);
                    awaiting.remove(p);
                }
                drop((tally, awaiting));
                tracing::info!(?partitions, "revoked; un-flushed results dropped");
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::warn!(?other, "rebalance error; giving up the assignment");
                let mut tally = self.shared.tally();
                for p in tally.partitions() {
                    tally.revoke(p);
                }
                self.shared.awaiting().clear();
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::warn!(%e, "applying the assignment failed");
        }
    }
}

/// The raw partition and offset an event was made from, if its headers say so (events written
/// before the source moved into the event).
fn source_of_headers(headers: Option<&BorrowedHeaders>) -> Option<Source> {
    let headers = headers?;
    let (mut partition, mut offset) = (None, None);
    for h in headers.iter() {
        let value = h.value.and_then(|v| std::str::from_utf8(v).ok());
        match h.key {
            event_headers::SOURCE_PARTITION => partition = value.and_then(|v| v.parse().ok()),
            event_headers::SOURCE_OFFSET => offset = value.and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    Some(Source {
        partition: partition?,
        offset: offset?,
    })
}

/// The raw partition and offset an event was made from: from the end of its JSON, or (events
/// written before the source moved into the event) from its headers.
pub fn source_of_message(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<Source> {
    m.payload()
        .and_then(crate::event::source_of_event)
        .or_else(|| source_of_headers(m.headers()))
}

/// Reading the stored state of the partitions being positioned (up to a million open visits
/// per aggregator): longer counts as a failed attempt, retried with backoff.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why positioning could not be done now (it is retried).
#[derive(Debug, thiserror::Error)]
enum PositionError {
    #[error("cannot read the stored positions: {0}")]
    Store(#[from] StoreError),
    #[error("cannot describe the topics: {0}")]
    Describe(#[from] crate::kafka::KafkaSetupError),
    #[error("cannot read the log end of partition {partition}: {source}")]
    LogEnd { partition: i32, source: KafkaError },
    #[error("shutting down")]
    Shutdown,
}

/// How a flush ended.
pub enum Flushed<A: Accumulator> {
    /// Nothing had moved: nothing to write.
    Nothing,
    /// Results and offsets are durable.
    Committed(Box<Pending<A>>),
    /// Not written; the results are back in the tally and the next flush writes them.
    /// `store_error`: the database failed or timed out (not shutdown, not fencing).
    Failed { store_error: bool },
}

/// One member of a result-writing consumer group: its consumer, its tally and what it needs
/// to position partitions and flush.
pub struct GroupMember<A: Accumulator + Send + Sync + 'static> {
    shared: Arc<Shared<A>>,
    consumer: StreamConsumer<GroupContext<A>>,
    group: String,
    topic: String,
    store: Store,
    shutdown: CancellationToken,
    /// The topic ids as last read from the broker, written with every flush.
    identity: TopicIdentity,
    /// Consecutive failed flushes, for the backoff.
    failures: u32,
    /// Partitions whose stored positions referred to a recreated topic (for stats).
    recreated_topics_seen: u64,
}

impl<A: Accumulator + Send + Sync + 'static> GroupMember<A> {
    /// Joins `group` on `topic` with `extra` client settings; each partition it is assigned
    /// starts from `template`'s configuration.
    pub fn join(
        kafka: &KafkaSettings,
        group: &str,
        topic: &str,
        template: A,
        store: Store,
        shutdown: CancellationToken,
    ) -> Result<GroupMember<A>, KafkaError> {
        let shared = Arc::new(Shared {
            tally: Mutex::new(Tally::new(template)),
            awaiting: Mutex::new(Awaiting::default()),
            wake: Notify::new(),
        });
        let settings = [
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            crate::kafka::SESSION[0],
            crate::kafka::SESSION[1],
            crate::kafka::FETCH_QUEUE_BACKOFF,
            crate::kafka::PREFETCH,
        ];
        let consumer: StreamConsumer<GroupContext<A>> = kafka
            .client_config(ClientRole::Consumer, &settings)
            .create_with_context(GroupContext {
                shared: Arc::clone(&shared),
                topic: topic.to_owned(),
            })?;
        consumer.subscribe(&[topic])?;
        Ok(GroupMember {
            shared,
            consumer,
            group: group.to_owned(),
            topic: topic.to_owned(),
            store,
            shutdown,
            identity: TopicIdentity::default(),
            failures: 0,
            recreated_topics_seen: 0,
        })
    }

    /// The partitions this member owns and what it accumulated in them.
    pub fn tally(&self) -> MutexGuard<'_, Tally<A>> {
        self.shared.tally()
    }

    /// Partitions whose stored positions referred to a recreated topic, so far.
    pub fn recreated_topics_seen(&self) -> u64 {
        self.recreated_topics_seen
    }

    /// The consumed topic's partition count (`None`: not known yet).
    pub fn partition_count(&self) -> Option<i32> {
        let metadata = blocking(|| {
            self.consumer
                .fetch_metadata(Some(&self.topic), LOOKUP_TIMEOUT)
        });
        match metadata {
            Ok(m) => m
                .topics()
                .iter()
                .find(|t| t.name() == self.topic)
                .map(|t| t.partitions().len())
                .filter(|&n| n > 0)
                .and_then(|n| i32::try_from(n).ok()),
            Err(e) => {
                tracing::warn!(%e, "cannot read the partitions of {} yet", self.topic);
                None
            }
        }
    }

    /// The log end (high watermark) of one partition of the consumed topic.
    pub fn log_end(&self, partition: i32, timeout: Duration) -> Result<i64, KafkaError> {
        blocking(|| {
            self.consumer
                .fetch_watermarks(&self.topic, partition, timeout)
        })
        .map(|(_, high)| high)
    }

    /// How long to wait after a failed flush: 250 ms, doubling, at most 30 s.
    pub fn backoff(&self) -> Duration {
        Duration::from_millis(250u64 << self.failures.min(7)).min(Duration::from_secs(30))
    }

    /// Records the message at `partition`/`offset` (`count` adds it to the partition's
    /// results) unless it is a replay ([`Tally::record`]); warns when the broker skipped
    /// offsets.
    pub fn record(
        &self,
        partition: i32,
        offset: i64,
        source: Option<Source>,
        count: impl FnOnce(&mut A),
    ) -> Recorded {
        let mut tally = self.shared.tally();
        if let Some(next) = tally.next_offset(partition).filter(|&n| offset > n) {
            // Our producers write no transaction markers and the topic is not compacted: a
            // jump means those messages are gone from the broker, deleted by its retention
            // while this group was behind or down (librdkafka then starts the partition again
            // at the log start), or never delivered. They cannot be counted; say so, once per
            // gap: the next message continues from here.
            tracing::error!(
                group = %self.group,
                partition,
                expected = next,
                got = offset,
                lost = offset - next,
                "{} messages of {} partition {partition} are gone from the broker (deleted by its retention before this group read them); counting goes on from offset {offset}",
                offset - next,
                self.topic
            );
        }
        tally.record(partition, offset, source, count)
    }

    /// Positions the partitions that wait (new or fenced off): reads the stored positions and
    /// the topics' ids, decides where each starts, seeks and resumes it. Whatever fails is
    /// retried later with backoff; nothing here waits longer than [`LOOKUP_TIMEOUT`] per step
    /// or past shutdown.
    pub async fn position(&mut self) {
        let due = self.shared.awaiting().take_due(std::time::Instant::now());
        if due.is_empty() {
            return;
        }
        let began = std::time::Instant::now();
        let (stored, log_ends) = match self.lookups(&due).await {
            Ok(found) => found,
            Err(err) => {
                if !matches!(err, PositionError::Shutdown) {
                    tracing::warn!(%err, partitions = ?due, "cannot position partitions yet; retrying");
                }
                self.shared
                    .awaiting()
                    .failed(due, std::time::Instant::now());
                return;
            }
        };
        tracing::debug!(took = ?began.elapsed(), "positions, topic ids and log ends read");
        let mut failed = Vec::new();
        let mut notices: HashMap<String, Vec<i32>> = HashMap::new();
        for p in due {
            let (begin, notice) =
                start::start_of(p, &stored, &self.identity, log_ends.get(&p).copied());
            let to = match begin.from {
                0 => Offset::Beginning,
                n => Offset::Offset(n),
            };
            let seek = blocking(|| self.consumer.seek(&self.topic, p, to, LOOKUP_TIMEOUT));
            if let Err(e) = seek {
                // Not counted until the seek works: without it, counting would go on from
                // wherever the consumer is, over a gap.
                tracing::warn!(partition = p, %e, "seek failed; retrying");
                failed.push(p);
                continue;
            }
            {
                let mut tally = self.shared.tally();
                tally.start(p, begin);
                if let Some(acc) = tally.accumulator_mut(p) {
                    acc.resume_from(p, &stored);
                }
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, p);
            if let Err(e) = self.consumer.resume(&tpl) {
                tracing::warn!(partition = p, %e, "resume failed; retrying");
                self.shared.tally().revoke(p);
                failed.push(p);
                continue;
            }
            if let Some(n) = notice {
                if matches!(n, Notice::TopicRecreated { .. }) {
                    self.recreated_topics_seen += 1;
                }
                notices
                    .entry(describe(&n, &self.topic))
                    .or_default()
                    .push(p);
            }
        }
        tracing::debug!(took = ?began.elapsed(), "partitions positioned");
        for (what, partitions) in notices {
            // Data-loss territory (or the appearance of it): ERROR, one line each.
            tracing::error!(group = %self.group, ?partitions, "{what}");
        }
        let mut awaiting = self.shared.awaiting();
        if failed.is_empty() {
            awaiting.succeeded();
        } else {
            awaiting.failed(failed, std::time::Instant::now());
        }
    }

    /// The stored positions, the topics' ids (into `self.identity`) and, for partitions with a
    /// stored offset, their log ends.
    async fn lookups(
        &mut self,
        due: &[i32],
    ) -> Result<(StoredPositions, HashMap<i32, i64>), PositionError> {
        let ids = blocking(|| {
            crate::kafka::describe_topic_ids(
                self.consumer.client(),
                &[self.topic.as_str(), RAW_TOPIC],
                LOOKUP_TIMEOUT,
            )
        })?;
        tracing::debug!(?ids, "topic ids");
        self.identity = TopicIdentity {
            topic_id: ids.get(&self.topic).cloned().flatten(),
            source_topic_id: ids.get(RAW_TOPIC).cloned().flatten(),
        };
        let load = self.store.load_positions(&self.group, &self.topic);
        let mut stored = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(PositionError::Shutdown),
            r = tokio::time::timeout(LOOKUP_TIMEOUT, load) => r.unwrap_or(Err(StoreError::Timeout(LOOKUP_TIMEOUT)))?,
        };
        // State that outlives a flush (open visits) is read only for the partitions being
        // positioned; it can be large.
        let state = self
            .store
            .load_partition_state(&self.group, &self.topic, due);
        stored.state = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(PositionError::Shutdown),
            r = tokio::time::timeout(STATE_TIMEOUT, state) => r.unwrap_or(Err(StoreError::Timeout(STATE_TIMEOUT)))?,
        };
        let mut log_ends = HashMap::new();
        for &p in due {
            let Some(offset) = stored.offset(p) else {
                continue;
            };
            if let (_, Some(Notice::TopicRecreated { .. } | Notice::SourceRecreated { .. })) =
                start::start_of(p, &stored, &self.identity, None)
            {
                // Decided without the log end: a new topic's offsets do not compare.
                continue;
            }
            // A log end below the stored offset moves counting back to it, so it must be
            // real: ask again a few times (the embedded broker has answered with stale
            // high watermarks under load) and believe the highest answer.
            let mut high = i64::MIN;
            for attempt in 0..3 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let (_, h) = blocking(|| {
                    self.consumer
                        .fetch_watermarks(&self.topic, p, LOOKUP_TIMEOUT)
                })
                .map_err(|source| PositionError::LogEnd {
                    partition: p,
                    source,
                })?;
                high = high.max(h);
                if high >= offset {
                    break;
                }
            }
            log_ends.insert(p, high);
        }
        Ok((stored, log_ends))
    }

    /// One flush, abandoned after `timeout` or (unless it is the final one) at shutdown.
    /// `fill` adds the group's results to the batch that holds the positions.
    pub async fn flush(
        &mut self,
        timeout: Duration,
        is_final: bool,
        mut fill: impl FnMut(&mut Pending<A>),
    ) -> Flushed<A> {
        // A conflict leaves the other partitions' results in place: flush those right away.
        for _ in 0..3 {
            let mut pending =
                self.shared
                    .tally()
                    .take_pending(&self.group, &self.topic, &self.identity);
            if pending.batch.offsets.is_empty() {
                return Flushed::Nothing;
            }
            fill(&mut pending);
            // A data error is not retried as it is (it would fail the same way forever and
            // stall every partition of the batch): the values that may have caused it are
            // counted as `(invalid)`, then every value, so the totals stay exact.
            let mut quarantined = 0;
            let outcome = loop {
                let write = tokio::time::timeout(timeout, self.store.flush(&pending.batch));
                let outcome = tokio::select! {
                    r = write => r.unwrap_or(Err(StoreError::Timeout(timeout))),
                    // At shutdown the final flush (with its own short timeout) follows.
                    _ = self.shutdown.cancelled(), if !is_final => {
                        self.shared.tally().restore(pending);
                        return Flushed::Failed { store_error: false };
                    }
                };
                match outcome {
                    Err(err) if err.is_data_error() && quarantined < 2 => {
                        let error = crate::event::policy::bounded(&err.to_string()).into_owned();
                        let moved = pending.batch.quarantine(&error, quarantined == 1);
                        quarantined += 1;
                        tracing::error!(
                            group = %self.group,
                            %error,
                            values = moved,
                            "the database refused this flush's data; writing it again with those values counted as (invalid)"
                        );
                    }
                    other => break other,
                }
            };
            match outcome {
                Ok(FlushOutcome::Committed) => {
                    self.shared.tally().committed(&pending);
                    if self.failures > 0 {
                        tracing::info!(after_failures = self.failures, "flush succeeded again");
                    }
                    self.failures = 0;
                    return Flushed::Committed(Box::new(pending));
                }
                Ok(FlushOutcome::Conflict(partitions)) => {
                    self.shared.tally().restore(pending);
                    self.fenced_off(&partitions);
                }
                Err(err) => {
                    self.shared.tally().restore(pending);
                    self.failures += 1;
                    tracing::warn!(%err, attempt = self.failures, retry_in = ?self.backoff(), "flush failed; results kept in memory");
                    return Flushed::Failed { store_error: true };
                }
            }
        }
        Flushed::Failed { store_error: false }
    }

    /// Another owner moved these partitions' offsets: forget our results, pause them, and
    /// position them again from the stored offsets (as on assignment, with retries).
    fn fenced_off(&self, partitions: &[i32]) {
        tracing::warn!(
            group = %self.group,
            ?partitions,
            "stored offsets moved by another member of the group; re-reading"
        );
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            self.shared.tally().revoke(p);
            tpl.add_partition(&self.topic, p);
        }
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(%e, "cannot pause fenced-off partitions; their messages are skipped until repositioned");
        }
        let mut awaiting = self.shared.awaiting();
        for &p in partitions {
            awaiting.add(p);
        }
    }

    /// Leaves the group. Leaving blocks on a broker round trip: keep it off the async
    /// workers, and do not wait for a broker that does not answer.
    pub async fn leave(self) {
        let consumer = self.consumer;
        let leave = tokio::task::spawn_blocking(move || drop(consumer));
        if tokio::time::timeout(Duration::from_secs(5), leave)
            .await
            .is_err()
        {
            tracing::warn!(group = %self.group, "the broker did not confirm that this member left the group");
        }
    }
}

/// `tokio::time::sleep_until` for a std `Instant` (`None`: never).
pub async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// One line for a positioning notice: what happened and what it means for the results.
fn describe(n: &Notice, topic: &str) -> String {
    match n {
        Notice::TopicRecreated { stored, now } => format!(
            "topic {topic} is not the one the stored positions were counted in (topic id {stored}, now {now}: deleted and created again, or a broker that started over); counting the new topic from its start, on top of the results already in the database. If it replays lines that were already counted, reset the database first"
        ),
        Notice::SourceRecreated { stored, now } => format!(
            "topic {RAW_TOPIC} was deleted and created again (topic id {stored}, now {now}): replay detection starts over for these partitions"
        ),
        Notice::BeyondLogEnd { stored, log_end } => format!(
            "the stored offset {stored} is past the log end {log_end} of {topic} (same topic): the broker lost messages that were already counted; counting resumes at the log end"
        ),
    }
}

/// A flush that takes longer is abandoned and retried (its results stay in memory). If it
/// commits after all, the retry's compare-and-set sees the moved offsets and re-reads them:
/// nothing is counted twice.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// The flush at shutdown gets this long; what it cannot write is re-read by the next owner.
pub const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// What a consumer group that writes results gives the one loop ([`consume`]): what it counts
/// from a message, what a flush writes, and what it does around a flush.
pub trait Group: Send {
    type Acc: Accumulator + Send + Sync + 'static;
    /// Time between two regular flushes.
    fn interval(&self) -> Duration;
    /// Wakes a flush before the interval ends (`demo --exit-when-drained`).
    fn flush_now(&self) -> Option<Arc<Notify>> {
        None
    }
    /// Adds the message (of `country`, the event's key) to its partition's accumulator.
    fn count(
        &mut self,
        acc: &mut Self::Acc,
        m: &rdkafka::message::BorrowedMessage<'_>,
        country: crate::countries::CountryCode,
    );
    /// A message was dropped as a replay of a raw line already counted.
    fn duplicate(&self);
    /// Puts the results taken out of the tally into the flush's batch.
    fn fill(&self, pending: &mut Pending<Self::Acc>);
    /// How a flush ended (statistics, logs).
    fn flushed(&self, member: &GroupMember<Self::Acc>, outcome: &Flushed<Self::Acc>);
    /// Before each regular flush (an alerter notes which partitions are caught up).
    fn before_flush(&mut self, _member: &GroupMember<Self::Acc>) {}
    /// After each regular flush that left nothing unwritten (an alerter closes windows).
    fn after_flush<'a>(
        &'a mut self,
        _member: &'a GroupMember<Self::Acc>,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Runs `group` as `member` until `shutdown`: positions partitions as they are assigned,
/// counts every message, flushes every interval (sooner when asked, later after a failure),
/// then flushes once more (bounded) and leaves the group.
pub async fn consume<G: Group>(
    mut member: GroupMember<G::Acc>,
    mut group: G,
    shutdown: CancellationToken,
) {
    let next_flush = tokio::time::sleep(group.interval());
    tokio::pin!(next_flush);
    let shared = Arc::clone(&member.shared);
    let flush_now = group.flush_now();
    loop {
        let position_due = shared.position_due();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = shared.wake.notified() => member.position().await,
            _ = sleep_until(position_due), if position_due.is_some() => member.position().await,
            _ = flush_due(next_flush.as_mut(), flush_now.as_deref()) => {
                group.before_flush(&member);
                let ok = flush_once(&mut member, &group, FLUSH_TIMEOUT, false).await;
                if ok {
                    group.after_flush(&member).await;
                }
                let wait = if ok { group.interval() } else { member.backoff() };
                next_flush.as_mut().reset(tokio::time::Instant::now() + wait);
            }
            msg = member.consumer.recv() => match msg {
                Ok(m) => {
                    let country = crate::event::country_of(m.key(), m.payload());
                    let source = source_of_message(&m);
                    let recorded = member.record(m.partition(), m.offset(), source, |acc| {
                        group.count(acc, &m, country)
                    });
                    if recorded == Recorded::DuplicateSource {
                        group.duplicate();
                    }
                }
                Err(e) => tracing::warn!(%e, "consume error"),
            },
        }
    }
    // Best effort, bounded: what is not flushed now is re-read by the next owner.
    flush_once(&mut member, &group, FINAL_FLUSH_TIMEOUT, true).await;
    member.leave().await;
}

/// One flush; true when the results are durable (or there was nothing to write).
async fn flush_once<G: Group>(
    member: &mut GroupMember<G::Acc>,
    group: &G,
    timeout: Duration,
    is_final: bool,
) -> bool {
    let outcome = member
        .flush(timeout, is_final, |pending| group.fill(pending))
        .await;
    group.flushed(member, &outcome);
    !matches!(outcome, Flushed::Failed { .. })
}

/// When the next flush is due: at the end of the interval, or when asked to flush now.
async fn flush_due(interval: std::pin::Pin<&mut tokio::time::Sleep>, now: Option<&Notify>) {
    match now {
        Some(now) => tokio::select! {
            _ = interval => {}
            _ = now.notified() => {}
        },
        None => interval.await,
    }
}
