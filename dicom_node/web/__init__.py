"""The node over HTTP (`[http]`), on a port of its own beside the DICOM one.

- `metrics`: the node's Prometheus metrics, in a registry of its own: counted as reception
  and the stages report (`dicom_node.pipeline.observer`), or read when scraped;
- `health`: the readiness checks, each a small function with its reason;
- `dashboard`: the admin's pages (Jinja2 `templates/`, `static/`) and a failed job's retry;
- `server`: the HTTP server (a thread of the daemon) serving `/metrics`, `/healthz`,
  `/readyz` and the dashboard.
"""
