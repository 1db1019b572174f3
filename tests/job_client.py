"""Submit one job to a Ray head through the Jobs SDK and wait for it (run as a subprocess by
test_job_submit.py). argv: dashboard address, JSON of submit_job kwargs. Prints the job's logs
tail, then a last line {"status": ...}; exits 1 unless the job SUCCEEDED."""

from __future__ import annotations

import json
import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient


def _client(address: str):
    """A Jobs SDK client, once the dashboard answers. The SDK reads RAY_AUTH_MODE and the token
    path from this process's environment (the test sets them like the head's)."""

    deadline = time.monotonic() + 90
    while True:
        try:
            return JobSubmissionClient(address)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _submit(client, deadline_s: float = 90, **kwargs) -> str:
    """Submit, retrying while the head's job agent is still registering."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def main() -> int:
    address, spec = sys.argv[1], json.loads(sys.argv[2])
    client = _client(address)
    job_id = _submit(client, **spec)
    deadline = time.monotonic() + 780
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(3)
        status = client.get_job_status(job_id)
    print(client.get_job_logs(job_id)[-4000:])
    print(json.dumps({"job_id": job_id, "status": str(status.value)}))
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
