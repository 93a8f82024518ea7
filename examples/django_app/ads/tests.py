"""The pipeline in Django's own test runner: ``python manage.py test ads``."""

from django.test import TransactionTestCase

from ads.models import Job, Variant
from pgstagechain.contrib.django import run_until_idle


class PipelineTests(TransactionTestCase):
    # A TransactionTestCase: the worker must see the rows, so they are really committed.

    def test_a_job_runs_to_its_feed(self) -> None:
        job = Job.objects.create(job_id=7, tenant_id="t")
        for n in (1, 2, 3):
            Variant.objects.create(job_variants_id=700 + n, job=job, tenant_id="t", status="done")
        (stats,) = run_until_idle(scan_interval=0.2)
        self.assertEqual(stats.failed, 0)
        self.assertEqual(
            sorted(Variant.objects.values_list("current_step", "status").distinct()),
            [("judge", "done")],
        )
        job.refresh_from_db()
        self.assertEqual(job.feed, "701,702,703")  # scores 1/7, 2/7, 3/7: all kept
