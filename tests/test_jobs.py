"""The Jobs API client's decisions, against a stand-in for Ray's JobSubmissionClient."""

import pytest

from memray.errors import InputError
from memray.launch import jobs


class FakeClient:
    def __init__(self, info_error: str | None):
        self.info_error, self.submitted = info_error, []

    def get_job_info(self, job_id):
        if self.info_error:
            raise RuntimeError(self.info_error)
        return {"job_id": job_id}

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return kwargs["submission_id"]


@pytest.mark.parametrize(
    "info_error,submits",
    [
        (None, False),  # the id exists: nothing is submitted again
        ("Request failed with status code 404: Job e2e-1 does not exist.", True),
        ("Request failed with status code 500: Internal Server Error", None),  # an error, not a resubmission
        ("Request failed with status code 401: Unauthorized", None),
    ],
)
def test_a_submission_id_is_submitted_once_and_only_when_unknown(monkeypatch, info_error, submits):
    fake = FakeClient(info_error)
    monkeypatch.setattr(jobs, "client", lambda *_: fake)
    submit = lambda: jobs.submit("name: t\n", address="http://x", run_dir="/r", submission_id="e2e-1")  # noqa: E731
    if submits is None:
        with pytest.raises(InputError, match="reading job 'e2e-1' failed: Request failed with status code"):
            submit()
        assert fake.submitted == []
    else:
        _, job_id, new = submit()
        assert job_id == "e2e-1" and new is submits and len(fake.submitted) == int(submits)


class LostCluster:
    """A job whose logs stream until the cluster's head goes away."""

    def __init__(self):
        self.calls = 0

    def get_job_info(self, job_id):
        self.calls += 1
        if self.calls > 1:  # after the head is gone: what requests raises
            raise ConnectionError("Failed to establish a new connection: [Errno 111] Connection refused")
        return {"job_id": job_id}

    async def tail_job_logs(self, job_id):
        yield "step 5 loss 4.8\n"
        raise ConnectionResetError("Cannot write to closing transport")


def test_losing_the_cluster_while_following_is_one_line(capsys):
    from memray.errors import RunFailed

    with pytest.raises(RunFailed) as info:
        jobs.follow(LostCluster(), "e2e-1", run_dir="/runs/r")
    message = str(info.value)
    assert "\n" not in message and "lost the Ray cluster while following job 'e2e-1'" in message
    assert "ConnectionResetError" in message and "--run-dir /runs/r" in message
    assert "step 5 loss" in capsys.readouterr().out  # what arrived was streamed
