-- Names of relations, in the database this session is connected to
-- (pg_class is per database). A catalog lookup: no user table is touched.
-- $1: relation oids.
SELECT c.oid, n.nspname::pg_catalog.text AS nspname, c.relname::pg_catalog.text AS relname
FROM pg_catalog.pg_class AS c
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.oid = ANY ($1::pg_catalog.oid[])
