"""Three stages over the variants: analyze (sync), judge (async), and a job-level feed."""

from typing import Any

from ads.models import Variant
from pgstagechain import Pipeline, Retry, StageContext

pipeline = Pipeline(
    "ads",
    table="jobs_variants",
    key="job_variants_id",
    group_column="job_id",
    extra_columns=["tenant_id"],
    start="img_gen",  # the application sets (img_gen, done) when an image is ready
)


@pipeline.stage(after="img_gen", retry=Retry(max_attempts=3))
def analyze(ctx: StageContext[Any]) -> dict[str, Any]:
    # A plain function runs in a thread; ctx.conn is a psycopg connection whose
    # writes commit together with the stage's completion.
    score = (ctx.key % 7) / 7
    ctx.conn.execute(
        "UPDATE jobs_variants SET score = %s WHERE job_variants_id = %s", (score, ctx.key)
    )
    return {"score": score}


@pipeline.stage(after="analyze")
async def judge(ctx: StageContext[Any]) -> dict[str, Any]:
    # The ORM's async methods work here; the worker closes their connection when it stops.
    variant = await Variant.objects.aget(pk=ctx.key)
    return {"keep": variant.score < 0.5}


@pipeline.stage(after="judge", group=True)
async def compose_feed(ctx: StageContext[Any]) -> dict[str, Any]:
    # Runs once per job, when every variant of it has been judged.
    kept = sorted(key for key, results in ctx.members.items() if results["judge"]["keep"])
    await ctx.conn.execute(
        "UPDATE jobs SET feed = %s WHERE job_id = %s", (",".join(kept), int(ctx.key))
    )
    return {"variants": kept}
