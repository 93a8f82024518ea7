import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="Job",
            fields=[
                ("job_id", models.BigIntegerField(primary_key=True, serialize=False)),
                ("tenant_id", models.TextField()),
                ("feed", models.TextField(null=True)),
            ],
            options={"db_table": "jobs"},
        ),
        migrations.CreateModel(
            name="Variant",
            fields=[
                ("job_variants_id", models.BigIntegerField(primary_key=True, serialize=False)),
                ("tenant_id", models.TextField()),
                ("current_step", models.TextField(default="img_gen")),
                ("status", models.TextField(default="running")),
                ("score", models.FloatField(null=True)),
                (
                    "job",
                    models.ForeignKey(
                        db_column="job_id",
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="variants",
                        to="ads.job",
                    ),
                ),
            ],
            options={"db_table": "jobs_variants"},
        ),
    ]
