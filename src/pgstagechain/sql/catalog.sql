-- The library's own bookkeeping and what it reads from the system catalogs.

-- name: table_columns
-- the columns of the user's table, with their types as PostgreSQL spells them
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type_name
FROM pg_attribute a
WHERE a.attrelid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))
  AND a.attnum > 0 AND NOT a.attisdropped

-- name: column_type
-- one column's type by its catalog name (int4, uuid, ...) and category (N: numeric, ...)
SELECT t.typname, t.typcategory FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))
  AND a.attname = %(column)s AND NOT a.attisdropped

-- name: schema_exists
SELECT to_regclass('pgstagechain.migrations') IS NOT NULL

-- name: schema_version
SELECT coalesce(max(version), 0) FROM pgstagechain.migrations

-- name: migration_lock
-- many workers starting at once: the second waits, then finds nothing left to do
SELECT pg_advisory_xact_lock(hashtext(%(lock)s))

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS pgstagechain

-- name: create_migrations
CREATE TABLE IF NOT EXISTS pgstagechain.migrations (
    version integer PRIMARY KEY, name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())

-- name: migration_applied
SELECT 1 FROM pgstagechain.migrations WHERE version = %(version)s

-- name: record_migration
INSERT INTO pgstagechain.migrations (version, name) VALUES (%(version)s, %(name)s)

-- name: liveness
-- the cheapest statement: is the connection (and the server) still there?
SELECT 1

-- name: listen
LISTEN {channel_name}

-- name: unlisten
UNLISTEN {channel_name}

-- name: try_session_lock
-- one process of many takes a job (the embedded workers of N web processes)
SELECT pg_try_advisory_lock(hashtext(%(lock)s))
