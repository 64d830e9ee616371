"""Pages, /metrics, /api/ and /admin/."""
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, register_converter

from . import views


class IdConverter:
    """A row id: a number a database column holds (a longer one is a 404, never a 500)."""

    regex = "[0-9]{1,18}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(IdConverter, "id")

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("disks/<id:pk>/", views.disk_detail, name="disk"),
    path("images/<id:pk>/restore/", views.image_restore, name="restore-image"),
    path("images/<id:pk>/restore-partition/", views.image_restore_partition,
         name="restore-image-partition"),
    path("images/<id:pk>/export/", views.image_export, name="export-image"),
    path("images/<id:pk>/files/", views.image_files, name="image-files"),
    path("images/<id:pk>/files/<str:partition>/", views.image_files, name="image-folder"),
    path("images/<id:pk>/files/<str:partition>/download/", views.image_file_download,
         name="image-file-download"),
    path("images/<id:pk>/delete/", views.image_delete, name="delete-image"),
    path("images/<id:pk>/boot-screen.png", views.image_boot_screen, name="image-boot-screen"),
    path("jobs/<id:pk>/", views.job_detail, name="job"),
    path("jobs/<id:pk>/screen.png", views.job_screen, name="job-screen"),
    path("schedules/", views.schedules, name="schedules"),
    path("schedules/new/", views.schedule_new, name="schedule-new"),
    path("schedules/preview/", views.schedule_preview, name="schedule-preview"),
    path("schedules/<id:pk>/", views.schedule_edit, name="schedule-edit"),
    path("datastores/", views.datastores, name="datastores"),
    path("datastores/<id:pk>/gc/", views.datastore_gc, name="datastore-gc"),
    path("datastores/<id:pk>/verify/", views.datastore_verify, name="datastore-verify"),
    path("datastores/<id:pk>/sync/", views.datastore_sync, name="datastore-sync"),
    path("datastores/remotes/", views.datastore_add_remote, name="datastore-add-remote"),
    path("hosts/", views.hosts, name="hosts"),
    path("hosts/join/", views.host_invite, name="host-invite"),
    path("hosts/<id:pk>/revoke/", views.host_revoke, name="host-revoke"),
    path("join/<str:token>/", views.join_script, name="join-script"),
    path("join/<str:token>/bundle.tar", views.join_bundle, name="join-bundle"),
    path("join/<str:token>/settings", views.join_settings, name="join-settings"),
    path("metrics", views.MetricsView.as_view(), name="metrics"),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True),
         name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/", include("webui.api.urls")),
]
