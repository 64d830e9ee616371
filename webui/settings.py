"""Django settings, read from the environment through webui.env.

Which process acts on which variable: docs/architecture.md, The environment.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import (env_bool, env_float, env_int, env_list, env_networks, env_path, env_secret,
                  env_str, private_directory, refuse_placeholder, stored_secret)

BASE_DIR = Path(__file__).resolve().parent.parent

# Everything this system writes (database, logs, Redis' files, secrets, exports, datastore) is
# its user's alone: another local user must not read a disk's image or the tokens that rule it.
os.umask(0o077)

DEBUG = env_bool("DEBUG", False)
# Private to the service's user: the database (API tokens, sessions), logs, Redis' data and the
# secrets below live here.
DATA_DIR = private_directory(env_path("DATA_DIR", BASE_DIR / "data"))
try:
    (DATA_DIR / "static").mkdir(exist_ok=True)
except OSError as exc:
    raise ImproperlyConfigured(f"DATA_DIR={str(DATA_DIR)!r}: cannot create static/ in it "
                               f"({exc.strerror})") from None
# Made on first use when not given, so that every process reading this DATA_DIR (web, worker,
# beat, `manage.py` typed by hand) signs with the same key.
SECRET_KEY = env_secret("SECRET_KEY") or stored_secret(DATA_DIR / "secret_key")
refuse_placeholder("SECRET_KEY", SECRET_KEY)

HOST_NAME = env_str("HOST_NAME", socket.gethostname())
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", f"localhost 127.0.0.1 [::1] {HOST_NAME}")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")
# The reverse proxies whose X-Forwarded-For and X-Forwarded-Proto the web server believes
# (uvicorn's --forwarded-allow-ips); anyone else's are ignored. Empty: no one's.
TRUSTED_PROXIES = env_networks("TRUSTED_PROXIES", "")
# Addresses or networks that may read /metrics with no staff session or API token: a
# Prometheus server's. The peer's address counts, or behind one of TRUSTED_PROXIES the
# client's it names. Empty: no one's.
METRICS_ALLOWED_ADDRESSES = env_networks("METRICS_ALLOWED_ADDRESSES", "")
# Behind TLS (a reverse proxy or not): secure cookies, HSTS, redirects. A request came
# over TLS when uvicorn says so: through a proxy, one of TRUSTED_PROXIES.
HTTPS = env_bool("HTTPS", False)
if HTTPS:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
# Django's database sessions, each row under a hash of its key (the cookie).
SESSION_ENGINE = "webui.sessions"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "drf_spectacular",
    "django_celery_beat",
    "axes",
    "webui",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    # Before anything reads a body: DRF's parsers skip DATA_UPLOAD_MAX_MEMORY_SIZE.
    "webui.api.middleware.ApiBodyLimitMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Answers logins past a username's rate (webui.logins).
    "webui.logins.LoginRateMiddleware",
    # Last, as django-axes asks: it answers locked-out logins itself.
    "axes.middleware.AxesMiddleware",
    # Below all the others, only passing the request on: see its docstring.
    "webui.api.middleware.OneThreadMiddleware",
]

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "webui.logins.UsernameRateBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "webui.urls"
ASGI_APPLICATION = "webui.asgi.application"
WSGI_APPLICATION = "webui.wsgi.application"

TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [BASE_DIR / "templates"],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]

# No persistent connections: under ASGI each request runs in a thread of its own, whose
# connection would outlive it (Django's documentation says as much).
DATABASES = {"default": dj_database_url.parse(
    env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'db.sqlite3'}"), conn_max_age=0)}
refuse_placeholder("the password in DATABASE_URL", DATABASES["default"].get("PASSWORD"))
# Connections each process keeps to PostgreSQL at most: a flood of requests waits its turn
# rather than taking every connection the server has (100 by default) and failing the rest.
DATABASE_POOL_SIZE = env_int("DATABASE_POOL_SIZE", 20, minimum=2)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1, "max_size": DATABASE_POOL_SIZE, "timeout": 30}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and a worker write at once: WAL lets readers go on, IMMEDIATE
    # transactions queue writers instead of failing them with "database is locked".
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"  # made above, filled by collectstatic
# Django's storages set these modes themselves, whatever the umask: private like the rest.
FILE_UPLOAD_PERMISSIONS = 0o600
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
                    if not DEBUG else "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# Huge bodies are refused with 400 before any view sees them.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 1024 * 1024, minimum=1024)

# `make run` (manage.py up): the port it serves on, and the first admin account's
# password (empty: a random one, printed once; only Django's hash is stored).
PORT = env_int("PORT", 8000, minimum=1)
# Web server processes: Django runs a process's requests on one core at a time (the GIL).
WEB_WORKERS = env_int("WEB_WORKERS", os.cpu_count() or 1, minimum=1)
ADMIN_PASSWORD = env_secret("ADMIN_PASSWORD", "")

# --- the imaging side -----------------------------------------------------------
IMAGING_DATASTORE = env_path("IMAGING_DATASTORE", DATA_DIR / "datastore")
IMAGING_DISK_FILES = env_list("IMAGING_DISK_FILES", "", separator=":")
NOTIFY_URLS = env_list("NOTIFY_URLS", "", separator=" ")
# A host whose worker has not reported for this long is offline.
HOST_OFFLINE_SECONDS = env_int("HOST_OFFLINE_SECONDS", 180, minimum=1)
# How often a worker reports its inventory.
INVENTORY_INTERVAL_SECONDS = env_int("INVENTORY_INTERVAL_SECONDS", 60, minimum=1)
# A running job beats this often; one silent for JOB_LOST_SECONDS lost its worker.
JOB_HEARTBEAT_SECONDS = env_float("JOB_HEARTBEAT_SECONDS", 5.0, minimum=0.1)
JOB_LOST_SECONDS = env_float("JOB_LOST_SECONDS", 45.0, minimum=1.0)
# A running job whose progress has not moved for this long is flagged stalled.
JOB_STALL_SECONDS = env_float("JOB_STALL_SECONDS", 300.0, minimum=1.0)
# Progress: pushed to browsers at most this often per job, saved to the database this often.
PROGRESS_SEND_SECONDS = env_float("PROGRESS_SEND_SECONDS", 0.33, minimum=0.01)
PROGRESS_SAVE_SECONDS = env_float("PROGRESS_SAVE_SECONDS", 5.0, minimum=0.1)
# Longer than any job: an unacknowledged job message is redelivered only after this.
JOB_VISIBILITY_TIMEOUT = env_int("JOB_VISIBILITY_TIMEOUT", 7 * 24 * 3600, minimum=3600)
# A running job looks for a cancel request this often (the engine stops within a chunk).
JOB_CANCEL_POLL_SECONDS = env_float("JOB_CANCEL_POLL_SECONDS", 0.25, minimum=0.05)
# How often beat sweeps (in its own process) for lost and stalled jobs, and for disks whose
# protection changed.
CHECK_JOBS_SECONDS = env_float("CHECK_JOBS_SECONDS", 15.0, minimum=1.0)
CHECK_PROTECTION_SECONDS = env_float("CHECK_PROTECTION_SECONDS", 60.0, minimum=1.0)
# Export writes, and import reads, only below these folders of the host that runs the job:
# a request names a file in them, never a path elsewhere on a machine where workers are root.
EXPORT_DIR = env_path("EXPORT_DIR", DATA_DIR / "exports")
IMPORT_DIR = env_path("IMPORT_DIR", DATA_DIR / "imports")
# File sessions (a folder listed, a file or a folder downloaded from an image: each mounts
# the image and runs a filesystem's tools) the web server runs at once, in all and per user.
FILE_SESSIONS = env_int("FILE_SESSIONS", 2 * (os.cpu_count() or 1), minimum=1)
FILE_SESSIONS_PER_USER = env_int("FILE_SESSIONS_PER_USER", 2, minimum=1)

# --- Redis: Celery broker and the Channels layer ----------------------------------
# Given, it is used as it is (with its password, on another host). Not given: this
# installation's own Redis (`make run` starts it), on a port of its own rather than a shared
# Redis's 6379, with a password made on first use; a local user without it can read or write
# nothing there.
LOCAL_REDIS_PORT = 6380
REDIS_URL = env_str("REDIS_URL") or \
    f"redis://:{stored_secret(DATA_DIR / 'redis_password')}@127.0.0.1:{LOCAL_REDIS_PORT}/0"
refuse_placeholder("the password in REDIS_URL", urlsplit(REDIS_URL).password)
CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A worker waits for Redis however long it is away (Celery gives up after 100 tries).
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
# kombu's Redis transport, whose channels survive a lost connection (webui/broker.py).
CELERY_BROKER_TRANSPORT = "webui.broker:Transport"
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": JOB_VISIBILITY_TIMEOUT,
    # A Redis that is down or hangs costs a job start (a 503) or an acknowledgement a few
    # seconds, not a hung request or worker: kombu's sockets would wait forever.
    "socket_connect_timeout": 3.0, "socket_timeout": 3.0,
}
# A job goes on when Redis goes away (its progress and state go to the database); the
# message it was started by cannot run it twice (claim_job). Celery 6 would cancel it.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
# JSON both ways, for tasks, remote control, events and results: never a pickle from Redis.
CELERY_ACCEPT_CONTENT = CELERY_RESULT_ACCEPT_CONTENT = ["json"]
CELERY_EVENT_SERIALIZER = "json"
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "control"
CELERY_TIMEZONE = TIME_ZONE
# django-celery-beat's, running the sweeps in beat's own process too.
CELERY_BEAT_SCHEDULER = "webui.beat:Scheduler"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_SEND_TASK_EVENTS = False
# Threads: a job, its heartbeat and its cancel watcher share one process, so killing the
# worker kills its jobs with it (no orphaned pool child writing a disk while its job is
# declared lost), and the engine's work (hashing, zstd, I/O) releases the GIL anyway.
CELERY_WORKER_POOL = "threads"
CELERY_WORKER_CONCURRENCY = env_int("WORKER_CONCURRENCY", 4, minimum=1)
CHANNEL_LAYER = env_str("CHANNEL_LAYER", "redis")
if CHANNEL_LAYER == "redis":
    CHANNEL_LAYERS = {"default": {
        "BACKEND": "webui.channel_layer.PubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "serializer_format": "json"},
    }}
elif CHANNEL_LAYER == "memory":
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    raise ImproperlyConfigured(f"CHANNEL_LAYER={CHANNEL_LAYER!r}: use redis or memory")

# The API's cached reads (lists, API tokens' users: webui.services.readcache), in the Redis
# every web process and worker share, since workers' writes make them stale; a list may lag
# the clock (a disk turning overdue) by API_CACHE_SECONDS, 0 for no caching. "memory" keeps
# the cache per process: for a single process only.
API_CACHE_SECONDS = env_float("API_CACHE_SECONDS", 10.0, minimum=0.0)
CACHE = env_str("CACHE", "redis")
if CACHE == "redis":
    CACHES = {"default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL, "KEY_PREFIX": "webui",
        # A Redis that hangs must cost a request a moment, not the request. JSON, never
        # pickles: whoever can write to Redis must not run code in the web server.
        "OPTIONS": {"socket_connect_timeout": 1.0, "socket_timeout": 1.0,
                    "serializer": "webui.cache.JSONSerializer"},
    }}
elif CACHE == "memory":
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
else:
    raise ImproperlyConfigured(f"CACHE={CACHE!r}: use redis or memory")

# --- API ----------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        # Tokens kept hashed (django-rest-knox), their reads cached (webui.services.readcache).
        "webui.api.authentication.ReadCachedTokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON only: a form field is always a string, and the API's ids are numbers.
    "DEFAULT_PARSER_CLASSES": ["webui.api.parsers.JSONParser"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_RATES": {"login": env_str("LOGIN_THROTTLE_RATE", "10/min")},
    # A client's address is the peer's (REMOTE_ADDR), never a header it sent: uvicorn
    # rewrites it from X-Forwarded-For for TRUSTED_PROXIES only.
    "NUM_PROXIES": 0,
    "EXCEPTION_HANDLER": "webui.api.exceptions.exception_handler",
}
# API tokens do not expire (an admin deletes them on the admin pages); the header is DRF's.
REST_KNOX = {"TOKEN_TTL": None, "AUTH_HEADER_PREFIX": "Token"}
SPECTACULAR_SETTINGS = {
    "TITLE": "Disk imaging dashboard API",
    "DESCRIPTION": "Hosts, disks, images, jobs, schedules and datastores of a home lab.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Read-only fields (id, created...) stay out of request bodies in the schema.
    "COMPONENT_SPLIT_REQUEST": True,
    # Its name since the API began, when a job's kind was an enum too.
    "ENUM_NAME_OVERRIDES": {"ScheduleKindEnum": "webui.models.Schedule.Kind"},
}

# Logins (webui.logins): five failures lock the address out for an hour, whatever the
# usernames; a username takes LOGIN_THROTTLE_RATE attempts from all addresses together.
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = env_float("AXES_COOLOFF_HOURS", 1.0, minimum=0.01)
AXES_LOCKOUT_PARAMETERS = ["ip_address"]
AXES_RESET_ON_SUCCESS = False
AXES_CLIENT_IP_CALLABLE = "webui.logins.client_address"
AXES_LOCKOUT_CALLABLE = "webui.logins.lockout_response"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}, "axes": {"level": "WARNING"}},
}
