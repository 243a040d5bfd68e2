"""Chaos on real processes: `goml chaos run` (runner), the cluster behind one Toxiproxy
proxy per link (cluster), getting a Toxiproxy server (server) and its HTTP API (toxiproxy)."""
