"""A schema-driven fuzz run against the live ASGI server: no request makes it answer 5xx.

Schemathesis reads /api/schema/ from the server and sends each operation
examples that fit the schema and examples that do not, some aimed at rows that
exist: as staff (the widest access), and as a viewer, who changes nothing.
Bounded in count and in time.
"""
import time
import uuid

import pytest
import redis
import schemathesis
from django.contrib.auth.models import User
from django.utils import timezone
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from webui.api.authentication import new_token
from webui.models import Datastore, Disk, Host, Image, Job, Schedule

EXAMPLES_PER_OPERATION = 10  # about 20 operations: some 200 requests
# A viewer's changes are refused before their bodies are read: less to try.
TIME_BUDGET_SECONDS = {"staff": 120, "viewer": 60}
READS = ("GET ", "HEAD ", "OPTIONS ")
# The fewest requests that count as a fuzz run (the time budget may cut it short).
MINIMUM_REQUESTS = 60


@pytest.fixture
def lab():
    """Rows for the fuzzer to aim at, on a host whose queue nothing else uses."""
    host = Host.objects.create(name=f"fuzz-{uuid.uuid4().hex[:8]}", last_seen=timezone.now())
    disk = Disk.objects.create(host=host, stable_id=f"{host.name}-disk", size=1 << 30,
                               path="/dev/fuzz0")
    datastore = Datastore.objects.create(path=f"/srv/{host.name}")
    image = Image.objects.create(disk=disk, datastore=datastore, stamp="2026-12-01T00-00-00Z",
                                 path=f"/srv/{host.name}/images/x/2026-12-01T00-00-00Z",
                                 size=1 << 30, created=timezone.now())
    return {
        "/api/hosts/": host.pk, "/api/disks/": disk.pk, "/api/datastores/": datastore.pk,
        "/api/images/": image.pk,
        "/api/jobs/": Job.objects.create(kind="verify", host=host, image=image).pk,
        "/api/schedules/": Schedule.objects.create(disk=disk, datastore=datastore).pk,
        "queue": host.queue,
    }


@pytest.fixture
def tokens():
    return {"staff": new_token(User.objects.create_user("alice", password="fuzz-password-1",
                                                        is_staff=True)),
            "viewer": new_token(User.objects.create_user("bob", password="fuzz-password-2"))}


@pytest.fixture
def forget_queue(redis_url, lab):
    """Jobs the fuzzer starts wait in their host's queue; no worker will come for them."""
    yield
    client = redis.Redis.from_url(redis_url)
    client.delete(lab["queue"])
    client.close()


def strategy_for(operation, lab):
    """Valid examples at existing rows and anywhere, and examples outside the schema."""
    strategies = [operation.as_strategy(), operation.as_strategy(GenerationMode.NEGATIVE)]
    row = next((pk for prefix, pk in lab.items() if operation.path.startswith(prefix)), None)
    if row is not None and "{id}" in operation.path:
        strategies.append(operation.as_strategy(path_parameters={"id": str(row)}))
    return st.one_of(strategies)


@pytest.mark.parametrize("role", ["staff", "viewer"])
def test_no_request_makes_the_server_fail(role, live_server_process, lab, tokens, forget_queue):
    base_url = live_server_process.url
    auth = {"Authorization": f"Token {tokens[role]}", "Accept": "application/json"}
    schema = schemathesis.openapi.from_url(f"{base_url}/api/schema/", headers=auth, timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18, [operation.label for operation in operations]

    deadline = time.monotonic() + TIME_BUDGET_SECONDS[role]
    sent = []
    for operation in operations:
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy_for(operation, lab))
        def fuzz(case):
            if time.monotonic() > deadline:
                return
            response = case.call_and_validate(base_url=base_url, headers=auth, timeout=30,
                                              checks=[not_a_server_error])
            sent.append((operation.label, response.status_code))

        fuzz()

    print(f"as {role}: {len(sent)} requests, {len(operations)} operations, statuses "
          f"{sorted({status for _, status in sent})}")
    assert len(sent) >= MINIMUM_REQUESTS, f"only {len(sent)} requests in the time budget"
    assert {label for label, _ in sent} == {operation.label for operation in operations}
    if role == "viewer":
        assert not [(label, status) for label, status in sent
                    if not label.startswith(READS) and status < 400], "a viewer changed something"
    assert live_server_process.alive()
    assert "Traceback" not in live_server_process.log(), live_server_process.log()[-3000:]
