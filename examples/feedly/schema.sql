-- The Feedly example's own tables (pgstagechain adds only its trigger and indexes to
-- jobs_variants, plus its schema "pgstagechain"). Safe to run again: nothing is dropped.

-- Images produced by the upstream generator, one per variant.
CREATE TABLE IF NOT EXISTS img_assets (
    img_asset_id text PRIMARY KEY,
    tenant_id    text NOT NULL,
    path         text NOT NULL,
    product      text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- One ad request. current_step/status mirror the job-level stages once they run.
CREATE TABLE IF NOT EXISTS jobs (
    job_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    text NOT NULL,
    current_step text NOT NULL DEFAULT 'img_gen',
    status       text NOT NULL DEFAULT 'running',
    product      text,
    ad_copy      text NOT NULL,
    out_dir      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- One candidate image of a job: the table the pipeline runs on.
CREATE TABLE IF NOT EXISTS jobs_variants (
    job_variants_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          bigint NOT NULL REFERENCES jobs,
    img_asset_id    text NOT NULL REFERENCES img_assets,
    tenant_id       text NOT NULL,
    current_step    text NOT NULL DEFAULT 'img_gen',
    status          text NOT NULL DEFAULT 'running',
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION feedly_touch_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END; $$ LANGUAGE plpgsql;

CREATE OR REPLACE TRIGGER jobs_variants_touch BEFORE UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION feedly_touch_updated_at();

-- The final Instagram post: exactly one per job (instagram_feed_gen writes it in the
-- transaction that completes the stage).
CREATE TABLE IF NOT EXISTS posts (
    post_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id            bigint NOT NULL UNIQUE REFERENCES jobs,
    tenant_id         text NOT NULL,
    chosen_variant_id bigint NOT NULL REFERENCES jobs_variants,
    feed_image        text NOT NULL,
    caption_ko        text NOT NULL,
    hashtags          text[] NOT NULL,
    record            jsonb NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
