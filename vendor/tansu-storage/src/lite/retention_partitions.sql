-- pageviews patch: every partition whose topic deletes by retention (cleanup.policy includes
-- delete, Kafka's default), with its topic's retention.ms and retention.bytes when set.
select tp.id, t.name, tp.partition,
(select tc.value from topic_configuration tc
 where tc.topic = t.id and tc.name = 'retention.ms'),
(select tc.value from topic_configuration tc
 where tc.topic = t.id and tc.name = 'retention.bytes')
from cluster c
join topic t on t.cluster = c.id
join topition tp on tp.topic = t.id
where c.name = $1
and coalesce(
    (select tc.value from topic_configuration tc
     where tc.topic = t.id and tc.name = 'cleanup.policy'),
    'delete') like '%delete%';
