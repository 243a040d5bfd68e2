# Toxiproxy for the container runtime of the chaos runner. Built by `nox -s image`
# (python -m goml.chaos.image) on the same base as goml's image (no pull): the binary in
# the context is toxiproxy-server built from its Go sources on the host with
# `CGO_ENABLED=0 go install github.com/Shopify/toxiproxy/v2/cmd/server@v2.12.0`.
ARG BASE=goml-base:bookworm
FROM ${BASE}
COPY toxiproxy-server /usr/local/bin/toxiproxy-server
ARG TOXIPROXY_VERSION
LABEL org.goml.toxiproxy-version="${TOXIPROXY_VERSION}"
EXPOSE 8474
ENTRYPOINT ["/usr/local/bin/toxiproxy-server"]
CMD ["-host", "0.0.0.0", "-port", "8474"]
