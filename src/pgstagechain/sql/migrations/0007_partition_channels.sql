-- Groups are announced on the channel of their key's partition, as rows are: the channel
-- `pgstagechain_<pipeline>.<n>` with n = hashtext(group key) & 63 (PARTITIONS - 1 in
-- _pipeline.py), which only the worker that owns partition n listens to.
CREATE OR REPLACE FUNCTION pgstagechain.notify_group_done() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'done' AND (TG_OP = 'INSERT'
            OR OLD.step IS DISTINCT FROM NEW.step OR OLD.status IS DISTINCT FROM NEW.status) THEN
        PERFORM pg_notify('pgstagechain_' || NEW.pipeline || '.' || (hashtext(NEW.group_key) & 63),
                          json_build_array('g', NEW.step, NEW.group_key, NEW.group_key)::text);
    END IF;
    RETURN NULL;
END
$$;
