"""The pages: each view loads what it shows (through pages.py) or calls one service.

Jobs that the JSON API starts (backup, restore, verify, cancel) are started by
the pages' JavaScript through the API; the rest (export, delete, gc, verifying
a datastore, schedules) are forms posted here. Only staff may change anything.
/metrics, what Prometheus scrapes, is the one view that also takes API tokens.
"""
from __future__ import annotations

import functools
import ipaddress
import re
import tempfile
import zoneinfo
from typing import Optional
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import (FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseBadRequest,
                         JsonResponse, StreamingHttpResponse)
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.http import content_disposition_header
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from django.views.defaults import permission_denied
from drf_spectacular.utils import extend_schema
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import generate_latest
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import BasePermission
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.views import APIView

from . import pages, services
from .forms import ExportForm, ScheduleForm
from .logins import client_address
from .models import (BootTest, Datastore, Disk, Host, Image, Job, Schedule, validate_cron,
                     validate_timezone)
from .payloads import JobSerializer
from .services.metrics import REGISTRY


def staff_required(view):
    """Logged in (else to the login page) and staff (else 403). The 403 page is answered
    rather than PermissionDenied raised, which Django logs with a traceback: a viewer
    following a link is no error of the server's."""
    @login_required
    @functools.wraps(view)
    def checked(request: HttpRequest, *args, **kwargs):
        if not request.user.is_staff:
            return permission_denied(
                request, PermissionDenied("only staff may start jobs or change schedules"))
        return view(request, *args, **kwargs)
    return checked


@login_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "webui/dashboard.html", pages.dashboard())


@login_required
@require_GET
def disk_detail(request: HttpRequest, pk: int) -> HttpResponse:
    disk = get_object_or_404(pages.with_last_image(Disk.objects.all()), pk=pk)
    pages.disks_with_status([disk])
    history = pages.disk_history(disk, request.GET.get("page"))
    return render(request, "webui/disk.html", {
        "disk": disk, "history": history, "chart": pages.history_chart(disk),
        "job": pages.latest_job(disk), "schedule": disk.backup_schedule(),
        "local_host": settings.HOST_NAME,
    })


@staff_required
@require_GET
def image_restore(request: HttpRequest, pk: int) -> HttpResponse:
    """The guarded restore: as a fragment for the disk page's dialog, or as a page of its own."""
    image = get_object_or_404(Image.objects.select_related("disk__host", "datastore"), pk=pk)
    targets = pages.restore_targets(image)
    chosen = next((target for target in targets if target.suitable), None)
    template = "webui/_restore_form.html" if "fragment" in request.GET else "webui/restore.html"
    return render(request, template, {"image": image, "targets": targets, "chosen": chosen})


@staff_required
@require_GET
def image_restore_partition(request: HttpRequest, pk: int) -> HttpResponse:
    """The guarded restore of one partition, as a fragment for the disk page's dialog."""
    image = get_object_or_404(Image.objects.select_related("disk__host", "datastore"), pk=pk)
    partitions = services.files.partitions(image, volumes=False)
    if not partitions:
        return HttpResponseBadRequest("the image holds no partition table: restore it whole",
                                      content_type="text/plain; charset=utf-8")
    # Each disk with why it cannot be a target but for its size: the page checks that
    # against the partition chosen, the service again when the restore is asked for.
    targets = pages.restore_targets(Image(disk=image.disk, size=0))
    return render(request, "webui/_restore_partition_form.html",
                  {"image": image, "partitions": partitions, "targets": targets})


@login_required
@require_GET
def image_files(request: HttpRequest, pk: int, partition: str | None = None) -> HttpResponse:
    """The file browser: the image's partitions, or one folder of one of them."""
    image = get_object_or_404(Image.objects.select_related("disk__host", "datastore"), pk=pk)
    context = {"image": image, "partitions": services.files.partitions(image)}
    if partition is None:
        return render(request, "webui/files.html", context)
    try:
        folder = services.files.browse(image, partition, _one_value(request, "path"),
                                       request.user.pk)
    except services.files.BadPath as bad:
        return HttpResponseBadRequest(str(bad), content_type="text/plain; charset=utf-8")
    except services.files.TooMany as busy:
        wait = ("Wait for one of them to finish, then reload this page." if busy.for_user
                else f"Reload this page in {busy.retry_after} seconds.")
        return _too_many(busy, render(request, "webui/files.html",
                                      {**context, "problem": f"{busy} {wait}"}))
    except services.Refused as refused:
        return render(request, "webui/files.html", {**context, "problem": str(refused)},
                      status=404)
    return render(request, "webui/files.html", {**context, "folder": folder})


@staff_required
@require_GET
def image_file_download(request: HttpRequest, pk: int, partition: str) -> HttpResponse:
    """A file as itself, a folder as a tar archive streamed as it is written."""
    image = get_object_or_404(Image.objects.select_related("datastore"), pk=pk)
    try:
        download = services.files.download(image, partition, _one_value(request, "path"),
                                           request.user.pk)
    except services.files.BadPath as bad:
        return HttpResponseBadRequest(str(bad), content_type="text/plain; charset=utf-8")
    except services.files.TooMany as busy:
        wait = ("Try again once one of them has finished." if busy.for_user
                else f"Try again in {busy.retry_after} seconds.")
        return _too_many(busy, HttpResponse(f"{busy} {wait}",
                                            content_type="text/plain; charset=utf-8"))
    except services.Refused as refused:
        return HttpResponse(str(refused), status=404, content_type="text/plain; charset=utf-8")
    headers = {"Content-Disposition": content_disposition_header(True, download.name)}
    if download.size is not None:
        headers["Content-Length"] = str(download.size)
    return StreamingHttpResponse(download, content_type=download.content_type, headers=headers)


def _too_many(busy: services.files.TooMany, response: HttpResponse) -> HttpResponse:
    """429 with how long to wait: never a 5xx, and never a request left waiting for a slot."""
    response.status_code = 429
    response.headers["Retry-After"] = str(busy.retry_after)
    return response


def _one_value(request: HttpRequest, name: str):
    """A query parameter given at most once (a list otherwise, which the check refuses)."""
    values = request.GET.getlist(name)
    return values[0] if len(values) == 1 else ("" if not values else values)


@staff_required
@require_POST
def image_export(request: HttpRequest, pk: int) -> HttpResponse:
    image = get_object_or_404(Image.objects.select_related("disk__host", "datastore"), pk=pk)
    form = ExportForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Not exported: {form.problems()}")
        return redirect("disk", image.disk_id)
    try:
        job = services.start_export(image, user=request.user, **form.cleaned_data)
    except services.Refused as refused:
        messages.error(request, f"Not exported: {refused}")
        return redirect("disk", image.disk_id)
    return redirect("job", job.pk)


@staff_required
@require_POST
def image_delete(request: HttpRequest, pk: int) -> HttpResponse:
    image = get_object_or_404(Image.objects.select_related("disk__host", "datastore"), pk=pk)
    taken = timezone.localtime(image.created).strftime("%Y-%m-%d %H:%M")
    try:
        services.delete_image(image)
    except services.Refused as refused:
        messages.error(request, f"Not deleted: {refused}")
    else:
        messages.success(request, f"Deleted the image of {taken}. Its chunks are freed by the "
                                  "next garbage collection unless another image shares them.")
    return redirect("disk", image.disk_id)


def _png(picture: Optional[bytes], what: str) -> HttpResponse:
    if not picture:
        raise Http404(f"no {what}")
    response = HttpResponse(bytes(picture), content_type="image/png")
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def image_boot_screen(request: HttpRequest, pk: int) -> HttpResponse:
    """The last screen of the image's last boot test."""
    image = get_object_or_404(Image, pk=pk)
    test = BootTest.objects.filter(image=image).only("screenshot").first()
    return _png(test.screenshot if test else None, "boot test of this image")


@login_required
@require_GET
def job_screen(request: HttpRequest, pk: int) -> HttpResponse:
    """A boot test's screen: live while it runs, then its last."""
    job = get_object_or_404(Job, pk=pk)
    if job.is_active:
        return _png(services.live_screen.screen(job), "screen yet")
    test = BootTest.objects.filter(job=job).only("screenshot").first()
    return _png(test.screenshot if test else None, "screen of this job")


@login_required
@require_GET
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(pages.jobs_with_subjects(Job.objects.select_related(
        "requested_by", "schedule")), pk=pk)
    image = job.image
    total = image.size if image is not None else (job.progress or {}).get("total") or 0
    return render(request, "webui/job.html", {
        "job": job, "kind": services.registry.KINDS[job.kind], "job_data": JobSerializer(job).data,
        "log": pages.job_log(job),
        "subject": pages.job_subject_disk(job),
        "bad_marks": pages.bad_strip(image.bad_ranges if image is not None else [], total),
        "bad_total": total, "stalled_since": (job.progress_moved_at or job.started)
        if job.is_stalled() else None,
        **pages.job_timing(job),
    })


@login_required
@require_GET
def schedules(request: HttpRequest) -> HttpResponse:
    unscheduled = (Disk.objects.filter(present=True).exclude(schedules__kind=Schedule.Kind.BACKUP)
                   .select_related("host"))
    return render(request, "webui/schedules.html", {
        "schedules": pages.schedules_with_next_run(), "unscheduled": list(unscheduled),
    })


def _row_id(text: str) -> Optional[int]:
    """A row id given in a query or a form, or None: what the `id` URL converter takes."""
    return int(text) if re.fullmatch(r"[0-9]{1,18}", text) else None


@staff_required
def schedule_new(request: HttpRequest) -> HttpResponse:
    disk_id = _row_id(request.GET.get("disk", ""))
    disk = Disk.objects.filter(pk=disk_id).first() if disk_id is not None else None
    return _schedule_form(request, Schedule(disk=disk, datastore=_default_datastore(disk)))


@staff_required
def schedule_edit(request: HttpRequest, pk: int) -> HttpResponse:
    schedule = get_object_or_404(Schedule.objects.select_related("disk__host", "datastore"), pk=pk)
    if request.method == "POST" and "delete" in request.POST:
        schedule.delete()
        messages.success(request,
                         f"Deleted the schedule “{pages.describe_cron(schedule.cron)}”.")
        return redirect("schedules")
    return _schedule_form(request, schedule)


def _schedule_form(request: HttpRequest, schedule: Schedule) -> HttpResponse:
    if request.method not in ("GET", "POST"):
        return HttpResponse(status=405, headers={"Allow": "GET, POST"})
    form = ScheduleForm(request.POST or None, instance=schedule)
    if request.method == "POST" and "send_test" in request.POST:
        urls = form.notification_urls()
        if not urls:
            messages.error(request, "Enter at least one notification URL to test.")
        elif services.notify("Test from Disk imaging",
                             "Notifications of this schedule's disk arrive here.", urls):
            messages.success(request, f"Sent a test notification to {len(urls)} URL(s).")
        else:
            messages.error(request, "The test notification could not be sent: check the URLs "
                                    "(Apprise's format) and the server's log.")
    elif request.method == "POST" and form.is_valid():
        schedule = form.save_and_sync()
        messages.success(request, f"Saved: {pages.describe_cron(schedule.cron)}"
                                  f"{'' if schedule.enabled else ' (off)'}.")
        return redirect("schedules")
    return render(request, "webui/schedule_form.html", {
        "form": form, "schedule": schedule, "presets": pages.CRON_PRESETS,
        "preview": _preview(form["cron"].value() or "", form["time_zone"].value() or "UTC"),
    })


def _default_datastore(disk) -> Datastore:
    schedule = disk.backup_schedule() if disk is not None else None
    return schedule.datastore if schedule is not None else (
        Datastore.objects.folders().first() or services.default_datastore())


@login_required
@require_GET
def schedule_preview(request: HttpRequest) -> JsonResponse:
    """What the schedule form shows beside the cron field as it is typed."""
    return JsonResponse(_preview(request.GET.get("cron", ""), request.GET.get("time_zone", "UTC")))


def _preview(cron: str, time_zone: str) -> dict:
    try:
        validate_cron(cron)
        validate_timezone(time_zone)
    except ValidationError as invalid:
        return {"description": "", "next_runs": [], "error": " ".join(invalid.messages)}
    runs = Schedule(cron=cron, time_zone=time_zone).next_runs(timezone.now(), 5)
    zone = zoneinfo.ZoneInfo(time_zone)
    return {"description": pages.describe_cron(cron), "error": "",
            "next_runs": [{"iso": run.isoformat(),
                           "text": run.astimezone(zone).strftime("%a %Y-%m-%d %H:%M %Z")}
                          for run in runs]}


@login_required
@require_GET
def datastores(request: HttpRequest) -> HttpResponse:
    return render(request, "webui/datastores.html", {"datastores": pages.datastores()})


@staff_required
@require_POST
def datastore_gc(request: HttpRequest, pk: int) -> HttpResponse:
    datastore = get_object_or_404(Datastore, pk=pk)
    try:
        job = services.start_gc(datastore, request.user)
    except services.Refused as refused:
        messages.error(request, f"No garbage collection: {refused}")
        return redirect("datastores")
    return redirect("job", job.pk)


@staff_required
@require_POST
def datastore_verify(request: HttpRequest, pk: int) -> HttpResponse:
    datastore = get_object_or_404(Datastore, pk=pk)
    try:
        jobs = services.start_verify_latest(datastore, request.user)
    except services.Refused as refused:
        messages.error(request, f"Not verified: {refused}")
        return redirect("datastores")
    if len(jobs) == 1:
        return redirect("job", jobs[0].pk)
    if jobs:
        messages.success(request, f"Verifying the newest image of {len(jobs)} disks: the "
                                  "dashboard shows their progress.")
    else:
        messages.info(request, "Nothing to verify: the datastore holds no images.")
    return redirect("datastores")


@staff_required
@require_POST
def datastore_add_remote(request: HttpRequest) -> HttpResponse:
    try:
        store = services.add_remote(request.POST.get("path", ""),
                                    label=request.POST.get("label", ""),
                                    offsite=request.POST.get("offsite") == "on",
                                    bwlimit=request.POST.get("bwlimit", ""))
    except services.Refused as refused:
        messages.error(request, f"No remote added: {refused}")
        return redirect("datastores")
    messages.success(request, f"Added {store}: copy a datastore to it with a copy schedule, "
                              "or with Copy now below.")
    return redirect("datastores")


@staff_required
@require_POST
def datastore_sync(request: HttpRequest, pk: int) -> HttpResponse:
    """Copy the datastore now to the one the form names."""
    source = get_object_or_404(Datastore, pk=pk)
    destination_id = _row_id(request.POST.get("destination", ""))
    destination = (Datastore.objects.filter(pk=destination_id).first()
                   if destination_id is not None else None)
    if destination is None:
        messages.error(request, "No copy: choose the datastore to copy to.")
        return redirect("datastores")
    try:
        job = services.start_sync(source, destination, request.user)
    except services.Refused as refused:
        messages.error(request, f"No copy: {refused}")
        return redirect("datastores")
    return redirect("job", job.pk)


@login_required
@require_GET
def hosts(request: HttpRequest) -> HttpResponse:
    return render(request, "webui/hosts.html", {"hosts": pages.hosts_with_disks()})


@staff_required
@require_POST
def host_invite(request: HttpRequest) -> HttpResponse:
    """A join command for another host, shown once on the Hosts page."""
    try:
        invitation = services.hosts.invite(request.POST.get("name", "").strip(), request.user)
    except services.Refused as refused:
        messages.error(request, f"No join command: {refused}")
        return redirect("hosts")
    return render(request, "webui/hosts.html", {
        "hosts": pages.hosts_with_disks(), "invitation": invitation,
        "join_command": invitation.command(services.hosts.server_url(request))})


@staff_required
@require_POST
def host_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    host = get_object_or_404(Host, pk=pk)
    try:
        services.hosts.revoke(host)
    except services.Refused as refused:
        messages.error(request, f"Not revoked: {refused}")
    else:
        messages.success(request, f"Host {host.name} can no longer reach Redis or the catalog; "
                                  "its queued jobs are cancelled.")
    return redirect("hosts")


# --- what a joining host fetches: its join token is its only credential ---------------

@require_GET
def join_script(request: HttpRequest, token: str) -> HttpResponse:
    """The script `curl ... | sudo sh` runs; a token that opens nothing gets a script that
    says why and exits 1 (a 404 all the same)."""
    try:
        access = services.hosts.invitation(token)
    except services.Refused as refused:
        return _shell(services.hosts.refusal_script(str(refused)), status=404)
    return _shell(services.hosts.join_script(access, services.hosts.server_url(request), token))


@require_GET
def join_bundle(request: HttpRequest, token: str) -> HttpResponse:
    try:
        services.hosts.invitation(token)
    except services.Refused as refused:
        return _plain(f"{refused}\n", status=404)
    bundle = tempfile.TemporaryFile(dir=settings.DATA_DIR)
    services.hosts.write_bundle(bundle)
    bundle.seek(0)
    return FileResponse(bundle, as_attachment=True, filename="imaging-worker.tar")


@csrf_exempt  # no session or cookie here: the token in the path is the credential
@require_POST
def join_settings(request: HttpRequest, token: str) -> HttpResponse:
    address = urlsplit(f"//{request.get_host()}").hostname or ""
    try:
        return _plain(services.hosts.claim(token, address))
    except services.Refused as refused:
        return _plain(f"{refused}\n", status=403)


# --- what Prometheus scrapes ---------------------------------------------------------

class StaffOrAllowedAddress(BasePermission):
    """Staff, by session or API token as the API knows them, or a client whose address is in
    METRICS_ALLOWED_ADDRESSES: a Prometheus server need hold no credential."""

    message = "only staff, or an address in METRICS_ALLOWED_ADDRESSES, may read the metrics"

    def has_permission(self, request: Request, view) -> bool:
        return request.user.is_staff or _address_allowed(client_address(request))


def _address_allowed(address: str | None) -> bool:
    try:
        client = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    # A dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d.
    client = getattr(client, "ipv4_mapped", None) or client
    return any(client in ipaddress.ip_network(allowed)
               for allowed in settings.METRICS_ALLOWED_ADDRESSES)


class WhateverIsAccepted(BaseContentNegotiation):
    """The text format to every scraper: Telegraf, for one, accepts only protobuf or
    text/plain, which DRF's negotiation would answer 406."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


@extend_schema(exclude=True)  # Prometheus' text format, not the JSON API
class MetricsView(APIView):
    """The catalog in Prometheus' text format, read afresh at each scrape (services.metrics)."""

    permission_classes = [StaffOrAllowedAddress]
    renderer_classes = [JSONRenderer]  # refusals, as the API words them
    content_negotiation_class = WhateverIsAccepted

    def get(self, request: Request) -> HttpResponse:
        return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST,
                            headers={"Cache-Control": "no-store"})


def _shell(script: str, status: int = 200) -> HttpResponse:
    return HttpResponse(script, status=status, content_type="text/x-shellscript; charset=utf-8",
                        headers={"Cache-Control": "no-store"})


def _plain(text: str, status: int = 200) -> HttpResponse:
    return HttpResponse(text, status=status, content_type="text/plain; charset=utf-8",
                        headers={"Cache-Control": "no-store"})
