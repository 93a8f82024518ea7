"""The seed's tables, as Django models: a job and its candidate images (variants)."""

from django.db import models


class Job(models.Model):
    job_id = models.BigIntegerField(primary_key=True)
    tenant_id = models.TextField()
    feed = models.TextField(null=True)  # written by the job-level stage

    class Meta:
        db_table = "jobs"


class Variant(models.Model):
    job_variants_id = models.BigIntegerField(primary_key=True)
    job = models.ForeignKey(Job, models.CASCADE, db_column="job_id", related_name="variants")
    tenant_id = models.TextField()
    # The pipeline's state: which step the variant is at, and how that step went.
    current_step = models.TextField(default="img_gen")
    status = models.TextField(default="running")
    score = models.FloatField(null=True)

    class Meta:
        db_table = "jobs_variants"
