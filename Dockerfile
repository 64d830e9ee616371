# The dashboard's image: web server, worker and beat (docker-compose.yml says which).
FROM debian:bookworm-slim

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/app/.venv/bin:$PATH
WORKDIR /app

# The engine's Debian packages (the Makefile's RUNTIME_PACKAGES) and the
# virtualenv, in layers of their own: they change less often than the code.
COPY Makefile requirements.txt requirements-test.txt ./
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends make python3 >/dev/null \
    && make system-packages APT_PACKAGES='$(RUNTIME_PACKAGES)' \
    && make .venv/.installed .venv/wheels/.built REQUIREMENTS=requirements.txt \
    && rm -rf /var/lib/apt/lists/* /root/.cache

COPY . .

EXPOSE 8000
# The launcher's command line, as docker-compose.yml, make run and systemd run it.
CMD ["python", "manage.py", "serve", "--exec", "web"]
