# goml for the container runtime of the chaos runner (`goml chaos run --runtime containers`).
# Built by `nox -s image` (python -m goml.chaos.image), offline: the base is a `docker
# import` of the deploy lab's Debian bookworm root file system, and goml is installed from
# a wheelhouse built on the host (context: deps/ = dependency wheels, app/ = goml's wheel).
# Nothing is pulled. The dependencies come before goml, so a change to goml's sources
# rebuilds only the last layers.
ARG BASE=goml-base:bookworm
FROM ${BASE}
RUN python3 -m venv /opt/goml/venv
COPY deps/ /opt/goml/wheelhouse/deps/
RUN /opt/goml/venv/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \
        /opt/goml/wheelhouse/deps/*.whl
ARG GOML_VERSION
COPY app/ /opt/goml/wheelhouse/app/
RUN /opt/goml/venv/bin/pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check \
        --find-links /opt/goml/wheelhouse/app "goml==${GOML_VERSION}"
ARG SOURCE_DIGEST
LABEL org.goml.version="${GOML_VERSION}" org.goml.source-digest="${SOURCE_DIGEST}"
ENV PATH=/opt/goml/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/goml
ENTRYPOINT ["/opt/goml/venv/bin/goml"]
CMD ["--help"]
