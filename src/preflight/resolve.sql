-- The relation a preflight names, in the session's database, by its
-- schema ($1, NULL for a bare name) and name ($2), both as stored (the
-- caller folds unquoted names to lower case, as PostgreSQL does). A bare
-- name matches every relation of that name outside the system schemas
-- (more than one: ambiguous). Matched in the catalogs, not through
-- to_regclass, which needs USAGE on the schema: pg_monitor may read every
-- schema's catalog rows without it. Only the kinds a migration locks:
-- tables (plain, partitioned, foreign), views, materialized views,
-- indexes and sequences.
SELECT c.oid::pg_catalog.int8 AS oid,
       n.nspname::pg_catalog.text AS schema,
       c.relname::pg_catalog.text AS name
FROM pg_catalog.pg_class AS c
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relname = $2
  AND c.relkind = ANY ('{r,p,v,m,f,i,I,S}'::pg_catalog."char"[])
  AND CASE WHEN $1::pg_catalog.text IS NOT NULL THEN n.nspname = $1
           ELSE n.nspname <> ALL ('{pg_catalog,information_schema}'::pg_catalog.name[])
                AND n.nspname !~ '^pg_(toast|temp)'
      END
ORDER BY 2, 3
