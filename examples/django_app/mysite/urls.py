from ads import views
from django.urls import path

urlpatterns = [
    path("jobs/", views.create_job),
    path("status/", views.status),
]
