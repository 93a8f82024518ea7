"""Create a job (its variants released inside one transaction) and read the pipeline's status."""

import json
from typing import Any

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from psycopg import AsyncConnection

from ads.models import Job, Variant
from ads.pipeline import pipeline
from pgstagechain.contrib import pipeline_status
from pgstagechain.contrib.django import conninfo


@csrf_exempt
@require_POST
def create_job(request: HttpRequest) -> JsonResponse:
    body: dict[str, Any] = json.loads(request.body)
    job_id, variants = int(body["job_id"]), int(body.get("variants", 3))
    # The trigger's NOTIFY is part of this transaction: the worker hears of the variants
    # when it commits, never before (and never, if it rolls back).
    with transaction.atomic():
        job = Job.objects.create(job_id=job_id, tenant_id=body.get("tenant_id", "demo"))
        Variant.objects.bulk_create(
            Variant(job_variants_id=job_id * 100 + n, job=job, tenant_id=job.tenant_id)
            for n in range(1, variants + 1)
        )
        Variant.objects.filter(job=job).update(status="done")  # (img_gen, done): go
    return JsonResponse({"job_id": job_id, "variants": variants}, status=201)


@require_GET
async def status(request: HttpRequest) -> JsonResponse:
    async with await AsyncConnection.connect(conninfo(), autocommit=True) as conn:
        return JsonResponse(await pipeline_status(conn, pipeline))
