-- The relation a preflight names, in the session's database: by its
-- qualified name as SQL reads it ($1, e.g. public.orders or
-- "Sales"."Order Lines"), else, for a bare name ($2), every relation of
-- that name outside the system schemas (more than one: ambiguous).
SELECT c.oid::pg_catalog.int8 AS oid,
       n.nspname::pg_catalog.text AS schema,
       c.relname::pg_catalog.text AS name
FROM pg_catalog.pg_class AS c
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.oid = pg_catalog.to_regclass($1)
   OR ($2::pg_catalog.text IS NOT NULL
       AND c.relname = $2
       AND c.relkind = ANY ('{r,p,v,m,f}'::pg_catalog."char"[])
       AND n.nspname <> ALL ('{pg_catalog,information_schema}'::pg_catalog.name[])
       AND n.nspname !~ '^pg_(toast|temp)')
ORDER BY 2, 3
