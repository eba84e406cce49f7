"""The job worker's Prometheus metrics (defined once per process)."""

from prometheus_client import Counter, Gauge

JOBS = Counter("meshserve_jobs_finished_total", "Jobs this worker finished, by final state", ["state"])
LINES = Counter("meshserve_jobs_batch_lines_total",
                "Batch line outcomes: ok, error, or duplicate (a second run whose outcome was dropped)", ["outcome"])
FENCED = Counter("meshserve_jobs_fenced_total", "Job results not written: another writer held the job by then")
BACKOFFS = Counter("meshserve_jobs_backoffs_total", "RESOURCE_EXHAUSTED answers a worker backed off from")
IN_FLIGHT = Gauge("meshserve_jobs_in_flight", "Jobs and batch lines this worker is running")
DEAD_LETTERS = Counter("meshserve_jobs_dead_letters_total", "Work items that ran out of deliveries")
