-- pageviews patch: the partition's row id, looked up once per produce or fetch (see PATCHED.md)
select tp.id
from cluster c
join topic t on t.cluster = c.id
join topition tp on tp.topic = t.id
where c.name = $1
and t.name = $2
and tp.partition = $3;
