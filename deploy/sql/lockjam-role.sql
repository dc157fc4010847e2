-- The least-privilege role lockjam connects as. Idempotent: run it again at
-- any time, for instance to turn the policy's grant on or off.
--
--   psql -v ON_ERROR_STOP=1 -f deploy/sql/lockjam-role.sql            # watch only
--   psql -v ON_ERROR_STOP=1 -v policy=on -f deploy/sql/lockjam-role.sql  # and act
--
-- Run it as a superuser, or on RDS/Cloud SQL as the admin role (which may
-- grant pg_monitor and pg_signal_backend). It sets no password: add one with
-- \password lockjam, or use your platform's IAM or certificate login.
--
-- pg_monitor lets lockjam see every session's state and query text, and
-- read pg_locks. pg_signal_backend lets the policy cancel and terminate
-- other roles' sessions (never a superuser's): grant it only when the
-- policy is on. The role owns nothing and can change nothing.

\if :{?policy}
\else
\set policy off
\endif

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'lockjam') THEN
        CREATE ROLE lockjam LOGIN;
    END IF;
END
$$;

ALTER ROLE lockjam LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION INHERIT;
-- lockjam's own sessions set tighter timeouts; these bound anyone else's use of the role.
ALTER ROLE lockjam SET statement_timeout = '5s';
ALTER ROLE lockjam SET lock_timeout = '1s';

DO $$
BEGIN
    IF NOT pg_catalog.pg_has_role('lockjam', 'pg_monitor', 'MEMBER') THEN
        GRANT pg_monitor TO lockjam;
    END IF;
END
$$;

\if :policy
DO $$
BEGIN
    IF NOT pg_catalog.pg_has_role('lockjam', 'pg_signal_backend', 'MEMBER') THEN
        GRANT pg_signal_backend TO lockjam;
    END IF;
END
$$;
\else
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_auth_members m
               WHERE m.roleid = 'pg_signal_backend'::regrole AND m.member = 'lockjam'::regrole) THEN
        REVOKE pg_signal_backend FROM lockjam;
    END IF;
END
$$;
\endif
