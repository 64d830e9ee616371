"""/api/: the resources of the README's API table, the token endpoint and the OpenAPI schema."""
from django.urls import path
from drf_spectacular.views import SpectacularAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("hosts", views.HostViewSet, basename="host")
router.register("disks", views.DiskViewSet, basename="disk")
router.register("images", views.ImageViewSet, basename="image")
router.register("jobs", views.JobViewSet, basename="job")
router.register("schedules", views.ScheduleViewSet, basename="schedule")
router.register("datastores", views.DatastoreViewSet, basename="datastore")

urlpatterns = [
    path("auth/token/", views.ObtainTokenView.as_view(), name="api-token"),
    path("schema/", SpectacularAPIView.as_view(permission_classes=[IsAuthenticated]),
         name="api-schema"),
    *router.urls,
]
