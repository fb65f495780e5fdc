"""How a job's progress reaches the browser: one Channels group per job."""


def job_group(job_id):
    """The group of the websocket connections that follow one job."""
    return f"job.{job_id}"
