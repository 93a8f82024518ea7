-- Fewer index updates per run, the hottest write of all.
--
-- Live runs are few (bounded by the workers' concurrency), so the rescuer's scan for
-- expired leases reads the partial unique index of live claims instead of keeping an index
-- on lease_until, which every heartbeat would have to update (now heartbeats can be HOT).
DROP INDEX pgstagechain.runs_lease;

-- Results of earlier stages are looked up per row; most runs return nothing, and this
-- index holds only the runs that returned something.
CREATE INDEX runs_results ON pgstagechain.runs (pipeline, row_key)
    WHERE state = 'succeeded' AND result IS NOT NULL;

-- The run ledger churns: vacuum and analyse it early rather than at 20 % dead rows.
ALTER TABLE pgstagechain.runs SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
