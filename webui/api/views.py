"""The JSON API: each view parses the request and calls one query or one service.

A service that refuses (a busy disk, a target too small...) raises
services.Refused; the exception handler answers it with 400 {"detail": ...},
or 503 for services.Unavailable (Redis down: the job could not be sent).
"""
from __future__ import annotations

from django.db import transaction
from django.db.models import Model, Q
from django.http import HttpResponse, HttpResponseBase
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.serializers import Serializer
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from .. import services
from ..models import Datastore, Disk, Host, Image, Job, Schedule
from ..payloads import JobSerializer
from .authentication import new_token
from .permissions import IsStaffOrReadOnly
from .serializers import (IMAGE_COLUMNS, BackupSerializer, CredentialsSerializer,
                          DatastoreSerializer, DiskSerializer, HostSerializer, ImageSerializer,
                          JobStartedSerializer, NewTokenSerializer,
                          NoParametersSerializer, RestoreSerializer, ScheduleSerializer,
                          image_listing)
from .throttling import LoginThrottle

# The largest id a database column holds: a bigger number in a filter names no row, and
# SQLite would not even take it.
MAX_ID = 2 ** 63 - 1
REFUSED = OpenApiResponse(description="refused, with the reason in `detail`")
UNAVAILABLE = OpenApiResponse(description="Redis, the job queue, did not take the job: it "
                                          "failed, its disk is free; ask again later "
                                          "(Retry-After)")
STARTED = {202: JobStartedSerializer, 400: REFUSED}
SENT = {**STARTED, 503: UNAVAILABLE}  # a new job, whose message goes through Redis


def parse(serializer_class: type[Serializer], data) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def accepted(request: Request, job: Job) -> Response:
    """202: the job is queued (or asked to stop); its state is at the Location."""
    return Response({"job": job.pk}, status=status.HTTP_202_ACCEPTED,
                    headers={"Location": reverse("job-detail", args=[job.pk], request=request)})


class ApiViewSet(viewsets.GenericViewSet):
    permission_classes = [IsStaffOrReadOnly]
    lookup_value_regex = r"[0-9]+"


class CachedListMixin(mixins.ListModelMixin):
    """The list (a page of it) from the cache while the models it is made of are unchanged.

    Keyed by the absolute URL: the query, and the host the page links carry. Not by the
    user: every user who may read a list reads the same one.
    """

    listed_from: tuple[type[Model], ...] = ()

    def list(self, request: Request, *args, **kwargs) -> HttpResponseBase:
        if not isinstance(request.accepted_renderer, JSONRenderer):
            return Response(self.listing(request))  # the browsable API: for people, uncached
        # The JSON itself is cached: a hit then costs no decoding of rows and no rendering.
        body = services.readcache.cached(
            request.build_absolute_uri(), self.listed_from,
            lambda: request.accepted_renderer.render(self.listing(request)).decode())
        return HttpResponse(body, content_type=request.accepted_renderer.media_type)

    def listing(self, request: Request):
        """The page's data, when the cache has none."""
        return super().list(request).data


class HostViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    queryset = Host.objects.all()
    serializer_class = HostSerializer


class DiskViewSet(CachedListMixin, mixins.RetrieveModelMixin, ApiViewSet):
    serializer_class = DiskSerializer
    listed_from = (Host, Disk, Image, Job, Schedule)  # what protection() reads

    def get_queryset(self):
        return Disk.objects.with_protection_facts()

    @extend_schema(request=BackupSerializer, responses=SENT,
                   summary="Back the disk up now")
    @action(detail=True, methods=["post"])
    def backup(self, request: Request, pk=None) -> Response:
        disk = self.get_object()
        job = services.start_backup(disk, request.user, **parse(BackupSerializer,
                                                                 request.data))
        return accepted(request, job)


class ImageFilter(serializers.Serializer):
    disk = serializers.IntegerField(min_value=1, max_value=MAX_ID, required=False,
                                    help_text="only this disk's images (its id)")


@extend_schema(parameters=[ImageFilter])
class ImageViewSet(CachedListMixin, mixins.RetrieveModelMixin, ApiViewSet):
    serializer_class = ImageSerializer
    listed_from = (Image,)

    def get_queryset(self):
        if self.action != "list":
            return Image.objects.select_related("disk__host", "datastore")
        wanted = parse(ImageFilter, self.request.query_params)
        if "disk" in wanted:
            return Image.objects.filter(disk_id=wanted["disk"])
        return Image.objects.all()

    def listing(self, request: Request):
        page = self.paginate_queryset(self.get_queryset().values(*IMAGE_COLUMNS))
        return self.get_paginated_response(image_listing(page)).data

    @extend_schema(request=RestoreSerializer, responses=SENT,
                   summary="Write the image onto a disk")
    @action(detail=True, methods=["post"])
    def restore(self, request: Request, pk=None) -> Response:
        image = self.get_object()
        wanted = parse(RestoreSerializer, request.data)
        job = services.start_restore(image, wanted["target_disk"], wanted["confirm"],
                                     request.user, partition=wanted.get("partition"))
        return accepted(request, job)

    @extend_schema(request=NoParametersSerializer, responses=SENT,
                   summary="Re-hash every chunk of the image")
    @action(detail=True, methods=["post"])
    def verify(self, request: Request, pk=None) -> Response:
        image = self.get_object()
        parse(NoParametersSerializer, request.data)
        return accepted(request, services.start_verify(image, request.user))

    @extend_schema(request=NoParametersSerializer, responses=SENT,
                   summary="Boot the image in a throwaway VM on a worker: does it come up?")
    @action(detail=True, methods=["post"], url_path="boot-test")
    def boot_test(self, request: Request, pk=None) -> Response:
        image = self.get_object()
        parse(NoParametersSerializer, request.data)
        return accepted(request, services.start_boot_test(image, request.user))


class JobFilter(serializers.Serializer):
    state = serializers.ChoiceField(choices=Job.State.choices, required=False)
    disk = serializers.IntegerField(min_value=1, max_value=MAX_ID, required=False,
                                    help_text="jobs that read or write this disk (its id)")


@extend_schema(parameters=[JobFilter])
class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    serializer_class = JobSerializer

    def get_queryset(self):
        jobs = Job.objects.select_related("host")
        if self.action == "list":
            wanted = parse(JobFilter, self.request.query_params)
            if "state" in wanted:
                jobs = jobs.filter(state=wanted["state"])
            if "disk" in wanted:
                jobs = jobs.filter(Q(disk_id=wanted["disk"]) | Q(target_disk_id=wanted["disk"]))
        return jobs

    @extend_schema(request=NoParametersSerializer, responses=STARTED,
                   summary="Ask the job to stop (it stops between two chunks)")
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk=None) -> Response:
        job = self.get_object()
        parse(NoParametersSerializer, request.data)
        services.cancel_job(job, request.user)
        return accepted(request, job)


class ScheduleViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin,
                      mixins.CreateModelMixin, mixins.UpdateModelMixin, ApiViewSet):
    # Not a CachedListMixin: its list differs by user (notify_urls for staff only).
    queryset = Schedule.objects.all()
    serializer_class = ScheduleSerializer
    http_method_names = ["get", "post", "patch", "head", "options"]

    def perform_create(self, serializer: ScheduleSerializer) -> None:
        with transaction.atomic():
            services.sync_schedule(serializer.save())

    def perform_update(self, serializer: ScheduleSerializer) -> None:
        with transaction.atomic():
            services.sync_schedule(serializer.save())


class DatastoreViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, ApiViewSet):
    queryset = Datastore.objects.all()
    serializer_class = DatastoreSerializer


class ObtainTokenView(APIView):
    """A new API token for a username and password (throttled; django-axes locks out).

    Each call makes another token, and the ones made before keep working: only their
    hashes are stored, so none can be shown again.
    """

    permission_classes = ()
    throttle_classes = [LoginThrottle]
    throttle_scope = "login"
    # The API's JSON parser: a form, or JSON through DRF's own parser, would skip its checks.
    parser_classes = api_settings.DEFAULT_PARSER_CLASSES
    renderer_classes = [JSONRenderer]

    @extend_schema(request=CredentialsSerializer, responses=NewTokenSerializer,
                   summary="Make an API token with a username and password")
    def post(self, request: Request) -> Response:
        # django-axes flags a locked-out attempt on Django's request, where its middleware
        # looks to answer 429; DRF's wrapper would keep the flag to itself.
        credentials = CredentialsSerializer(data=request.data,
                                          context={"request": request._request})
        credentials.is_valid(raise_exception=True)
        return Response({"token": new_token(credentials.validated_data["user"])})
