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
