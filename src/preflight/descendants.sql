-- Each named relation ($1) and every partition or inheritance child below
-- it, at any depth: a lock on a partition blocks an ALTER of its parent,
-- which must lock them all. (relation, named) pairs.
WITH RECURSIVE below (relation, named) AS (
    SELECT r, r FROM pg_catalog.unnest($1::pg_catalog.int8[]) AS r
    UNION
    SELECT i.inhrelid::pg_catalog.int8, b.named
    FROM below AS b
    JOIN pg_catalog.pg_inherits AS i ON i.inhparent::pg_catalog.int8 = b.relation
)
SELECT b.relation, b.named,
       pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) AS quoted,
       n.nspname::pg_catalog.text || '.' || c.relname::pg_catalog.text AS label
FROM below AS b
JOIN pg_catalog.pg_class AS c ON c.oid::pg_catalog.int8 = b.relation
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
