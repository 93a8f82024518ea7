-- Rows and groups are announced on the channel of their key's partition,
-- `pgstagechain_<pipeline>.<n>` with n = hashtext(key) & 63 (PARTITIONS - 1 in
-- _pipeline.py), which only the worker that owns partition n listens to. The one function
-- below names that channel for the row triggers, the groups trigger and the recovery's
-- re-sent notifications alike (a plain SQL expression: inlined where it is called).
CREATE FUNCTION pgstagechain.partition_channel(channel text, key text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT channel || '.' || (hashtext(key) & 63)::text $$;

CREATE OR REPLACE FUNCTION pgstagechain.notify_group_done() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'done' AND (TG_OP = 'INSERT'
            OR OLD.step IS DISTINCT FROM NEW.step OR OLD.status IS DISTINCT FROM NEW.status) THEN
        PERFORM pg_notify(pgstagechain.partition_channel('pgstagechain_' || NEW.pipeline,
                                                         NEW.group_key),
                          json_build_array('g', NEW.step, NEW.group_key, NEW.group_key)::text);
    END IF;
    RETURN NULL;
END
$$;
